"""One UNet call streamed chunk by chunk, against the whole graph resident: time and the kernel's peak RSS.

    python benchmarks/stream_chunks.py ~/.cache/edge-diffusion/bundles/sd15-random/unet.onnx \\
        --max-chunk-mb 120 --work /tmp/stream [--size 512] [--calls 2]

The graph is cut with converters/split.py into --work (once; weights page-aligned, as the converter writes
chunks) and, with --inline, also written the older way (weights inside each chunk's protobuf). Each mode runs
in a fresh process: every chunk's session created, run and freed in turn, the outputs later chunks read kept,
for --calls calls (batch 2, as with guidance); the last call's time and load share and the process's peak
RSS during it (VmHWM reset before the call) are printed as one JSON line per mode. `malloc`: glibc's default,
or edge's lean setting (edge.memprobe.lean_malloc, which the runtime applies under a budget).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def child(folder: Path, lean: bool, calls: int, size: int, threads: int) -> dict:
    import onnxruntime as ort

    from edge.memprobe import lean_malloc, peak_bytes, release_memory, reset_peak
    from edge.sessions import session_options

    if lean:
        lean_malloc()
    chunks = json.loads((folder / "chunks.json").read_text())
    options = session_options(threads)
    rng = np.random.default_rng(0)
    h = size // 8
    feeds = {"sample": rng.standard_normal((2, 4, h, h), dtype=np.float32),
             "timestep": np.full((2,), 500.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    last_use = {i["name"]: k for k, c in enumerate(chunks) for i in c["inputs"]}
    for _ in range(calls):
        release_memory()
        reset_peak()
        env, load, start = dict(feeds), 0.0, time.perf_counter()
        for k, c in enumerate(chunks):
            t = time.perf_counter()
            session = ort.InferenceSession(str(folder / c["file"]), options, providers=["CPUExecutionProvider"])
            load += time.perf_counter() - t
            names = [o.name for o in session.get_outputs()]
            env.update(zip(names, session.run(names, {i.name: env[i.name] for i in session.get_inputs()})))
            del session
            env = {n: v for n, v in env.items() if last_use.get(n, -1) > k or n == "noise_pred"}
        total = time.perf_counter() - start
    return {"chunks": len(chunks), "call_s": round(total, 2), "load_s": round(load, 2),
            "peak_rss_mb": round(peak_bytes() / 1e6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("unet", type=Path, nargs="?")
    ap.add_argument("--max-chunk-mb", type=float, default=120.0)
    ap.add_argument("--work", type=Path, default=Path("bench-results/stream"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inline", action="store_true", help="also the older chunks, weights in the protobuf")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "MALLOC"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(Path(a.child[0]), a.child[1] == "lean", a.calls, a.size, a.threads)))
        return
    from edge.converters.split import split_graph
    from edge.cpu import cpu_model

    layouts = {"aligned": 0, **({"inline": 2**62} if a.inline else {})}  # external_data_over
    for layout, over in layouts.items():
        folder = a.work / f"{layout}-{a.max_chunk_mb:g}MB"
        if not (folder / "chunks.json").is_file():
            chunks = split_graph(a.unet, folder, max_chunk_bytes=int(a.max_chunk_mb * 1e6), external_data_over=over)
            (folder / "chunks.json").write_text(json.dumps([{k: c[k] for k in ("file", "inputs")} for c in chunks]))
        for malloc in ("default", "lean"):
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), malloc, "--calls", str(a.calls),
                                  "--size", str(a.size), "--threads", str(a.threads)],
                                 capture_output=True, text=True, check=True).stdout
            print(json.dumps({"cpu": cpu_model(), "layout": layout, "malloc": malloc, **json.loads(out)}), flush=True)


if __name__ == "__main__":
    main()
