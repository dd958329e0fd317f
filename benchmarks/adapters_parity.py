"""The adapters' parity table: edge's LoRA, textual inversion and ControlNet against diffusers on the same latents,
on the tests' tiny model (random weights), with the tests' own reference code (tests/test_lora.py,
test_embeddings.py, test_controlnet.py); prints a markdown table of image PSNRs.

    python benchmarks/adapters_parity.py [--work DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import euler_pipeline  # noqa: E402
from edge import Pipeline  # noqa: E402
from edge.converters.tiny import save_tiny  # noqa: E402
from edge.metrics import psnr  # noqa: E402


def edge(*args) -> None:
    subprocess.run([sys.executable, "-m", "edge.cli", *map(str, args)], check=True, capture_output=True)


def lora_rows(model: Path, bundle: Path, work: Path) -> list[tuple[str, float]]:
    import test_lora as t
    from lora_files import write_diffusers_lora, write_kohya_lora

    ref = euler_pipeline(model)
    d, k = write_diffusers_lora(ref, work / "d"), write_kohya_lora(ref, work / "style.safetensors")
    u = write_diffusers_lora(ref, work / "u", seed=5, text_encoder=False)
    pipe = Pipeline.load(bundle)
    rows = [(f"LoRA, {name}", psnr(t._diffusers(ref, loras), t._edge(pipe, loras))) for name, loras in (
        ("diffusers/PEFT layout, UNet + text encoder, x0.8", [(d, 0.8)]),
        ("kohya layout (alpha), UNet + text encoder, x0.6", [(k, 0.6)]),
        ("UNet only (attention + LoCon convolutions), x1", [(u, 1.0)]),
        ("two at once (diffusers x0.8 + kohya x0.5)", [(d, 0.8), (k, 0.5)]))]
    fused = work / "fused"
    edge("convert", model, "--lora", f"{k}:0.6", "--no-memory-profile", "-o", fused, "--overwrite")
    fp32_fused = t._edge(Pipeline.load(fused), [])
    rows.append(("LoRA fused at convert time vs applied at run time (kohya x0.6)", psnr(fp32_fused, t._edge(pipe, [(k, 0.6)]))))
    int8, int8_fused = work / "int8", work / "int8-fused"
    edge("convert", model, "--precision", "int8", "--no-memory-profile", "-o", int8, "--overwrite")
    edge("convert", model, "--precision", "int8", "--lora", f"{k}:0.6", "--no-memory-profile", "-o", int8_fused,
         "--overwrite")
    run_time = t._edge(Pipeline.load(int8), [(k, 0.6)])
    rows.append(("int8 bundle, run-time LoRA (re-quantised) vs LoRA fused before quantising",
                 psnr(t._edge(Pipeline.load(int8_fused), []), run_time)))
    rows.append(("int8 bundle, run-time LoRA vs fp32 fused LoRA", psnr(fp32_fused, run_time)))
    rows.append(("(int8 bundle without LoRA vs fp32 without LoRA)", psnr(t._edge(Pipeline.load(int8), []),
                                                                       t._edge(pipe, []))))
    return rows


def embedding_rows(model: Path, bundle: Path, work: Path) -> list[tuple[str, float]]:
    from safetensors.torch import save_file

    import test_embeddings as t

    ref = euler_pipeline(model)
    g, width = torch.Generator().manual_seed(0), ref.text_encoder.config.hidden_size
    save_file({"<sparkle>": torch.randn(2, width, generator=g)}, str(work / "learned_embeds.safetensors"))
    save_file({"emb_params": torch.randn(3, width, generator=g)}, str(work / "grainy.safetensors"))
    prompt, negative = "a red circle, <sparkle>", "grainy, blurry"
    ref.load_textual_inversion(str(work / "learned_embeds.safetensors"))
    ref.load_textual_inversion(str(work / "grainy.safetensors"), token="grainy")
    pipe = Pipeline.load(bundle)
    pipe.load_embedding(work / "learned_embeds.safetensors")
    pipe.load_embedding(work / "grainy.safetensors")
    ours = np.asarray(pipe.generate(prompt, negative_prompt=negative, steps=4, latents=t.LATENTS,
                                    scheduler="euler").images[0])
    return [("textual inversion: diffusers 2-vector in the prompt + A1111 3-vector as the negative",
             psnr(t._diffusers(ref, prompt, negative), ours))]


def controlnet_rows(model: Path, work: Path) -> list[tuple[str, float]]:
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    import test_controlnet as t

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    nets = {n: t._tiny_controlnet(pipe.unet, seed=k) for k, n in enumerate(("edges", "mask"))}
    for n, net in nets.items():
        net.save_pretrained(work / n)
    bundle = work / "cn"
    edge("convert", model, "--controlnet", work / "edges", "--controlnet", work / "mask", "--no-memory-profile",
         "--no-tiled-vae", "-o", bundle, "--overwrite")
    rng = np.random.default_rng(0)
    images = {n: Image.fromarray(rng.integers(0, 256, (t.H, t.W, 3), dtype=np.uint8)) for n in nets}
    setup = (pipe, nets, bundle, images)
    cases = [("one", ["edges"], [1.0], (0.0, 1.0)), ("scale 0.6", ["mask"], [0.6], (0.0, 1.0)),
             ("two at once (0.8 + 0.5)", ["edges", "mask"], [0.8, 0.5], (0.0, 1.0)),
             ("guidance window 0.2-0.6", ["edges"], [1.0], (0.2, 0.6))]
    return [(f"ControlNet, {name}", psnr(t._diffusers(setup, n, s, *w), t._edge(setup, n, s, *w)))
            for name, n, s, w in cases]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="adapters-"))
    model = save_tiny(work / "tiny")
    bundle = work / "bundle"
    edge("convert", model, "--no-memory-profile", "-o", bundle, "--overwrite")
    rows = lora_rows(model, bundle, work) + embedding_rows(model, bundle, work) + controlnet_rows(model, work)
    print("| case (tiny SD 1.x model, random weights, 4-5 euler steps, guidance 7.5) | image PSNR |")
    print("|---|---:|")
    for name, db in rows:
        print(f"| {name} | {db:.1f} dB |")


if __name__ == "__main__":
    main()
