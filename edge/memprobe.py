"""What a graph costs in memory on this machine, as the OS reports it (RSS), not as a formula guesses.

The converter probes every graph of a bundle in a child process and records the numbers in the
manifest; the runtime's memory planner (`edge.plan`) adds them up for a budget. Per graph:

- `load_peak`: RSS growth while the onnxruntime session is created (protobuf + weights, transiently),
- `resident`: RSS growth once it is created (weights, pre-packed kernels),
- `activation`: RSS growth while it runs, above `resident` (intermediate tensors, inputs and outputs),
- `held`: RSS growth after it has run, outputs aside: what it holds while later graphs run (weights mapped from
  disk count once a run has read them, and only what it read: a token table's few rows, not the table),
- `carry`: the outputs it leaves for later chunks to read (bytes of the tensors kept).

Activations are measured at several latent sizes and batches and fitted as c + B * (a * P + b * P^2),
P = latent pixels, B = batch: convolutions grow with P, plain attention's score matrix with P^2.

On Linux the peak (VmHWM) is reset between measurements (/proc/self/clear_refs), so one process
measures loading and running separately; elsewhere each run gets a fresh process and the loading
peak may hide a smaller running peak.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from edge.memory import peak_rss_bytes, read_status

_PROC = Path("/proc/self")


def _status_bytes(field: str) -> int:
    """A /proc/self/status memory field; without /proc (macOS) the best available is the process's peak."""
    value = read_status(None, field)
    return peak_rss_bytes() if value is None else value


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_bytes("VmRSS")


def reset_peak() -> bool:
    """Start a new peak measurement; False where the OS cannot (then peaks are since process start)."""
    try:
        (_PROC / "clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """Peak resident set size since the last `reset_peak` (or process start)."""
    return _status_bytes("VmHWM")


# Under a budget, buffers of this size and more are mapped by glibc and unmapped when freed, instead of staying
# in its heap for reuse. Measured on SD 1.5's UNet streamed in 47 chunks (2-core Intel Xeon, 512x512, batch 2):
# peak RSS 589 MB at glibc's default, 411 MB at 4 MiB (1 MiB: 380 MB), for 8.5 against 10.0 s a call (10.8 s).
LEAN_MMAP_THRESHOLD = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def lean_malloc() -> bool:
    """Make large allocations go back to the OS as soon as they are freed (glibc; process-wide, not undone).
    False where the C library has no mallopt (macOS, musl): there the heap keeps its own rules."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def release_memory() -> None:
    """Return freed heap to the OS (glibc keeps it otherwise), so a freed session stops counting."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------- child side


def _feed(spec: dict, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(spec["shape"])
    if spec["dtype"] == "int64":
        return np.zeros(shape, np.int64)  # token ids: any valid id costs the same
    return rng.standard_normal(shape, dtype=np.float32)


def _measure(job: dict) -> dict:
    """Run the job's graphs in order (chunks feed the next); measure each one."""
    import onnxruntime as ort

    from edge.sessions import session_options

    options = session_options(job.get("threads"))  # exactly as the runtime opens them under a budget
    lean_malloc()
    rng = np.random.default_rng(0)
    env = {name: _feed(spec, rng) for name, spec in job["inputs"].items()}
    release_memory()
    graphs = []
    for k, graph in enumerate(job["graphs"]):
        release_memory()
        resettable = reset_peak()
        before = rss_bytes()
        session = ort.InferenceSession(graph["file"], options, providers=["CPUExecutionProvider"])
        load_peak = peak_bytes() - before
        resident = rss_bytes() - before
        reset_peak()
        feeds = {i.name: env[i.name] for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(names, feeds)
        activation = peak_bytes() - before - resident
        release_memory()
        held = rss_bytes() - before - sum(v.nbytes for v in outputs)
        env.update(zip(names, outputs))
        del session, feeds, outputs
        later = {n for g in job["graphs"][k + 1:] for n in g["inputs"]}
        env = {n: v for n, v in env.items() if n in later or n in job["inputs"]}
        release_memory()
        carry = sum(v.nbytes for n, v in env.items() if n not in job["inputs"])  # held for later chunks
        graphs.append({"file": Path(graph["file"]).name, "load_peak": max(load_peak, resident),
                       "resident": max(resident, 0), "activation": max(activation, 0), "held": max(held, 0),
                       "carry": carry, "peak_resettable": resettable})
    return {"graphs": graphs}


def main() -> None:
    job = json.loads(sys.stdin.read())
    json.dump(_measure(job), sys.stdout)


# ------------------------------------------------------------------------------------ parent side


def probe(files: Sequence[Path], inputs: dict[str, dict], graph_inputs: Sequence[Sequence[str]] | None = None,
          threads: int | None = None) -> list[dict]:
    """Measure `files` run in order in a fresh process, fed random `inputs` ({name: {shape, dtype}}).

    `graph_inputs[k]` lists the tensors graph k reads (for chunks: what must be kept between them).
    """
    graph_inputs = graph_inputs or [list(inputs)] * len(files)
    job = {"threads": threads, "inputs": inputs,
           "graphs": [{"file": str(Path(f).resolve()), "inputs": list(ins)} for f, ins in zip(files, graph_inputs)]}
    done = subprocess.run([sys.executable, "-m", "edge.memprobe"], input=json.dumps(job), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {[Path(f).name for f in files]} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)["graphs"]


_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_measured(argv: Sequence[str], stdout=None, stderr=None) -> tuple[int, int]:
    """Run a command; return (exit status, its peak RSS in bytes) as the kernel accounted it, like
    `/usr/bin/time -v`'s "Maximum resident set size" (Unix).

    A small launcher process forks and waits for the command: a child forked straight from a large
    process (a test runner holding torch) is charged that process's pages until it execs.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage"
        subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(report), *argv], stdout=stdout, stderr=stderr,
                       check=True)
        status, maxrss = (int(v) for v in report.read_text().split())
    return status, maxrss if sys.platform == "darwin" else maxrss * 1024


def fit_activation(samples: Sequence[dict]) -> dict[str, float]:
    """c + B * (a * P + b * P^2) through samples [{pixels, batch, bytes}], least squares, coefficients >= 0."""
    P = np.array([s["pixels"] for s in samples], np.float64)
    B = np.array([s["batch"] for s in samples], np.float64)
    y = np.array([s["bytes"] for s in samples], np.float64)
    columns = {"c": np.ones_like(P), "a": B * P, "b": B * P * P}
    best = None
    for keep in (("c", "a", "b"), ("c", "a"), ("a", "b"), ("a",), ("c",)):  # drop terms that fit negative
        X = np.stack([columns[k] for k in keep], axis=1)
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        if (coef >= 0).all():
            fit = {k: 0.0 for k in columns} | {k: float(v) for k, v in zip(keep, coef)}
            err = float(np.abs(X @ coef - y).max())
            if best is None or err < best[1] - 1e6:  # prefer the fuller model unless a smaller one fits better
                best = (fit, err)
    return best[0] if best else {"c": float(y.max()), "a": 0.0, "b": 0.0}


def activation_bytes(fit: dict[str, float], pixels: int, batch: int) -> int:
    return int(fit["c"] + batch * (fit["a"] * pixels + fit["b"] * pixels * pixels))


if __name__ == "__main__":
    main()
