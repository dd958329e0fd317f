"""The negative LoRA on the default model: its trigger as the negative prompt, are the pictures more right, sharper?

    python benchmarks/negative_lora.py [--lora converters/assets/loras/wrong.safetensors] [--scales 0.5 1 1.5]
                                       [--every 1] [--threads 1] [-o bench-results/negative-lora]
                                       [--grid benchmarks/images/negative_lora.png]

Converts the default model (once, into OUT/bundle), then generates the evaluation prompts (every `--every`-th of
the 204, in order) through the edge runtime, euler, 25 steps, guidance 5, prompt k with seed k, in these cases:
baseline (no LoRA, empty negative prompt); the LoRA at each scale with its trigger as the negative prompt; two
controls: the trigger as the negative prompt without the LoRA (the untrained token alone), and the LoRA at
`--control-scale` with an empty negative prompt; and, to show what the negative branch steers away from, the LoRA
with the trigger appended to the prompt itself (it should draw corrupted scenes). The run-time LoRA changes both
halves of classifier-free guidance, the prompt's as well as the negative prompt's.
Reports the scorer's accuracy per field, and per image (means): RMS gradient and Laplacian variance of the luma
(sharpness; noise raises both), and PSNR against the clean render of the target scene. The first two rows: the
renders themselves, and their VAE round trip (the sharpest the decoder draws exactly the right latents). Per case
against the baseline (the same prompts and seeds, so the pairs compare like with like): how many prompts turned
all-correct / stopped being all-correct, and each measure's mean per-prompt difference with its standard error (in
brackets; per-image values in the JSON); and the negative prompt's own effect, against the LoRA control.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from edge.converters.default_model.train_negative_lora import TRIGGER, gradient, laplacian_variance, psnr
from edge.eval.fidelity import FIELDS, generate_scored, grouped
from edge.eval.scenes import Scene, eval_prompts, render
from edge.eval.scorer import score

REPO = Path(__file__).resolve().parents[1]
LORA = REPO / "converters" / "assets" / "loras" / "wrong.safetensors"
GRID_PROMPTS = 6  # rows of the grid: evenly spaced over the prompts run


def bundle_for(out: Path) -> Path:
    bundle = out / "bundle"
    if not (bundle / "manifest.json").exists():
        from edge.converters.convert import convert

        convert("default", bundle, overwrite=True, log=print)
    return bundle


def cases(lora: Path, scales: list[float], control: float) -> dict[str, tuple[str, dict]]:
    """{case name: (suffix for every prompt, generate() keywords)}; the LoRA controls run at scale `control`."""
    top = control
    out = {"baseline": ("", {"loras": [], "negative_prompt": ""}),
           f"trigger only (no LoRA), neg '{TRIGGER}'": ("", {"loras": [], "negative_prompt": TRIGGER})}
    for s in scales:
        out[f"LoRA {s:g}, neg '{TRIGGER}'"] = ("", {"loras": [(lora, s)], "negative_prompt": TRIGGER})
    out[f"LoRA {top:g}, empty neg"] = ("", {"loras": [(lora, top)], "negative_prompt": ""})
    # what the negative branch steers away from: the trigger in the prompt itself
    out[f"LoRA {top:g}, prompt + ', {TRIGGER}'"] = (f", {TRIGGER}", {"loras": [(lora, top)], "negative_prompt": ""})
    return out


def per_image(images: list[np.ndarray], scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Each image's sharpness measures and PSNR to its target's clean render, each (N,)."""
    targets = [render(s, images[0].shape[0]) for s in scenes]
    return {"rms_gradient": np.array([gradient(i) for i in images]),
            "laplacian_var": np.array([laplacian_variance(i) for i in images]),
            "psnr_db": np.array([psnr(i, t) for i, t in zip(images, targets)])}


def paired(case: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Per measure: [mean, standard error] of the per-prompt difference case - base (same prompts, same seeds)."""
    return {k: [float((case[k] - base[k]).mean()), float((case[k] - base[k]).std(ddof=1) / np.sqrt(len(base[k])))]
            for k in case}


def compare(case: tuple[np.ndarray, dict], base: tuple[np.ndarray, dict]) -> dict:
    """(all-correct (N,) bool, per_image measures) of a case against a base: prompts fixed, broken, paired deltas."""
    return {"fixed": int((case[0] & ~base[0]).sum()), "broken": int((~case[0] & base[0]).sum()),
            **paired(case[1], base[1])}


def vae_round_trip(prompts: list[tuple[str, Scene]]) -> dict:
    """Accuracy and measures of the targets' renders through the default model's VAE (posterior mean): the
    sharpest pictures its decoder draws of exactly the right latents."""
    import torch

    from edge.converters.default_model import data, models
    from edge.converters.default_model.train_negative_lora import encode
    from edge.converters.default_model.train_lora import DEFAULT_MODEL

    torch.set_num_threads(1)
    scenes = [s for _, s in prompts]
    vae = models.load_pipeline(DEFAULT_MODEL).vae
    with torch.no_grad():
        images = list(data.to_uint8(vae.decode(encode(vae, np.stack([render(s) for s in scenes]))[0]).sample))
    return {**grouped([score(i, s) for i, s in zip(images, scenes)], prompts),
            **{k: float(v.mean()) for k, v in per_image(images, scenes).items()}}


def run(bundle: Path, lora: Path, scales: list[float], control: float, prompts: list[tuple[str, Scene]], steps: int,
        threads: int | None) -> tuple[dict, dict]:
    """{case: report}, and every case's images (case -> list of (H, W, 3) uint8)."""
    from edge.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=threads)
    scenes = [s for _, s in prompts]
    targets = [render(s) for s in scenes]
    report = {"target (clean render)": {"rms_gradient": float(np.mean([gradient(t) for t in targets])),
                                        "laplacian_var": float(np.mean([laplacian_variance(t) for t in targets]))},
              "target through the VAE": vae_round_trip(prompts)}
    images, outcome = {}, {}
    for name, (suffix, options) in cases(lora, scales, control).items():
        t0 = time.perf_counter()
        asked = [(p + suffix, s) for p, s in prompts]
        results, images[name] = generate_scored(pipe, asked, steps=steps, guidance=5.0, options=options)
        outcome[name] = (np.array([r["all"] for r in results]), per_image(images[name], scenes))
        report[name] = {**grouped(results, prompts), **{k: float(v.mean()) for k, v in outcome[name][1].items()},
                        "seconds": round(time.perf_counter() - t0, 1),
                        "per_image": {k: [round(float(x), 3) for x in v] for k, v in outcome[name][1].items()}}
        if name != "baseline":
            report[name]["vs_baseline"] = compare(outcome[name], outcome["baseline"])
        print(f"{name}: all {100 * report[name]['all']['all']:.1f}%  {report[name]['seconds']}s", flush=True)
    negative, empty = f"LoRA {control:g}, neg '{TRIGGER}'", f"LoRA {control:g}, empty neg"
    if negative in outcome:  # the negative prompt's own effect, the LoRA loaded in both
        report[negative]["vs_lora_control"] = compare(outcome[negative], outcome[empty])
    return report, images


