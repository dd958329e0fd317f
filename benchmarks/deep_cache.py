"""DeepCache: speed and quality of `--cache-interval N` against the uncached run at the same seed.

    python benchmarks/deep_cache.py BUNDLE [--intervals 1,2,3,5] [--images 16] [--score] [--height H --width W]

BUNDLE must be converted with `--deep-cache`. For each interval: UNet time per step (median over the images'
runs), image PSNR against the uncached image of the same prompt and seed, and with --score (the default model
only) the scorer's accuracy on the 204-prompt evaluation set (edge.eval). Prints one JSON document; the figures
in benchmarks/RESULTS.md came from it, with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from edge import Pipeline
from edge.cpu import cpu_model, features
from edge.metrics import psnr

PROMPTS = ["a red circle on a blue background", "a large yellow square on a black background",
           "a large green triangle on a white background", "a small white diamond on the left, red background"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--intervals", default="1,2,3,5")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--score", action="store_true", help="the default model's scorer on its evaluation set")
    a = p.parse_args()
    intervals = [int(n) for n in a.intervals.split(",")]
    pipe = Pipeline.load(a.bundle)
    rows = {}
    base: list[np.ndarray] = []
    for n in intervals:
        per_step, db = [], []
        for k in range(a.images):
            r = pipe.generate(PROMPTS[k % len(PROMPTS)], steps=a.steps, guidance=a.guidance, seed=k,
                              height=a.height, width=a.width, cache_interval=n)
            per_step.append(r.timings["unet_per_step"])
            image = np.asarray(r.images[0])
            if n == intervals[0]:
                base.append(image)
            db.append(psnr(base[k], image, peak=255.0))
        rows[n] = {"unet_s_per_step": round(statistics.median(per_step), 4),
                   "psnr_vs_interval_%d_db" % intervals[0]: {"mean": round(float(np.mean(db)), 2),
                                                             "min": round(float(np.min(db)), 2)}}
        if a.score:
            from edge.eval.fidelity import evaluate_bundle

            report = evaluate_bundle(a.bundle, options={"cache_interval": n})
            rows[n]["scorer"] = {g: report[g] for g in ("all", "held_out", "seen", "two_object") if g in report}
        print(f"interval {n}: {rows[n]}", flush=True)
    print(json.dumps({"cpu": cpu_model(), "features": features().describe(), "bundle": str(a.bundle),
                      "size": [a.height, a.width], "steps": a.steps, "images": a.images, "intervals": rows},
                     indent=2))


if __name__ == "__main__":
    main()
