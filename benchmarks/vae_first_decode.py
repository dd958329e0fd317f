"""Where the first VAE decode's time goes, and what takes it back: onnxruntime's arena, glibc's heap, both off.

    python benchmarks/vae_first_decode.py BUNDLE [--size 512] [--threads 2] [--repeat 2]

Each configuration runs in a fresh process (what a `edge generate` pays for its one image): the bundle's
`vae_decoder` session, then `--repeat` decodes of the same random latents; per decode the wall time and the
process's user/system CPU time and page faults, and the peak RSS (the kernel's high-water mark). Configurations
(edge.sessions.ARENA_MODES):
- `off`: arena off, glibc's defaults: a buffer over 32 MB is a fresh mmap every time, its pages faulted in and
  zeroed by the kernel (the runtime under a memory budget);
- `per_run`: onnxruntime's CPU arena reused within a run and shrunk back at its end (the runtime without a budget);
- `kept`: the arena kept between runs (`Pipeline.load(memory_arena=True)`);
- `heap`: arena off, glibc told to serve large buffers from its heap and keep freed memory
  (GLIBC_TUNABLES mmap_threshold / trim_threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "off": ({}, "off"),
    "per_run": ({}, "per_run"),
    "kept": ({}, "kept"),
    "heap": ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=17179869184"},
             "off"),
}


def child(bundle: Path, size: int, threads: int, repeat: int, arena: str) -> dict:
    import numpy as np

    from edge.bundle import read_manifest
    from edge.sessions import run_options, session_options

    import onnxruntime as ort

    manifest = read_manifest(bundle)
    path = bundle / manifest.components["vae_decoder"].file
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), sess_options=session_options(threads, arena, "all"),
                                   providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    name = session.get_inputs()[0].name
    latents = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    runs = []
    for _ in range(repeat):
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        session.run(None, {name: latents}, run_options(arena))
        after = resource.getrusage(resource.RUSAGE_SELF)
        runs.append({"wall_s": round(time.perf_counter() - t0, 2), "user_s": round(after.ru_utime - before.ru_utime, 2),
                     "sys_s": round(after.ru_stime - before.ru_stime, 2),
                     "minor_faults": after.ru_minflt - before.ru_minflt})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"load_s": round(load_s, 2), "runs": runs, "peak_rss_gb": round(peak / 1e9, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", help="comma-separated configurations")
    ap.add_argument("--child", choices=["off", "per_run", "kept"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.bundle, a.size, a.threads, a.repeat, a.child)))
        return
    report = {}
    for name, (env, arena) in CONFIGS.items():
        if a.only and name not in a.only.split(","):
            continue
        cmd = [sys.executable, __file__, str(a.bundle), "--size", str(a.size), "--threads", str(a.threads),
               "--repeat", str(a.repeat), "--child", arena]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        if proc.returncode != 0:
            raise SystemExit(f"{name}: the child failed:\n{proc.stderr}")
        report[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, json.dumps(report[name]), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
