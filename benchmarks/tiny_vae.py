"""The tiny autoencoder against the full VAE decoder: decode time and PSNR, and what previews show.

    python benchmarks/tiny_vae.py [--bundle build/default-bundle] [--images 16] [--sd15]

1. The default model's bundle (its distilled tiny autoencoder, converters/default_model/train_tiny_vae.py): the
   same generations decoded by both decoders (PSNR of the tiny one's pictures against the full one's), each
   decoder's time per image (median of repeats, onnxruntime, this machine's threads), and the previews at the
   half-way step: the linear map of the noisy latents (the earlier previews), the linear map and the tiny decoder
   of the step's estimate of the clean latents, each against the final picture.
2. `--sd15`: SD 1.5's VAE decoder and TAESD's architecture (diffusers' AutoencoderTiny defaults), random weights,
   exported to ONNX and timed at 512x512: the speed at the size people run (no weights can be downloaded here, so
   no PSNR at that size).
Prints one JSON document; the figures in benchmarks/RESULTS.md came from it, with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edge import Pipeline
from edge.cpu import cpu_model, features
from edge.metrics import psnr
from edge.sessions import open_session

PROMPTS = ["a red circle on a blue background", "a yellow square on a green background",
           "a blue triangle on a white background", "a green circle on a black background"]


def timed(run, repeat: int) -> float:
    run()  # warm-up: first-call allocations
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def default_model(bundle: Path, images: int, steps: int) -> dict:
    pipe = Pipeline.load(bundle)
    if "tiny_vae_decoder" not in pipe.manifest.components:
        raise SystemExit(f"{bundle} has no tiny autoencoder: convert it with `edge convert default` (it ships one)")
    vs_full, previews = [], {"linear of the noisy latents": [], "linear of the clean estimate": [],
                             "tiny decoder of the clean estimate": []}
    for k in range(images):
        half = []

        def keep(i: int, n: int, x: np.ndarray) -> None:
            if i + 1 == n // 2:
                half.extend([pipe.preview(x, decoder="linear"), pipe.preview(decoder="linear"),
                             pipe.preview(decoder="tiny")])

        full = pipe.generate(PROMPTS[k % len(PROMPTS)], steps=steps, seed=k, callback=keep)
        final = np.asarray(full.images[0])
        tiny = np.asarray(_tiny(pipe, full.latents))
        vs_full.append(psnr(final, tiny, peak=255.0))
        for name, im in zip(previews, half):
            previews[name].append(psnr(final, np.asarray(im), peak=255.0))
    latents = full.latents.astype(np.float32)
    z = latents / np.float32(pipe.manifest.vae_scaling_factor)
    decoders = {name: pipe.graphs.open(name)[0] for name in ("vae_decoder", "tiny_vae_decoder")}
    times = {"vae_decoder": timed(lambda: decoders["vae_decoder"].run(None, {"latent_sample": z}), 50),
             "tiny_vae_decoder": timed(lambda: decoders["tiny_vae_decoder"].run(None, {"latent_sample": latents}), 50)}
    m = pipe.manifest.components
    return {"bundle": str(bundle), "images": images, "steps": steps, "size": list(pipe.manifest.default_size),
            "tiny_psnr_vs_full_db": {"mean": round(float(np.mean(vs_full)), 2), "min": round(float(np.min(vs_full)), 2)},
            "manifest_fidelity_db": m["tiny_vae_decoder"].fidelity.get("psnr_vs_full_decoder_db"),
            "decode_ms": {k: round(v * 1e3, 3) for k, v in times.items()},
            "parameters": {k: m[k].parameters for k in decoders},
            "bytes": {k: m[k].bytes for k in decoders},
            "half_way_preview_psnr_vs_final_db": {k: round(float(np.mean(v)), 2) for k, v in previews.items()}}


def grid(bundle: Path, out: Path, steps: int = 20, every: int = 4, scale: int = 2) -> None:
    """Rows: previews by the linear map of the noisy latents, the linear map of the clean estimate, the tiny decoder
    of the clean estimate, every `every` steps; the last column, the final picture (full decoder, then tiny)."""
    from PIL import Image

    pipe = Pipeline.load(bundle)
    rows: list[list[Image.Image]] = [[], [], []]

    def keep(i: int, n: int, x: np.ndarray) -> None:
        if (i + 1) % every == 0:
            for row, im in zip(rows, (pipe.preview(x, decoder="linear"), pipe.preview(decoder="linear"),
                                      pipe.preview(decoder="tiny"))):
                row.append(im)

    result = pipe.generate(PROMPTS[0], steps=steps, seed=0, callback=keep)
    rows[0].append(result.images[0])
    rows[1].append(_tiny(pipe, result.latents))
    rows[2].append(Image.new("RGB", result.images[0].size, "white"))
    w, h = result.images[0].size
    sheet = Image.new("RGB", (len(rows[0]) * (w * scale + 4), 3 * (h * scale + 4)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im.resize((w * scale, h * scale), Image.NEAREST), (c * (w * scale + 4), r * (h * scale + 4)))
    sheet.save(out)


def _tiny(pipe: Pipeline, latents: np.ndarray):
    from edge.stages.decode import decode_tiny

    return decode_tiny(pipe.graphs, latents[:1])


def sd15_size(repeat: int) -> dict:
    """SD 1.5's VAE decoder and TAESD's architecture at 512x512, random weights, exported here."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from edge.converters.onnx_export import VaeDecoder
    from edge.converters.tiny_vae import TinyDecoder

    torch.manual_seed(0)
    full = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=512).eval()
    tiny = AutoencoderTiny().eval()
    z = np.random.default_rng(0).standard_normal((1, 4, 64, 64), dtype=np.float32)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in (("vae_decoder", VaeDecoder(full)), ("tiny_vae_decoder", TinyDecoder(tiny))):
            path = Path(tmp) / f"{name}.onnx"
            with torch.no_grad():
                torch.onnx.export(module, (torch.from_numpy(z),), str(path), input_names=["latent_sample"],
                                  output_names=["sample"], opset_version=17, dynamo=False)
            session = open_session(path)
            params = sum(p.numel() for p in module.parameters())
            out[name] = {"ms": round(timed(lambda: session.run(None, {"latent_sample": z}), repeat) * 1e3, 1),
                         "parameters": params}
    return {"size": [512, 512], "random_weights": True, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("build/default-bundle"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sd15", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--grid", type=Path, help="also save a sheet of the previews every 4 steps")
    a = p.parse_args()
    if a.grid is not None:
        grid(a.bundle, a.grid)
    cpu = features()
    report = {"cpu": cpu_model(), "features": cpu.describe(), "threads": "all cores",
              "default_model": default_model(a.bundle, a.images, a.steps)}
    if a.sd15:
        report["sd15_size"] = sd15_size(a.repeat)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
