"""Core ML conversion of the full-size SD 1.5 architecture: time, the converter's peak RSS, sizes, parity.

    python benchmarks/coreml_sd15.py [SOURCE] [--compressions none,int8] [--deployment-target iOS18] [--only unet] [-o DIR]

SOURCE defaults to the cached random-weight SD 1.5 folder (converters/arch.py): the architecture and weight
count are SD 1.5's, so conversion cost, chunking and sizes are too; parity figures are against its own
torch modules. Each compression runs `edge convert SOURCE --target coreml` (or, with --only, just those graphs
through the library) in a fresh process whose peak RSS the kernel reports (wait4, as `/usr/bin/time -v`).
Writes DIR/coreml-NAME-TARGET.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from edge.memprobe import run_measured

SD15 = Path.home() / ".cache" / "edge-diffusion" / "models" / "sd15-random"
ONLY_SCRIPT = """
import json, sys, torch
from pathlib import Path
from edge.converters.sources import open_source
from edge.converters.coreml.convert import CoreMLOptions, build_coreml
torch.set_num_threads(int(sys.argv[5]))
out = Path(sys.argv[2]); out.mkdir(parents=True)
compression = None if sys.argv[3] == "none" else sys.argv[3]
split = None if sys.argv[7] == "none" else int(sys.argv[7])
section = build_coreml(open_source(sys.argv[1]).pipe, out, CoreMLOptions(compression=compression,
                                                                          deployment_target=sys.argv[6], split_unet=split),
                       only=tuple(sys.argv[4].split(",")))
(out / "manifest.json").write_text(json.dumps({"coreml": section}))
"""


def convert_measured(source: str, out: Path, compression: str, target: str, only: str | None, threads: int,
                     log: Path, split: int | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if only is None:
        argv = [sys.executable, "-m", "edge.cli", "convert", source, "-o", str(out), "--target", "coreml",
                "--overwrite", "--coreml-target", target] + ([] if compression == "none" else
                                                              ["--coreml-compression", compression]) + \
               ([] if split is None else ["--split-unet", str(split)])
    else:
        argv = [sys.executable, "-c", ONLY_SCRIPT, source, str(out), compression, only, str(threads), target,
                str(split).lower()]
    t = time.perf_counter()
    with open(log, "w") as f:
        status, peak = run_measured(argv, stdout=f, stderr=f)
    wall = time.perf_counter() - t
    if status != 0:
        return {"compression": compression, "status": status, "wall_s": round(wall, 1), "peak_rss_bytes": peak,
                "log_tail": log.read_text()[-2000:]}
    section = json.loads((out / "manifest.json").read_text())["coreml"]
    components = {}
    for name, c in section["components"].items():
        components[name] = {
            "bytes": c["bytes"], "weight_bytes": c["weight_bytes"], "parameters": c["parameters"],
            "precision": c["precision"], "convert_seconds": c.get("convert_seconds"),
            "rewrite_psnr_db": c["parity"]["rewrite_psnr_db"], "fp16_vs_fp32_psnr_db": c["parity"]["fp16_vs_fp32_psnr_db"],
            "compressed_output_psnr_db": c["quantization"].get("output_psnr_db"),
            "compressed_min_weight_psnr_db": c["quantization"].get("min_weight_psnr_db"),
            "compressed_weights_checked": (f"{c['quantization']['weights_checked']}/"
                                           f"{c['quantization']['weights_compressed']}" if c["quantization"] else None),
            "chunks": [{"file": k["file"], "weight_bytes": k["weight_bytes"], "inputs": len(k["inputs"]),
                        "outputs": len(k["outputs"])} for k in c.get("chunks", [])],
        }
    return {"compression": compression, "target": target, "status": 0, "wall_s": round(wall, 1), "peak_rss_bytes": peak,
            "components": components}


def markdown(runs: list[dict]) -> str:
    rows = ["| compression | component | precision | weights MB | chunks (weights MB) | rewrite dB | fp16 dB | "
            "compressed dB (output / worst weight) | convert s |", "|---|---|---|---:|---|---:|---:|---|---:|"]
    for r in runs:
        if r["status"] != 0:
            rows.append(f"| {r['compression']} | failed (status {r['status']}) | | | | | | | {r['wall_s']} |")
            continue
        for name, c in r["components"].items():
            chunks = ", ".join(f"{k['weight_bytes'] / 1e6:.1f}" for k in c["chunks"]) or "1"
            lossy = ("-" if c["compressed_output_psnr_db"] is None else
                     f"{c['compressed_output_psnr_db']:.1f} / {c['compressed_min_weight_psnr_db']:.1f}")
            rows.append(f"| {r['compression']} | {name} | {c['precision']} | {c['weight_bytes'] / 1e6:.1f} | {chunks} | "
                        f"{c['rewrite_psnr_db']:.1f} | {c['fp16_vs_fp32_psnr_db']} | {lossy} | {c['convert_seconds']} |")
        rows.append(f"| {r['compression']} | **whole run** | | | | | | peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
                    f"{r['wall_s']} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", nargs="?", default=str(SD15))
    ap.add_argument("--compressions", default="none", help="comma-separated: none, int8, palettize6, palettize4")
    ap.add_argument("--deployment-target", default="iOS17", help="iOS17, iOS18 (per-block / grouped palettes), ...")
    ap.add_argument("--split-unet", type=int, help="UNet chunks (default: the fewest under 1 GB each)")
    ap.add_argument("--only", help="comma-separated graphs (text_encoder, unet, vae_decoder, vae_encoder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("build/sd15-coreml"))
    ap.add_argument("-o", "--output", type=Path, default=Path("bench-results"))
    a = ap.parse_args()
    a.output.mkdir(parents=True, exist_ok=True)
    runs = []
    for compression in a.compressions.split(","):
        log = a.output / f"coreml-{Path(a.source).name}-{compression}-{a.deployment_target}.log"
        run = convert_measured(a.source, a.out, compression, a.deployment_target, a.only, a.threads, log, a.split_unet)
        runs.append(run)
        print(f"{compression}: status {run['status']}, {run['wall_s']}s, peak RSS {run['peak_rss_bytes'] / 2**30:.2f} GiB",
              flush=True)
        (a.output / f"coreml-{Path(a.source).name}-{a.deployment_target}.json").write_text(json.dumps(runs, indent=1) + "\n")
    shutil.rmtree(a.out, ignore_errors=True)
    print(markdown(runs))


if __name__ == "__main__":
    main()
