"""Does the Neural-Engine rewrite change what the default model draws? Score it in torch, both ways.

The edge pipeline (tokenizer, scheduler, denoising loop, guidance) runs with torch modules as its graphs:
once with diffusers' own UNet and VAE decoder ("original"), once with the Core ML target's rewritten
modules ("ane": (B, C, 1, S) layout, 1x1 convolutions, split-einsum attention). Both are scored with
edge.eval's 204 fixed prompts, as `edge convert --score` scores ONNX bundles.

    .venv/bin/python benchmarks/coreml_rewrite_accuracy.py [--limit N] [-o bench-results/coreml_rewrite.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge.converters.coreml.reference import TorchPipeline, pipelines
from edge.eval.fidelity import GROUPS, generate_scored, grouped, markdown
from edge.eval.scenes import eval_prompts


def evaluate(pipe: TorchPipeline, prompts, steps: int, guidance: float, scheduler: str) -> tuple[dict, np.ndarray]:
    t0 = time.perf_counter()
    results, images = generate_scored(pipe, prompts, steps=steps, guidance=guidance, scheduler=scheduler)
    report = {"steps": steps, "guidance": guidance, "scheduler": scheduler, "prompts": len(prompts),
              "seconds": round(time.perf_counter() - t0, 1), **grouped(results, prompts)}
    return report, np.stack(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = eval_prompts() if a.limit is None else eval_prompts()[: a.limit]
    with tempfile.TemporaryDirectory() as tmp:  # a bundle for the manifest and tokenizer only
        from edge.converters.convert import Options, convert

        bundle = Path(tmp) / "b"
        convert("default", bundle, options=Options(targets=("onnx",), profile_memory=False, tiled_vae=False),
                log=lambda s: None)
        out, images = {}, {}
        for name, pipe in pipelines(bundle).items():
            out[name], images[name] = evaluate(pipe, prompts, a.steps, 5.0, "euler")
            print(f"## {name} ({out[name]['seconds']}s)\n{markdown(out[name])}\n")
    diff = {g: round(100 * (out["ane"][g]["all"] - out["original"][g]["all"]), 2) for g in ("all", *GROUPS) if g in out["ane"]}
    pixels = np.abs(images["ane"].astype(int) - images["original"].astype(int))
    out["ane_minus_original_points"] = diff
    out["pixel_diff"] = {"max": int(pixels.max()), "mean": float(pixels.mean()),
                         "images_identical": int(sum((p == 0).all() for p in pixels))}
    print(f"all-correct, ane minus original (points): {diff}; pixel |diff| max {pixels.max()}, mean {pixels.mean():.4f}")
    if a.output is not None:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
