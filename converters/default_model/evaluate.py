"""Generate the evaluation prompts with a trained folder (diffusers, torch) and score the images.

    python -m edge.converters.default_model.evaluate --model DIR [--n 204] [--steps 25] [--guidance 5]

This is the host-side reference; the device runtime scores its own images with the same scorer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edge.converters.default_model.models import load_pipeline
from edge.eval.scenes import Scene, eval_prompts, scene_group
from edge.eval.scorer import score, summarize


def pick_prompts(n: int) -> list[tuple[str, Scene]]:
    """n prompts spread evenly over the fixed evaluation set (all of it when n >= its size)."""
    prompts = eval_prompts()
    if n <= 0:
        raise ValueError(f"n={n}; expected a positive number of prompts")
    if n >= len(prompts):
        return prompts
    return [prompts[i] for i in np.linspace(0, len(prompts) - 1, n).round().astype(int)]


@torch.no_grad()
def generate(model: Path, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 16) -> np.ndarray:
    """(N, H, W, 3) uint8 images, one per prompt, each from its own seeded generator."""
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        generators = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np")
        images.append((out.images * 255).round().astype(np.uint8))  # (B, H, W, 3)
    return np.concatenate(images)


def evaluate(model: Path, n: int, steps: int, guidance: float, seed: int) -> tuple[dict, np.ndarray]:
    """Accuracy overall and per group ('held_out', 'seen', 'two_object'), and the images."""
    chosen = pick_prompts(n)
    images = generate(model, [p for p, _ in chosen], steps, guidance, seed)
    results = [score(img, scene) for img, (_, scene) in zip(images, chosen)]
    report = {"all": summarize(results)}
    for group in ("held_out", "seen", "two_object"):
        members = [r for r, (_, s) in zip(results, chosen) if scene_group(s) == group]
        if members:
            report[group] = summarize(members)
    return report, images


def save_grid(images: np.ndarray, path: Path, columns: int = 16) -> None:
    rows = -(-len(images) // columns)
    padded = np.concatenate([images, np.zeros((rows * columns - len(images), *images.shape[1:]), np.uint8)])
    h, w = images.shape[1:3]
    grid = padded.reshape(rows, columns, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, 3)
    Image.fromarray(grid).save(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="a folder written by default_model.train")
    ap.add_argument("--n", type=int, default=len(eval_prompts()), help="prompts to generate (default: all)")
    ap.add_argument("--steps", type=int, default=25, help="PNDM steps")
    ap.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", type=Path, default=None, help="save the images as one PNG grid")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    report, images = evaluate(a.model, a.n, a.steps, a.guidance, a.seed)
    if a.grid is not None:
        save_grid(images, a.grid)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
