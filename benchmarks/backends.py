"""The same bundle on each engine: onnxruntime, OpenVINO at its own precision, OpenVINO at f32.

    python benchmarks/backends.py BUNDLE [--steps 4] [--height 512 --width 512] [--cache-interval N] [--threads N]

Per backend: load time, UNet time per step (median of the steps after the first; the first, which compiles
OpenVINO's graph for the shape, is reported apart), VAE decode (its first call: compile included), end to end
(load excluded), peak RSS of a fresh process (each backend runs in its own), the precision OpenVINO chose, and the
image's PSNR against onnxruntime's (same seed). Prints one JSON document and names the fastest backend on this CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = {"onnx": {}, "openvino": {"backend": "openvino"},
            "openvino-f32": {"backend": "openvino", "inference_precision": "f32"}}


def child(a: argparse.Namespace, name: str) -> dict:
    """One backend, in this process: what main() collects from a fresh process per backend."""
    import numpy as np

    from edge import Pipeline
    from edge.memory import peak_rss_bytes

    t = time.perf_counter()
    pipe = Pipeline.load(a.bundle, threads=a.threads, **BACKENDS[name])
    load = time.perf_counter() - t
    ticks = [time.perf_counter()]
    result = pipe.generate("a red circle on a blue background", steps=a.steps, guidance=7.5, seed=0,
                           height=a.height, width=a.width, cache_interval=a.cache_interval,
                           callback=lambda *_: ticks.append(time.perf_counter()))
    steps = np.diff(ticks)  # the first also holds the text encoder and, on OpenVINO, compiling the UNet
    np.save(Path(a.out) / f"{name}.npy", np.asarray(result.images[0]))
    precision = pipe.precision_of("unet") if hasattr(pipe, "precision_of") else "fp32 (onnxruntime)"
    steady = steps[1:] if len(steps) > 1 else steps
    return {"load_s": round(load, 2), "unet_s_per_step": round(float(np.median(steady)), 3),
            "first_step_s": round(float(steps[0]), 3),
            "vae_decoder_s": round(result.timings["vae_decoder"], 3), "total_s": round(result.timings["total"], 2),
            "peak_rss_bytes": peak_rss_bytes(), "precision": precision}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--cache-interval", type=int, default=1)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--out", default="build/backends")
    p.add_argument("--child")
    a = p.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.child:
        print(json.dumps(child(a, a.child)))
        return
    import numpy as np

    from edge.cpu import features
    from edge.metrics import psnr

    rows = {}
    for name in a.backends.split(","):
        argv = [sys.executable, __file__, *sys.argv[1:], "--child", name]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            rows[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
            continue
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, rows[name], file=sys.stderr, flush=True)
    ref = Path(a.out) / "onnx.npy"
    for name, row in rows.items():
        if "error" not in row and ref.exists():
            row["psnr_vs_onnx_db"] = round(psnr(np.load(ref), np.load(Path(a.out) / f"{name}.npy"), peak=255.0), 2)
    ran = {k: v for k, v in rows.items() if "error" not in v}
    print(json.dumps({"cpu": features().describe(), "bundle": str(a.bundle), "steps": a.steps,
                      "size": [a.height, a.width], "cache_interval": a.cache_interval, "backends": rows,
                      "fastest_unet": min(ran, key=lambda k: ran[k]["unet_s_per_step"]) if ran else None}, indent=2))


if __name__ == "__main__":
    main()
