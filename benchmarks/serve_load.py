"""A bounded load run against `edge serve`: N concurrent clients, M requests in all, the default model.

    python benchmarks/serve_load.py [--bundle DIR] [--clients 20] [--requests 60] [--memory-budget 512MB]
                                    [--queue 8] [--steps 12] [--out DIR] [--json FILE]

The server is a real `edge serve` process on a free loopback port (no traffic leaves the machine). Clients
mix A1111's blocking txt2img / img2img with the page's /api/jobs + server-sent events; a client refused with
429 waits the Retry-After it was given (at most 2 s) and sends its next request, so the run stays bounded
(--requests in all, --deadline seconds at most). It then checks, and exits 1 unless all hold:

- every request was served (200 / 202 then "done") or refused with 429, nothing else;
- every served image is a file in the outputs folder whose parameters (edge.png.read_params) are the ones asked;
- the server's peak RSS (/proc/PID/status VmHWM, the kernel's high-water mark) is within --memory-budget;
- the server's log has no error (no "ERROR", no traceback).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from edge.memory import format_bytes, read_status
from edge.plan import parse_bytes
from edge.png import read_params

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ("a red circle on a blue background", "a green square on a yellow background",
           "a blue triangle on a white background", "a yellow circle on a black background")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, outputs: Path, log: Path, a: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "edge.cli", "serve", str(bundle), "--port", str(port), "--outputs", str(outputs),
            "--queue", str(a.queue), "--memory-budget", a.memory_budget, "--log-level", "info"]
    if a.threads is not None:
        argv += ["--threads", str(a.threads)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(url + "/api/info", timeout=2)
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit(f"edge serve did not start:\n{log.read_text()}")
            time.sleep(0.2)


def picture(size: int) -> str:
    im = Image.new("RGB", (size, size), (30, 60, 200))
    im.paste((220, 30, 30), (size // 4, size // 4, size * 3 // 4, size * 3 // 4))
    out = io.BytesIO()
    im.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


class Load:
    """The shared request counter and every outcome, filled by the client threads."""

    def __init__(self, url: str, a: argparse.Namespace):
        self.url, self.a = url, a
        self.lock = threading.Lock()
        self.sent = 0
        self.results: list[dict] = []
        self.stop_at = time.monotonic() + a.deadline
        self.start_picture = picture(a.size)

    def take(self) -> int | None:
        with self.lock:
            if self.sent >= self.a.requests or time.monotonic() > self.stop_at:
                return None
            self.sent += 1
            return self.sent - 1

    def client(self, k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(base_url=self.url, timeout=self.a.deadline) as http:
            while (n := self.take()) is not None:
                kind = ("txt2img", "img2img", "jobs")[n % 3]
                seed, prompt = 1000 + n, rng.choice(PROMPTS)
                t = time.perf_counter()
                try:
                    result = getattr(self, kind)(http, prompt, seed)
                except httpx.HTTPError as e:
                    result = {"status": f"client error {type(e).__name__}: {e}"}
                result.update(kind=kind, seed=seed, prompt=prompt, seconds=time.perf_counter() - t)
                with self.lock:
                    self.results.append(result)
                if result["status"] == 429:
                    time.sleep(min(2.0, float(result.get("retry_after") or 1)))

    def txt2img(self, http, prompt: str, seed: int) -> dict:
        r = http.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": self.a.steps, "seed": seed,
                                                 "sampler_name": "Euler a", "width": self.a.size,
                                                 "height": self.a.size, "cfg_scale": 5})
        return self._a1111(r)

    def img2img(self, http, prompt: str, seed: int) -> dict:
        r = http.post("/sdapi/v1/img2img", json={"prompt": prompt, "steps": self.a.steps, "seed": seed,
                                                 "sampler_name": "DPM++ 2M", "init_images": [self.start_picture],
                                                 "denoising_strength": 0.6, "cfg_scale": 5})
        return self._a1111(r)

    def _a1111(self, r: httpx.Response) -> dict:
        if r.status_code != 200:
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after"), "body": r.text[:200]}
        params = json.loads(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).text["edge"])
        return {"status": 200, "params": params}

    def jobs(self, http, prompt: str, seed: int) -> dict:
        r = http.post("/api/jobs", json={"prompt": prompt, "steps": self.a.steps, "seed": seed, "scheduler": "euler",
                                         "width": self.a.size, "height": self.a.size, "guidance": 5})
        if r.status_code != 202:
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after"), "body": r.text[:200]}
        final = None
        with http.stream("GET", f"/api/jobs/{r.json()['id']}/events") as stream:
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name in ("done", "failed", "cancelled"):
                    final = (name, json.loads(line[6:]))
        if final is None or final[0] != "done":
            return {"status": f"job ended {final}"}
        return {"status": 200, "params": final[1]["image"]["params"], "name": final[1]["image"]["name"]}


def check(load: Load, outputs: Path, log_text: str, peak: int | None, budget: int) -> list[str]:
    """What went wrong, in words; empty when the run passes."""
    problems = []
    odd = [r for r in load.results if r["status"] not in (200, 429)]
    problems += [f"request {r['kind']} seed {r['seed']}: {r['status']} {r.get('body', '')}" for r in odd]
    on_disk = {}
    for path in outputs.glob("*.png"):
        try:
            p = read_params(path)
            on_disk[p["seed"]] = p
        except (ValueError, OSError) as e:
            problems.append(f"{path.name}: no parameters ({e})")
    for r in (r for r in load.results if r["status"] == 200):
        saved = on_disk.get(r["seed"])
        if saved is None or saved["prompt"] != r["prompt"] or saved["steps"] != load.a.steps:
            problems.append(f"served image seed {r['seed']} is not on disk with its parameters ({saved})")
    if len(on_disk) != sum(r["status"] == 200 for r in load.results):
        problems.append(f"{len(on_disk)} images on disk for {sum(r['status'] == 200 for r in load.results)} served")
    if peak is None:
        problems.append("could not read the server's VmHWM")
    elif peak > budget:
        problems.append(f"server peak RSS {format_bytes(peak)} is over the budget {format_bytes(budget)}")
    bad = [line for line in log_text.splitlines() if re.search(r"\bERROR\b|Traceback", line)]
    problems += [f"server log: {line}" for line in bad[:10]]
    return problems


def cpu() -> str:
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return f"{name} ({', '.join(f for f in ('avx2', 'avx512_vnni', 'amx_int8') if f in flags) or 'no avx2'})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="default: `edge convert default` into the output folder")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--memory-budget", default="512MB")
    p.add_argument("--queue", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int)
    p.add_argument("--deadline", type=float, default=600.0, help="seconds: no request is sent after this")
    p.add_argument("--out", type=Path, help="where the bundle, outputs and server log go (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="serve-load-"))
    out.mkdir(parents=True, exist_ok=True)
    bundle = a.bundle or out / "bundle"
    if a.bundle is None and not (bundle / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "edge.cli", "convert", "default", "-o", str(bundle)], check=True,
                       cwd=REPO, capture_output=True)
    outputs, log = out / "outputs", out / "server.log"
    proc, url = start_server(bundle, outputs, log, a)
    load = Load(url, a)
    t = time.perf_counter()
    threads = [threading.Thread(target=load.client, args=(k,)) for k in range(a.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    peak = read_status(proc.pid, "VmHWM")
    proc.terminate()
    proc.wait(timeout=30)
    budget = parse_bytes(a.memory_budget)
    problems = check(load, outputs, log.read_text(), peak, budget)
    served = [r for r in load.results if r["status"] == 200]
    latency = sorted(r["seconds"] for r in served)
    figures = {
        "cpu": cpu(), "clients": a.clients, "requests": len(load.results), "served": len(served),
        "refused_429": sum(r["status"] == 429 for r in load.results), "other": len(load.results) - len(served)
        - sum(r["status"] == 429 for r in load.results), "by_kind": {k: sum(r["kind"] == k for r in served)
                                                                       for k in ("txt2img", "img2img", "jobs")},
        "wall_s": round(wall, 2), "images_per_s": round(len(served) / wall, 2),
        "latency_p50_s": round(statistics.median(latency), 2) if latency else None,
        "latency_p90_s": round(latency[int(0.9 * (len(latency) - 1))], 2) if latency else None,
        "peak_rss_bytes": peak, "budget_bytes": budget, "steps": a.steps, "size": a.size, "queue": a.queue,
        "problems": problems,
    }
    print(json.dumps(figures, indent=2))
    print(f"{figures['served']} served, {figures['refused_429']} refused (429), {figures['other']} other; "
          f"peak RSS {format_bytes(peak or 0)} of {format_bytes(budget)}; {wall:.1f} s; {figures['cpu']}")
    if a.json is not None:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
