"""What the server tells about itself and its device: /api/info for the page, /sdapi/v1/memory for A1111's clients."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge.cpu import cpu_model
from edge.memory import peak_rss_bytes, read_status
from edge.plan import parse_bytes
from edge.schedulers import SCHEDULERS
from edge.serve.context import Server


def server_info(server: Server) -> dict[str, Any]:
    """GET /api/info: bundles, the device and the limits, as the page shows them."""
    config, bundles = server.config, server.bundles
    current = bundles.find(None)
    from edge.cpu import features

    return {
        "bundles": [b.describe(config.limits) for b in bundles.all.values()],
        "current": current.name,
        "loaded": bundles.loaded,
        "backend": current.backend,
        "threads": config.threads,
        "memory_budget": None if config.memory_budget is None else parse_bytes(config.memory_budget),
        "plan_peak_bytes": bundles.plan_peak(),
        "schedulers": list(SCHEDULERS),
        "limits": config.limits.as_dict(),
        "queue": {"waiting": server.jobs.waiting(), "running": server.jobs.running is not None},
        "cpu": cpu_model(),
        "cpu_features": features().as_dict(),
        "token_required": config.token is not None,
    }


def memory() -> dict[str, Any]:
    """GET /sdapi/v1/memory: A1111 reports psutil's RAM and torch's CUDA; here the OS's RAM and this process."""
    total = available = None
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    ram = {"free": available, "used": None if total is None or available is None else total - available,
           "total": total, "process_rss": read_status(None, "VmRSS"), "process_peak": peak_rss_bytes()}
    return {"ram": ram, "cuda": {"error": "no CUDA here: edge runs on the CPU (or Core ML on a Mac)"}}
