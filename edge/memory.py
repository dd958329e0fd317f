"""Process memory as the OS reports it."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def read_status(pid: int | None = None, field: str = "VmRSS") -> int | None:
    """A memory field of /proc/<pid>/status (default: this process) in bytes; None without /proc or once
    the process has exited (a zombie has no Vm* lines)."""
    path = Path(f"/proc/{'self' if pid is None else pid}/status")
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
