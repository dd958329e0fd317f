"""A real `edge serve` process on a loopback port, for the server's tests and the page's."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx

from conftest import EDGE, REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bundles: list[Path], outputs: Path, log: Path, *extra: str, host: str = "127.0.0.1",
          port: int | None = None, prefix: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`edge serve` in its own process; returns once it answers (any status: a token server says 401)."""
    port = free_port() if port is None else port
    argv = [*(prefix or []), *EDGE, "serve", *map(str, bundles), "--host", host, "--port", str(port),
            "--outputs", str(outputs), *extra]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/api/info", timeout=2)
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"edge serve did not start:\n{log.read_text()}")
            time.sleep(0.2)


def stop(proc: subprocess.Popen, log: Path) -> str:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"edge serve did not stop on SIGTERM:\n{log.read_text()}")
    return log.read_text()