def save_grid(images: dict[str, list[np.ndarray]], targets: list[np.ndarray], path: Path) -> None:
    """Rows: GRID_PROMPTS prompts evenly spaced; columns: the clean target render, then each case; 2x nearest."""
    rows = np.linspace(0, len(targets) - 1, GRID_PROMPTS).round().astype(int)
    gap = np.full((targets[0].shape[0], 4, 3), 255, np.uint8)  # (H, 4, 3) white
    grid = np.concatenate([np.concatenate([targets[k], gap] + [images[c][k] for c in images], axis=1)
                           for k in rows], axis=0)  # (rows * H, (cases + 1) * W + 4, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(tmp)
    os.replace(tmp, path)


def _cell(r: dict, key: str, digits: int, unit: str = "") -> str:
    """A measure's mean, with its paired difference to the baseline in brackets where there is one."""
    if key not in r:
        return ""
    vs = r.get("vs_baseline")
    delta = "" if vs is None else f" ({vs[key][0]:+.{digits}f} ± {vs[key][1]:.{digits}f})"
    return f"{r[key]:.{digits}f}{delta}{unit}"


def markdown(report: dict) -> str:
    head = ["case", "n", *FIELDS, "fixed / broken", "RMS gradient", "Laplacian var", "PSNR to render"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, r in report.items():
        a, vs = r.get("all", {}), r.get("vs_baseline")
        accuracy = [f"{a['n']:.0f}" if a else ""] + [f"{100 * a[f]:.1f}%" if a else "" for f in FIELDS]
        flips = "" if vs is None else f"+{vs['fixed']} / −{vs['broken']}"
        lines.append(f"| {name} | " + " | ".join(accuracy) + f" | {flips} | {_cell(r, 'rms_gradient', 2)} | "
                     f"{_cell(r, 'laplacian_var', 0)} | {_cell(r, 'psnr_db', 2, ' dB')} |")
    for name, r in report.items():
        if "vs_lora_control" in r:
            c = r["vs_lora_control"]
            lines.append(f"\n{name} against the same LoRA with an empty negative prompt: +{c['fixed']} / "
                         f"−{c['broken']} all-correct, RMS gradient {c['rms_gradient'][0]:+.2f} ± "
                         f"{c['rms_gradient'][1]:.2f}, Laplacian var {c['laplacian_var'][0]:+.0f} ± "
                         f"{c['laplacian_var'][1]:.0f}, PSNR {c['psnr_db'][0]:+.2f} ± {c['psnr_db'][1]:.2f} dB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", type=Path, default=LORA)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    ap.add_argument("--control-scale", type=float, default=1.0, help="the LoRA's scale in the two LoRA controls")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--every", type=int, default=1, help="every N-th evaluation prompt (1: all 204)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-o", "--out", type=Path, default=Path("bench-results/negative-lora"))
    ap.add_argument("--grid", type=Path, default=None, help="save a few prompts x cases as one PNG")
    a = ap.parse_args(argv)
    if not a.lora.is_file():
        ap.error(f"--lora {a.lora}: no such file; train it with edge.converters.default_model.train_negative_lora")
    if a.every < 1 or min(a.scales + [a.control_scale]) <= 0:
        ap.error(f"--every {a.every}, --scales {a.scales}, --control-scale {a.control_scale}: expected every >= 1 "
                 "and positive scales")
    a.out.mkdir(parents=True, exist_ok=True)
    prompts = eval_prompts()[::a.every]
    report, images = run(bundle_for(a.out), a.lora, a.scales, a.control_scale, prompts, a.steps, a.threads)
    report = {"lora": str(a.lora), "trigger": TRIGGER, "steps": a.steps, "guidance": 5.0, "scheduler": "euler",
              "every": a.every, "prompts": len(prompts), "cases": report}
    if a.grid is not None:
        save_grid(images, [render(s) for _, s in prompts], a.grid)
    (a.out / "negative_lora.json").write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report["cases"]))


if __name__ == "__main__":
    main()
