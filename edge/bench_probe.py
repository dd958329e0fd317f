"""What `edge bench` measures about a process and the machine, as the OS reports it. Standard library only.

Memory is read, never estimated: a sampler thread reads VmRSS from /proc/<pid>/status every ~50 ms (memory
over time), and the peak is the kernel's own high-water mark. On Linux that is VmHWM, not getrusage's
ru_maxrss: exec carries the launcher's high-water mark into the new process's ru_maxrss (a bench started
from a 2 GB pytest reports >= 2 GB), while VmHWM belongs to the new address space alone. ru_maxrss is
recorded beside it, and is the peak on macOS (in bytes there; KiB on Linux). The same sampler watches
this process or a peer's, so every runtime's figures are taken the same way.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path

from edge.cpu import cpu_model, features
from edge.memory import peak_rss_bytes, read_status

SAMPLE_INTERVAL_S = 0.05
MAX_TIMELINE_POINTS = 4000  # longer runs are thinned to this many points, keeping each bucket's maximum


def read_rss(pid: int | None = None) -> int | None:
    return read_status(pid, "VmRSS")


ru_maxrss_self = peak_rss_bytes  # getrusage's peak of this process (includes the launcher's on Linux; see above)


def peak_rss_self() -> tuple[int, str]:
    """This process's peak resident set size in bytes, and where the figure comes from."""
    hwm = read_status(None, "VmHWM")
    if hwm is not None:
        return hwm, "VmHWM (kernel high-water mark of this process)"
    return ru_maxrss_self(), "getrusage ru_maxrss"


class RssSampler:
    """Samples a process's RSS every `interval` seconds on a daemon thread: `with RssSampler() as s: ...`.

    `times` are wall-clock (time.time()) so samples line up with stage marks taken in another process.
    Without /proc (macOS) this process's running peak is sampled instead, and a child is not sampled.
    """

    def __init__(self, pid: int | None = None, interval: float = SAMPLE_INTERVAL_S):
        self.pid, self.interval = pid, interval
        self.times: list[float] = []
        self.rss: list[int] = []
        self.source = "VmRSS from /proc/self/status" if pid is None else f"VmRSS from /proc/{pid}/status"
        if read_rss(pid) is None and pid is None:
            self.source = "ru_maxrss (running peak; this OS has no /proc)"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while True:
            rss = read_rss(self.pid)
            if rss is None and self.pid is None:
                rss = ru_maxrss_self()
            if rss is not None:
                self.times.append(time.time())
                self.rss.append(rss)
            elif self.pid is not None and self.times:  # the child has exited
                return
            if self._stop.wait(self.interval):
                return

    def timeline(self, t0: float) -> dict:
        """Seconds since `t0` and RSS bytes, thinned to at most MAX_TIMELINE_POINTS points."""
        t = [round(x - t0, 3) for x in self.times]
        rss = list(self.rss)
        step = -(-len(t) // MAX_TIMELINE_POINTS) if t else 1
        if step > 1:
            t = [t[i] for i in range(0, len(t), step)]
            rss = [max(rss[i : i + step]) for i in range(0, len(rss), step)]
        return {"source": self.source, "interval_s": self.interval, "t_s": t, "rss_bytes": rss,
                "max_sampled_bytes": max(self.rss, default=0)}


def run_child(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float | None = None) -> tuple[int, RssSampler, float]:
    """Run `cmd` with stdout/stderr passed through, sampling its RSS; return (exit code, sampler, start time).

    A child reports its own peak (VmHWM) as its last act: the sampler cannot see the final moments.
    """
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd)
    with RssSampler(proc.pid) as sampler:
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"{cmd[0]} did not finish within {timeout:.0f} s") from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return code, sampler, t0


def summarize(values: list[float]) -> dict:
    """median, p90 (linear interpolation between order statistics, as numpy's default), min, max, mean, n."""
    if not values:
        return {"n": 0}
    xs = sorted(values)

    def quantile(q: float) -> float:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"n": len(xs), "median": quantile(0.5), "p90": quantile(0.9), "min": xs[0], "max": xs[-1],
            "mean": sum(xs) / len(xs)}


def system_info() -> dict:
    """The machine as a user choosing a device would describe it."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        affinity = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": affinity,
        "os": platform.platform(),
        "architecture": platform.machine(),
        "python": platform.python_version(),
        "total_memory_bytes": _total_memory(),
        "hostname": platform.node(),
        "cpu_features": features().as_dict(),  # which int8 kernels onnxruntime takes here (edge.cpu)
    }


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
