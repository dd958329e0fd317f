"""Token merging (ToMe): speed and quality of `edge convert --token-merging RATIO` against the unmerged bundle.

    python benchmarks/tome.py [--ratios 0,0.3,0.5,0.7] [--images 16] [--score]          # the default model
    python benchmarks/tome.py --source ~/.cache/edge-diffusion/models/sd15-random --speed-only \\
        --height 512 --width 512 --calls 3 --remove-bundles                              # SD 1.5's size

ToMe is made into the UNet graph at convert time, so each ratio is its own bundle: converted into --work (with
--no-memory-profile --no-tiled-vae; a bundle already there with the same ratio is reused), one ratio at a time.
Per ratio: the UNet call time (batch 2, as with guidance; median of --calls after one warm-up) and its output
against the unmerged UNet's on the same inputs; the manifest's figures (ONNX vs torch with ToMe, torch with ToMe
vs without); unless --speed-only, as benchmarks/deep_cache.py measures DeepCache: UNet time per step and image
PSNR against the unmerged image of the same prompt and seed, and with --score (the default model only) the
scorer's accuracy on the 204-prompt evaluation set (edge.eval). Prints one JSON document; the figures in
benchmarks/RESULTS.md came from it, with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge import Pipeline
from edge.cpu import cpu_model, features
from edge.metrics import psnr

PROMPTS = ["a red circle on a blue background", "a large yellow square on a black background",
           "a large green triangle on a white background", "a small white diamond on the left, red background"]


def bundle_for(source: str, ratio: float, work: Path) -> Path:
    """The bundle of `source` converted with this ratio (0: no token merging), converted now if not there yet."""
    out = work / (f"{Path(source).name}-tome{ratio:g}" if ratio else f"{Path(source).name}-plain")
    if (out / "manifest.json").is_file() and _ratio(out) == ratio:
        return out
    merging = ["--token-merging", f"{ratio:g}"] if ratio else []
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edge.cli", "convert", source, "-o", str(out), "--overwrite",
                    "--no-memory-profile", "--no-tiled-vae", *merging], check=True, stdout=subprocess.DEVNULL)
    print(f"converted {out} in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return out


def _ratio(bundle: Path) -> float:
    unet = json.loads((bundle / "manifest.json").read_text())["components"]["unet"]
    return unet.get("attention", {}).get("token_merging", {}).get("ratio", 0.0)


def unet_calls(pipe: Pipeline, height: int, width: int, calls: int) -> tuple[float, float, np.ndarray]:
    """Median and fastest seconds of one batch-2 UNet call at this image size (the fastest is the steadier figure
    on a shared machine), and its output (fixed inputs)."""
    m = pipe.manifest
    rng = np.random.default_rng(0)
    unet = m.components["unet"]
    channels, context_dim = unet.inputs[0].shape[1], unet.inputs[2].shape[2]
    sample = rng.standard_normal((2, channels, height // m.vae_scale_factor, width // m.vae_scale_factor),
                                 dtype=np.float32)
    context = rng.standard_normal((2, m.text_max_length, context_dim), dtype=np.float32)
    out = pipe.unet(sample, 500.0, context)  # warm-up
    seconds = []
    for _ in range(calls):
        t = time.perf_counter()
        out = pipe.unet(sample, 500.0, context)
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds), min(seconds), out


def images(pipe: Pipeline, a: argparse.Namespace) -> tuple[float, list[np.ndarray]]:
    per_step, drawn = [], []
    for k in range(a.images):
        r = pipe.generate(PROMPTS[k % len(PROMPTS)], steps=a.steps, guidance=a.guidance, seed=k,
                          height=a.height, width=a.width)
        per_step.append(r.timings["unet_per_step"])
        drawn.append(np.asarray(r.images[0]))
    return statistics.median(per_step), drawn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="default", help="model to convert (default: the shipped default model)")
    p.add_argument("--ratios", default="0,0.3,0.5,0.7", help="0 = no token merging, the reference")
    p.add_argument("--work", type=Path, default=Path("build/tome"), help="where the bundles are converted")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--calls", type=int, default=10, help="timed UNet calls per ratio")
    p.add_argument("--score", action="store_true", help="the default model's scorer on its evaluation set")
    p.add_argument("--speed-only", action="store_true", help="UNet calls only: no images, no scorer")
    p.add_argument("--remove-bundles", action="store_true", help="delete each bundle once measured (SD 1.5: 3.4 GB)")
    a = p.parse_args()
    ratios = [float(r) for r in a.ratios.split(",")]
    a.work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    base_out, base_images = None, []
    for ratio in ratios:
        bundle = bundle_for(a.source, ratio, a.work)
        pipe = Pipeline.load(bundle)
        h, w = a.height or pipe.manifest.default_size[0], a.width or pipe.manifest.default_size[1]
        call_s, fastest_s, out = unet_calls(pipe, h, w, a.calls)
        base_out = out if base_out is None else base_out
        unet = pipe.manifest.components["unet"]
        merging = unet.attention.get("token_merging", {})
        row = {"unet_call_s": round(call_s, 4), "unet_call_min_s": round(fastest_s, 4),
               "unet_output_vs_first_db": round(psnr(base_out, out), 2),
               "parity_db": unet.parity.get("psnr_db"), "torch_vs_unmerged_db": merging.get("psnr_vs_unmerged_db"),
               "blocks": len(merging.get("blocks", []))}
        if not a.speed_only:
            per_step, drawn = images(pipe, a)
            base_images = base_images or drawn
            db = [psnr(x, y, peak=255.0) for x, y in zip(base_images, drawn)]
            row["unet_s_per_step"] = round(per_step, 4)
            row["image_vs_first_db"] = {"mean": round(float(np.mean(db)), 2), "min": round(float(np.min(db)), 2)}
        if a.score:
            from edge.eval.fidelity import evaluate_bundle

            report = evaluate_bundle(bundle)
            row["scorer"] = {g: report[g] for g in ("all", "held_out", "seen", "two_object") if g in report}
        del pipe
        if a.remove_bundles:
            shutil.rmtree(bundle)
        rows[f"{ratio:g}"] = row
        print(f"ratio {ratio:g}: {row}", file=sys.stderr, flush=True)
    print(json.dumps({"cpu": cpu_model(), "features": features().describe(), "source": a.source,
                      "size": [a.height, a.width], "steps": a.steps, "images": a.images, "ratios": rows}, indent=2))


if __name__ == "__main__":
    main()
