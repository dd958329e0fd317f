"""One image from an int8 bundle on this CPU and on an emulated AVX2-only x86, with edge's sessions and with
onnxruntime's defaults: what the U8S8 saturation did to a picture, and that edge.cpu's fix removes it.

    python benchmarks/int8_image_avx2.py BUNDLE [--steps 8] [--cpu EPYC] [--out build/int8-image]

Runs this script again under apps/x86/emulate.sh for the emulated images (minutes: QEMU runs AVX2 code
~1,000x slower than native). Prints the PSNR of each image against this CPU's edge image.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"


def draw(bundle: Path, steps: int, sessions: str, out: Path) -> None:
    """Generate with edge's session options ("edge") or onnxruntime's defaults for every graph ("default")."""
    import onnxruntime as ort

    from edge.bundle import read_manifest
    from edge.pipeline import Pipeline

    if sessions == "edge":
        pipe = Pipeline.load(bundle, threads=2)
    else:  # the same pipeline, its graphs opened as a device opened them before edge.cpu
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.enable_cpu_mem_arena = False
        pipe = Pipeline._start(bundle, read_manifest(bundle), {True: options, False: options},
                               ["CPUExecutionProvider"], None, True, True)
    pipe.generate(PROMPT, steps=steps, guidance=7.5, seed=0).images[0].save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cpu", default="EPYC", help="QEMU x86 CPU model without VNNI")
    ap.add_argument("--out", type=Path, default=REPO / "build/int8-image")
    ap.add_argument("--draw", choices=("edge", "default"), help=argparse.SUPPRESS)  # the emulated half
    a = ap.parse_args()
    if a.draw:
        draw(a.bundle, a.steps, a.draw, a.out)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    native = a.out / "native-edge.png"
    draw(a.bundle, a.steps, "edge", native)
    from edge.metrics import psnr

    ref = np.asarray(Image.open(native).convert("RGB"), np.float32)
    for sessions in ("edge", "default"):
        path = a.out / f"{a.cpu}-{sessions}.png"
        subprocess.run(["bash", str(REPO / "apps/x86/emulate.sh"), a.cpu, __file__, str(a.bundle), "--steps",
                        str(a.steps), "--draw", sessions, "--out", str(path)], check=True)
        got = np.asarray(Image.open(path).convert("RGB"), np.float32)
        print(f"{a.cpu} with {sessions} sessions: image PSNR {psnr(ref, got, peak=255.0):.1f} dB against this "
              f"CPU's ({path})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
