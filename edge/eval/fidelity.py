"""The project's fidelity yardstick: generate the fixed evaluation prompts with a bundle and score them.

Runs on the device runtime (no torch), so every precision, kernel and backend is scored the same way.

    python -m edge.eval.fidelity BUNDLE [--steps 25] [--guidance 5] [--scheduler euler] [-o report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from edge.eval.scenes import eval_prompts, scene_group
from edge.eval.scorer import score, summarize

GROUPS = ("held_out", "seen", "two_object")
FIELDS = ("background", "color", "shape", "position", "all")


def evaluate_bundle(bundle: Path | str, *, steps: int = 25, guidance: float = 5.0, scheduler: str = "euler",
                    seed: int = 0, limit: int | None = None, threads: int | None = None,
                    grid: Path | None = None, options: dict | None = None) -> dict:
    """Accuracy per field, overall and per group; prompt k uses seed `seed + k`. `options`: more keywords for
    every generate() (e.g. cache_interval, decoder)."""
    from edge.pipeline import Pipeline

    prompts = eval_prompts() if limit is None else eval_prompts()[:limit]
    pipe = Pipeline.load(bundle, threads=threads)
    t0 = time.perf_counter()
    results, images = [], []
    for k, (prompt, scene) in enumerate(prompts):
        image = np.asarray(pipe.generate(prompt, steps=steps, guidance=guidance, scheduler=scheduler,
                                         seed=seed + k, **(options or {})).images[0])
        results.append(score(image, scene))
        images.append(image)
    report = {
        "bundle": str(bundle), "bundle_id": pipe.manifest.bundle_id, "steps": steps, "guidance": guidance,
        "scheduler": scheduler, "seed": seed, "prompts": len(prompts),
        "seconds": round(time.perf_counter() - t0, 1), "all": summarize(results),
    }
    for group in GROUPS:
        members = [r for r, (_, s) in zip(results, prompts) if scene_group(s) == group]
        if members:
            report[group] = summarize(members)
    if grid is not None:
        save_grid(np.stack(images), grid)
    return report


def markdown(report: dict) -> str:
    rows = ["| prompts | n | " + " | ".join(FIELDS) + " |", "|---|---:|" + "---:|" * len(FIELDS)]
    for group in ("all", *GROUPS):
        if group in report:
            r = report[group]
            rows.append(f"| {group} | {r['n']} | " + " | ".join(f"{100 * r[f]:.1f}%" for f in FIELDS) + " |")
    return "\n".join(rows)


def save_grid(images: np.ndarray, path: Path, columns: int = 17) -> None:
    from PIL import Image

    n, h, w, _ = images.shape  # (N, H, W, 3)
    rows = -(-n // columns)
    padded = np.concatenate([images, np.zeros((rows * columns - n, h, w, 3), np.uint8)])
    grid = padded.reshape(rows, columns, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, 3)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--scheduler", default="euler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--grid", type=Path, help="also save every image in one PNG")
    ap.add_argument("-o", "--output", type=Path, help="write the report as JSON")
    a = ap.parse_args(argv)
    report = evaluate_bundle(a.bundle, steps=a.steps, guidance=a.guidance, scheduler=a.scheduler, seed=a.seed,
                             limit=a.limit, threads=a.threads, grid=a.grid)
    print(markdown(report))
    if a.output is not None:
        a.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
