"""The default model's scorer accuracy per precision and attention kernel (issue 5's fidelity table).

    python benchmarks/eval_precisions.py [-o bench-results/precisions]

Converts the default model once per variant with `--score` (204 evaluation prompts, euler, 25 steps,
guidance 5, through the edge runtime) and tabulates the manifests: per-component PSNR against fp32,
bundle size, and accuracy against the fp32 bundle.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge.converters.convert import Options, convert

VARIANTS = {
    "fp32": Options(),  # fused attention, the default
    "fp32 original": Options(attention="original"),
    "fp16": Options(precision="fp16"),
    "int8": Options(precision="int8"),
    "int8+conv": Options(precision="int8", quantize_ops=("MatMul", "Gemm", "Conv")),
    "int8 static": Options(precision="int8", activations="static"),  # calibrated QLinearConv UNet
    "int4": Options(precision="int4"),
    "fp32 sliced(16)": Options(attention="sliced", attention_chunk=16),
    "fp32 split_einsum": Options(attention="split_einsum"),
    "int8 sliced(16) 2 chunks": Options(precision="int8", attention="sliced", attention_chunk=16, split_unet=2),
}
FIELDS = ("background", "color", "shape", "position", "all")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=Path("bench-results/precisions"))
    ap.add_argument("--only", help="comma-separated variant names")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, options in VARIANTS.items():
        if a.only and name not in a.only.split(","):
            continue
        bundle = a.out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")
        if not (bundle / "manifest.json").exists():
            convert("default", bundle, options=options, score=True, overwrite=True, log=print)
        rows[name] = json.loads((bundle / "manifest.json").read_text())
    base = rows.get("fp32", {}).get("fidelity", {}).get("all", {})
    lines = ["| variant | size MB | UNet PSNR vs fp32 | text enc. PSNR vs fp32 | "
             + " | ".join(FIELDS) + " | all vs fp32 |", "|---|---:|---:|---:|" + "---:|" * (len(FIELDS) + 1)]
    for name, m in rows.items():
        c = m["components"]
        size = sum(v["bytes"] for v in c.values()) / 1e6
        q = [c[k].get("quantization", {}).get("psnr_vs_fp32_db") for k in ("unet", "text_encoder")]
        acc = m["fidelity"]["all"]
        delta = "" if not base else f"{100 * (acc['all'] - base['all']):+.1f}"
        lines.append(f"| {name} | {size:.1f} | " + " | ".join("-" if v is None else f"{v:.1f} dB" for v in q)
                     + " | " + " | ".join(f"{100 * acc[f]:.1f}%" for f in FIELDS) + f" | {delta} |")
    table = "\n".join(lines) + "\n"
    (a.out / "precisions.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
