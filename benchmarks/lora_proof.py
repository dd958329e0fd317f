"""The LoRA example on the default model: does it teach the new shape, and what does it cost the others?

    python benchmarks/lora_proof.py [--lora converters/assets/loras/cross.safetensors] [-o bench-results/lora-proof]
                                    [--grid benchmarks/images/lora_cross.png]

Converts the default model (once, into OUT/bundle), then generates through the edge runtime, with and without the
LoRA (applied at run time, `loras=[(file, scale)]`): the 30 prompts of the taught shape (every colour x position,
scenes.taught_eval_prompts) and every third of the 204 evaluation prompts (68). The scorer reads every image with
the taught shapes added to its vocabulary, with the LoRA and without, so a cross drawn where a circle was asked
counts as wrong. Euler, 25 steps, guidance 5, prompt k with seed k, as `edge convert --score`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from edge.eval.fidelity import FIELDS, generate_scored, grouped
from edge.eval.scenes import SHAPES, TAUGHT_SHAPES, eval_prompts, taught_eval_prompts

REPO = Path(__file__).resolve().parents[1]
LORA = REPO / "converters" / "assets" / "loras" / "cross.safetensors"


def bundle_for(out: Path) -> Path:
    bundle = out / "bundle"
    if not (bundle / "manifest.json").exists():
        from edge.converters.convert import convert

        convert("default", bundle, overwrite=True, log=print)
    return bundle


def run(bundle: Path, lora: Path, scale: float, steps: int, threads: int) -> tuple[dict, dict]:
    """{prompt set: {'without' | 'with': grouped report}}, and the taught set's images per case."""
    from edge.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=threads)
    sets = {"taught": taught_eval_prompts(TAUGHT_SHAPES[0]), "evaluation": eval_prompts()[::3]}
    report, images = {}, {}
    for case, loras in (("without", []), ("with", [(lora, scale)])):
        for name, prompts in sets.items():
            t0 = time.perf_counter()
            results, pictures = generate_scored(pipe, prompts, steps=steps, shapes=SHAPES + TAUGHT_SHAPES,
                                                options={"loras": loras})
            report.setdefault(name, {})[case] = {**grouped(results, prompts),
                                                 "seconds": round(time.perf_counter() - t0, 1)}
            if name == "taught":
                images[case] = pictures
    return report, images


def save_grid(images: dict, path: Path, columns: int = 10) -> None:
    """Two rows per block of `columns` taught prompts: without the LoRA above, with it below."""
    rows = []
    for start in range(0, len(images["without"]), columns):
        for case in ("without", "with"):
            rows.append(np.concatenate(images[case][start:start + columns], axis=1))  # (H, columns * W, 3)
    grid = np.concatenate(rows, axis=0)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(tmp)
    os.replace(tmp, path)


def markdown(report: dict) -> str:
    lines = ["| prompts | LoRA | n | " + " | ".join(FIELDS) + " |", "|---|---|---:|" + "---:|" * len(FIELDS)]
    for name, cases in report.items():
        for case, r in cases.items():
            a = r["all"]
            lines.append(f"| {name} | {case} | {a['n']:.0f} | " + " | ".join(f"{100 * a[f]:.1f}%" for f in FIELDS)
                         + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", type=Path, default=LORA)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-o", "--out", type=Path, default=Path("bench-results/lora-proof"))
    ap.add_argument("--grid", type=Path, default=None, help="save the taught prompts' images, without / with")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    report, images = run(bundle_for(a.out), a.lora, a.scale, a.steps, a.threads)
    if a.grid is not None:
        save_grid(images, a.grid)
    (a.out / "lora_proof.json").write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
