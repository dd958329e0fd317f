"""Peak RSS of `edge generate` under memory budgets, measured by the OS, against the planner's estimate.

    python benchmarks/memory_budget.py BUNDLE [--budgets none,4GB,2GB] [--size 512] [--steps 3] [-o DIR]

For each budget: `edge plan` (the estimate), then `edge generate --memory-budget B` in a fresh process
whose peak RSS the kernel reports (wait4, as `/usr/bin/time -v` does), and its wall time and per-step
latency; and, with `none` run first, each budget's picture against the unconstrained one (PSNR). Any bundle works,
so larger families are measured the same way. Writes DIR/budgets.json and DIR/budgets.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from edge.bundle import read_manifest
from edge.memprobe import run_measured
from edge.metrics import psnr
from edge.plan import parse_bytes

GiB = 2**30


def _edge(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge.cli", *args]


def run_budget(bundle: Path, budget: str | None, size: int, steps: int, out: Path, prompt: str) -> dict:
    tag = budget or "none"
    flags = [] if budget is None else ["--memory-budget", budget]
    estimate, plan_text = None, ""
    if budget is not None:
        with open(out / f"plan-{tag}.txt", "w") as f:
            status, _ = run_measured(_edge("plan", str(bundle), *flags, "--height", str(size), "--width", str(size)),
                                     stdout=f, stderr=f)
        plan_text = (out / f"plan-{tag}.txt").read_text()
        if status != 0:
            return {"budget": budget, "refused": plan_text.strip()}
        estimate = _size_of(re.search(r"estimated peak ([0-9.]+ [KMG]?B)", plan_text).group(1))
    t = time.perf_counter()
    with open(out / f"generate-{tag}.log", "w") as log:
        status, peak = run_measured(_edge("generate", str(bundle), prompt, *flags, "--steps", str(steps),
                                          "--height", str(size), "--width", str(size), "--seed", "0",
                                          "-o", str(out / f"image-{tag}.png")), stdout=log, stderr=log)
    wall = time.perf_counter() - t
    text = (out / f"generate-{tag}.log").read_text()
    db = None
    if budget is not None and status == 0 and (out / "image-none.png").is_file():  # the picture a plan changes
        db = float(psnr(*(np.asarray(Image.open(out / f"image-{t}.png"), np.float64) for t in ("none", tag)),
                        peak=255.0))
    timing = re.search(r"unet [0-9.]+s \(([0-9.]+)s/step\).*vae decoder ([0-9.]+)s \| total ([0-9.]+)s", text)
    return {
        "budget": budget, "budget_bytes": None if budget is None else parse_bytes(budget), "status": status,
        "peak_rss_bytes": peak, "estimate_bytes": estimate,
        "estimate_error": None if estimate is None else (estimate - peak) / peak,
        "within_budget": None if budget is None else peak <= parse_bytes(budget),
        "wall_s": wall, "unet_s_per_step": float(timing.group(1)) if timing else None,
        "vae_decode_s": float(timing.group(2)) if timing else None,
        "generate_s": float(timing.group(3)) if timing else None, "psnr_vs_none_db": db, "plan": plan_text,
    }


def _size_of(text: str) -> int:
    value, unit = text.split()
    return int(float(value) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[unit])


def markdown(bundle: Path, rows: list[dict], size: int, steps: int) -> str:
    m = read_manifest(bundle)
    unet = m.components["unet"]
    disk = sum(c.bytes for c in m.components.values())
    lines = [f"`{bundle.name}`: {unet.precision} UNet, attention {unet.attention.get('kernel', '-')}"
             f"{' (' + str(unet.attention['chunk']) + ')' if unet.attention.get('chunk') else ''}, "
             f"{len(unet.chunks) or 1} UNet chunk(s), {disk / GiB:.2f} GB on disk; {size}x{size}, {steps} steps",
             "", "| budget | peak RSS (OS) | estimate | error | fits | UNet s/step | VAE s | wall s | PSNR vs none |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['budget']} | refused: {r['refused'].splitlines()[-1]} | | | | | | | |")
            continue
        est = "-" if r["estimate_bytes"] is None else f"{r['estimate_bytes'] / GiB:.2f} GB"
        err = "-" if r["estimate_error"] is None else f"{100 * r['estimate_error']:+.0f}%"
        fits = "-" if r["within_budget"] is None else ("yes" if r["within_budget"] else "**no**")
        lines.append(f"| {r['budget'] or 'none'} | {r['peak_rss_bytes'] / GiB:.2f} GB | {est} | {err} | {fits} | "
                     f"{r['unet_s_per_step']} | {r['vae_decode_s']} | {r['wall_s']:.0f} | "
                     f"{'-' if r.get('psnr_vs_none_db') is None else format(r['psnr_vs_none_db'], '.1f') + ' dB'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--budgets", default="none,4GB,2GB", help="comma-separated; 'none' runs unconstrained")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument("-o", "--out", type=Path, default=Path("bench-results/budgets"))
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for budget in a.budgets.split(","):
        budget = None if budget.strip().lower() == "none" else budget.strip()
        print(f"budget {budget or 'none'} ...", flush=True)
        rows.append(run_budget(a.bundle, budget, a.size, a.steps, a.out, a.prompt))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "plan"}), flush=True)
    (a.out / "budgets.json").write_text(json.dumps({"bundle": str(a.bundle), "size": a.size, "steps": a.steps,
                                                    "runs": rows}, indent=1) + "\n")
    table = markdown(a.bundle, rows, a.size, a.steps)
    (a.out / "budgets.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
