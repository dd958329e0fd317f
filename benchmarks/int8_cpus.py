"""The same int8 bundles on every kind of CPU: the PSNR each int8 graph reaches against its fp32 graph, with
edge's session options (edge.cpu) and with onnxruntime's defaults, on this CPU and on emulated ones.

    python benchmarks/int8_cpus.py [--out build/int8-cpus]     # ~5 min: converts, then runs under QEMU

Bundles: the default model as `--precision int8` (dynamic) and `--precision int8 --activations static`
(UNet in 2 chunks), and the tiny random-weight test model's int8 graphs (tests/test_quantize.py's case).
CPUs: this one; x86 AVX2-only (QEMU "EPYC" = AMD Zen 1, "Haswell") through apps/x86/emulate.sh; arm64
Cortex-A72 (Raspberry Pi 4: no dot product), Neoverse-N1 (dot product), QEMU "max" without SME (dot
product, i8mm, SVE) and with SME, through apps/arm/run.sh (apps/arm/make_sysroot.sh first).
Each graph runs on the inputs its manifest figure was measured on (`checks/*.npz`, see edge.selfcheck).
Prints a markdown table; emulation measures correctness only, never speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
X86 = [("EPYC", "x86 AVX2, AMD EPYC Zen 1 (emulated)"), ("Haswell", "x86 AVX2, Intel Haswell (emulated)")]
ARM = [("cortex-a72", "arm64 Cortex-A72, Pi 4 (emulated)"), ("neoverse-n1", "arm64 Neoverse-N1 (emulated)"),
       ("max,sme=off", "arm64 dotprod+i8mm+SVE (emulated)"), ("max", "arm64 ... + SME (emulated)")]
PROBE = r"""
import json, sys
from pathlib import Path
import onnxruntime as ort
from edge.cpu import features
from edge.selfcheck import check_bundle
out = {"cpu": features().describe()}
for bundle in map(Path, sys.argv[1:]):
    for mode, options in (("edge", None), ("default", ort.SessionOptions())):
        for r in check_bundle(bundle, options=options, verify=mode == "edge"):
            out[f"{bundle.name}/{r['component']}/{mode}"] = r["measured_db"]
            out[f"{bundle.name}/{r['component']}/manifest"] = r["recorded_db"]
print(json.dumps(out))
"""


def _bundles(out: Path) -> list[Path]:
    edge = [sys.executable, "-m", "edge.cli"]
    wanted = {"default-int8": ["--precision", "int8"],
              "default-int8-static": ["--precision", "int8", "--activations", "static", "--split-unet", "2"]}
    for name, flags in wanted.items():
        if not (out / name / "manifest.json").is_file():
            subprocess.run([*edge, "convert", "default", "-o", str(out / name), *flags, "--no-memory-profile",
                            "--no-tiled-vae", "--overwrite"], check=True, cwd=REPO, capture_output=True)
    tiny = out / "tiny-int8"
    if not (tiny / "manifest.json").is_file():
        from edge.converters.convert import Options, convert
        from edge.converters.tiny import save_tiny

        model = save_tiny(out / "tiny-model", prediction_type="epsilon", seed=1)
        convert(str(model), tiny, options=Options(precision="int8", profile_memory=False, tiled_vae=False),
                log=lambda s: None, overwrite=True)
    return [out / n for n in (*wanted, "tiny-int8")]


def _probe(command: list[str], bundles: list[Path], env: dict | None = None) -> dict:
    proc = subprocess.run([*command, "-c", PROBE, *map(str, bundles)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {}), "PYTHON": sys.executable}, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "build/int8-cpus")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    bundles = _bundles(a.out)
    runs = [("this CPU (native)", _probe([sys.executable], bundles))]
    runs += [(label, _probe(["bash", str(REPO / "apps/x86/emulate.sh"), cpu], bundles)) for cpu, label in X86]
    runs += [(label, _probe(["bash", str(REPO / "apps/arm/run.sh")], bundles, {"QEMU_CPU": cpu})) for cpu, label in ARM]
    keys = sorted({k.rsplit("/", 1)[0] for k in runs[0][1] if "/" in k})
    print("| CPU | int8 path | " + " | ".join(f"{k} edge / default" for k in keys) + " |")
    print("|---|---|" + "---:|" * len(keys))
    recorded = " | ".join(f"{runs[0][1][k + '/manifest']:.1f}" for k in keys)
    print(f"| manifest (converted on this CPU) | | {recorded} |")
    for label, r in runs:
        path = r["cpu"].split("int8: ", 1)[1].split(": exact")[0]
        print(f"| {label} | {path} | " + " | ".join(f"{r[k + '/edge']:.1f} / {r[k + '/default']:.1f}" for k in keys)
              + " |")
    print(f"\nthis CPU: {runs[0][1]['cpu']}")


if __name__ == "__main__":
    main()
