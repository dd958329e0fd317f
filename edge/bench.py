"""`edge bench`: what a user choosing a device needs to know, measured the same way everywhere, with the
runtimes they would otherwise pick run side by side on the same model, size, steps and latents.

    edge bench BUNDLE [--steps N] [--height H --width W] [--repeat K] [--memory-budget 4GB] [-o DIR]
    edge bench --arch sd15 --random-weights [...]        # a published architecture, built and cached
    edge bench compare A/results.json B/results.json ... [-o DIR]

This process never imports torch: edge is measured here, and the peers, the random-weight builds and
the conversions each run in a child process (see bench_host), so the memory this process reports is
edge's alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from edge.bench_host import (AUTO_PEERS, PEERS, BenchError, arch_bundle, openvino_export, openvino_python,
                             optimum_export, optimum_int8, optimum_python, peer_model, ratios, run_peer,
                             sdcpp_problem, sdcpp_python, sdcpp_spec)
from edge.bench_probe import system_info
from edge.bench_run import measure_edge
from edge.plan import parse_bytes
from edge.bundle import read_manifest
from edge.validate import GUIDANCE_RULE, check_cache_interval, count_arg, number_arg

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
EDGE_BACKENDS = ("onnx", "openvino")  # edge's own engines: --backends
Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def bench(bundle: Path | None = None, *, arch: str | None = None, random_weights: bool = False, steps: int = 20,
          height: int | None = None, width: int | None = None, repeat: int = 1, guidance: float = 7.5,
          scheduler: str = "euler", prompt: str = DEFAULT_PROMPT, negative_prompt: str = "", seed: int = 0,
          threads: int | None = None, memory_budget: int | None = None, peers: str = "auto",
          peer_model_dir: Path | None = None, out: Path | None = None, label: str | None = None,
          backends: str = "onnx", cache_interval: int = 1, log: Log = _stderr) -> tuple[dict[str, Any], dict[str, Path]]:
    """Measure `bundle` (or the cached random-weight bundle of `arch`) on each of edge's `backends` (comma list
    of onnx, openvino: the first in this process, the others each in a fresh one) and the requested peers; write
    results.json / results.md / results.png into `out`. `cache_interval` N > 1 runs edge with DeepCache (the
    peers have no such option). Returns the results and the paths written."""
    _check_args(bundle, arch, random_weights, steps, repeat, threads, height, width, memory_budget)
    engines = _parse_backends(backends, memory_budget)
    wanted, explicit = _parse_peers(peers)
    from edge.schedulers import SCHEDULERS

    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    model = None
    if arch is not None:
        bundle, model = arch_bundle(arch, log)
    manifest = read_manifest(bundle)
    check_cache_interval(manifest, cache_interval)
    height, width = _size(manifest, height, width)
    label = label if label is not None else (f"{arch}-random" if arch else Path(bundle).resolve().name)
    out = Path(out) if out is not None else Path("bench-results") / f"{_slug(label)}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    skipped: dict[str, str] = {}
    ready = _prepare_peers(wanted, explicit, model if peer_model_dir is None else peer_model_dir, manifest.source,
                           skipped, log, scheduler=scheduler)
    measure = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
               "scheduler": scheduler, "seed": seed, "height": height, "width": width, "repeat": repeat,
               "threads": threads, "memory_budget": memory_budget, "cache_interval": cache_interval}
    run = measure_edge(Path(bundle), **measure, image_path=out / "edge.png", latents_path=out / "latents.npy",
                       log=log, backend=engines[0])
    runs = [run] + [_edge_elsewhere(Path(bundle), b, measure, out, log) for b in engines[1:]]
    for r in runs:
        if r["ok"]:
            log(f"[{r['name']}] UNet {r['unet_call_s']['median']:.3f}s/call (median), end-to-end "
                f"{r['end_to_end_s']['median']:.2f}s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GB")
    spec = {"model": None, "optimum_dir": None, "openvino_dir": None, "threads": threads, "scheduler": scheduler, "prompt": prompt,
            "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance, "height": height,
            "width": width, "repeat": repeat, "latents": str((out / "latents.npy").resolve()), "seed": seed}
    for peer, (python, peer_spec) in ready.items():
        runs.append(run_peer(peer, python, {**spec, **peer_spec}, out, log))
        if not runs[-1]["ok"]:
            log(f"[{peer}] FAILED: {runs[-1]['error']}")

    results = {
        "schema_version": 1,
        "kind": "edge-bench",
        "label": label,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {"bundle": str(bundle), "arch": arch, "random_weights": random_weights, "steps": steps,
                   "height": height, "width": width, "repeat": repeat, "guidance": guidance, "scheduler": scheduler,
                   "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "threads": threads,
                   "cache_interval": cache_interval, "peers_requested": sorted(wanted)},
        "system": system_info(),
        "bundle": _bundle_info(Path(bundle), manifest),
        "runs": runs,
        "skipped_peers": skipped,
        "ratios": {r["name"]: ratios(run, r) for r in runs[1:] if r["ok"]},
        "fastest": _fastest(runs),
        "fidelity": {"bundle_parity": {c.name: {k: c.parity.get(k) for k in ("psnr_db", "max_abs_diff", "reference")}
                                       for c in manifest.components.values()},
                     "image_vs_peers": _image_fidelity(out, runs)},
        "memory_budget": {"bytes": memory_budget, "peak_rss_bytes": run["peak_rss_bytes"],
                          "within": None if memory_budget is None else run["peak_rss_bytes"] <= memory_budget},
    }
    from edge.bench_report import write_results

    return results, write_results(results, out)


def _parse_backends(backends: str, memory_budget: int | None) -> list[str]:
    names = list(dict.fromkeys(b.strip() for b in backends.split(",") if b.strip()))
    if not names or any(b not in EDGE_BACKENDS for b in names):
        raise ValueError(f"--backends {backends!r}: expected a comma list of {', '.join(EDGE_BACKENDS)}")
    if memory_budget is not None and names != ["onnx"]:
        raise ValueError("--memory-budget is planned with onnxruntime's measurements: bench it with --backends onnx")
    return names


def _edge_elsewhere(bundle: Path, backend: str, measure: dict[str, Any], out: Path, log: Log) -> dict[str, Any]:
    """edge on another backend, measured in a fresh process (`python -m edge.bench_run`), so that its memory is
    its own; the same latents, as they are drawn from the same seed."""
    import json
    import subprocess

    name = f"edge-{backend}"
    log(f"[{name}] in a fresh process")
    spec = {"bundle": str(bundle), "backend": backend, **measure, "image_path": str(out / f"{name}.png"),
            "latents_path": str(out / f"latents-{backend}.npy")}
    proc = subprocess.run([sys.executable, "-m", "edge.bench_run"], input=json.dumps(spec), capture_output=True,
                          text=True)
    (out / f"{name}.log").write_text(proc.stderr)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        return {"name": name, "runtime": name, "ok": False, "error": tail}
    return json.loads(proc.stdout)


def _fastest(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run with the shortest UNet call on this machine, and the fastest of edge's own backends."""
    ok = [r for r in runs if r.get("ok") and r["unet_call_s"].get("median")]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["unet_call_s"]["median"])
    ours = min((r for r in ok if r["name"].startswith("edge")), key=lambda r: r["unet_call_s"]["median"], default=None)
    pick = lambda r: None if r is None else {"name": r["name"], "runtime": r["runtime"],  # noqa: E731
                                             "unet_call_s": r["unet_call_s"]["median"]}
    return {"overall": pick(best), "edge": pick(ours)}


def _check_args(bundle, arch, random_weights, steps, repeat, threads, height, width, memory_budget) -> None:
    if (bundle is None) == (arch is None):
        raise ValueError("give a bundle folder, or --arch NAME --random-weights (not both)")
    if arch is not None:
        from edge.converters.arch import check_arch  # torch-free: names and config folders only

        check_arch(arch)
        if arch.startswith("sdxl"):
            raise ValueError(f"edge bench --arch {arch}: the peers are not built for SDXL yet; build it with `python "
                             f"-m edge.converters.arch {arch} --save DIR`, `edge convert DIR`, then bench the bundle")
        if not random_weights:
            raise ValueError(f"--arch {arch} needs --random-weights: no trained weights are at hand here "
                             "(to bench real weights, `edge convert` them and pass the bundle)")
    for name, v, low in (("steps", steps, 1), ("repeat", repeat, 1), ("threads", threads, 1),
                         ("height", height, 1), ("width", width, 1)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise ValueError(f"{name} must be a whole number >= {low}, got {v!r}")
    if memory_budget is not None and memory_budget <= 0:
        raise ValueError(f"memory budget must be positive, got {memory_budget!r} bytes")


def _parse_peers(peers: str) -> tuple[set[str], bool]:
    """'auto' (those ready here), 'none', or a comma list; returns (names, explicitly asked)."""
    if peers == "auto":
        return set(AUTO_PEERS), False
    if peers in ("none", ""):
        return set(), True
    names = {p.strip() for p in peers.split(",") if p.strip()}
    unknown = names - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(sorted(unknown))}; known: {', '.join(PEERS)} "
                         "(or 'auto', or --no-peers)")
    return names, True


def _prepare_peers(wanted: set[str], explicit: bool, model: Path | None, source: dict, skipped: dict[str, str],
                   log: Log, scheduler: str = "euler") -> dict[str, tuple[Path, dict]]:
    """Each wanted peer's Python and model, set up before edge is measured so a failure shows up at once.
    Explicitly asked peers that cannot run are errors; in 'auto' they are skipped with the reason."""
    ready: dict[str, tuple[Path, dict]] = {}
    if not wanted:
        return ready
    folder, why = peer_model(source, Path(model) if model is not None else None)
    for peer in (p for p in PEERS if p in wanted):
        if folder is None:
            reason = f"no diffusers model for the peers: {why}"
        elif peer.startswith("diffusers") and importlib.util.find_spec("diffusers") is None:
            reason = "diffusers is not installed in this environment (pip install 'edge-diffusion[convert]')"
        elif peer.startswith("sdcpp"):
            reason = sdcpp_problem(folder, scheduler)  # before its build: the model or sampler it cannot run
        else:
            reason = ""
        python = None
        if not reason and peer.startswith("diffusers"):
            python = Path(sys.executable)
        elif not reason:
            make = {"openvino": openvino_python, "sdcpp": sdcpp_python}.get(peer.split("-")[0], optimum_python)
            python, reason = make(create=explicit, log=log)
        if reason:
            if explicit:
                raise BenchError(f"peer {peer} cannot run: {reason}")
            skipped[peer] = reason
            log(f"[{peer}] skipped: {reason}")
            continue
        spec = {"model": str(folder)}
        if peer.startswith("optimum"):
            spec["optimum_dir"] = str(optimum_export(python, folder, log))
        if peer == "optimum-int8":
            spec["optimum_dir"] = str(optimum_int8(python, Path(spec["optimum_dir"]), log))
        if peer.startswith("openvino"):
            spec["openvino_dir"] = str(openvino_export(python, folder, peer == "openvino-int8", log))
        if peer.startswith("sdcpp"):
            spec = sdcpp_spec(python, folder, peer, scheduler, log)
        ready[peer] = (python, spec)
    return ready


def _size(manifest, height: int | None, width: int | None) -> tuple[int, int]:
    h = manifest.default_size[0] if height is None else height
    w = manifest.default_size[1] if width is None else width
    m = manifest.size_multiple
    for what, v in (("height", h), ("width", w)):
        if v % m:
            raise ValueError(f"{what} {v} must be a multiple of {m} for this bundle; "
                             f"nearest: {max(m, round(v / m) * m)}")
    return h, w


def _bundle_info(bundle: Path, manifest) -> dict[str, Any]:
    return {
        "path": str(bundle), "bundle_id": manifest.bundle_id, "family": manifest.family,
        "prediction_type": manifest.prediction_type, "format_version": manifest.format_version,
        "bytes_on_disk": sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()),
        "components": {c.name: {"bytes": c.bytes, "parameters": c.parameters, "precision": c.precision}
                       for c in manifest.components.values()},
        "source": manifest.source,
    }


def _image_fidelity(out: Path, runs: list[dict]) -> dict[str, dict]:
    """Edge's image against each peer's, made from the same latents and scheduler."""
    import numpy as np
    from PIL import Image

    from edge.metrics import max_abs_diff, psnr

    ours = np.asarray(Image.open(out / "edge.png").convert("RGB"), dtype=np.float64)
    found = {}
    for r in runs[1:]:
        if r["ok"] and r.get("same_latents", True) and (out / r["image"]).is_file():
            theirs = np.asarray(Image.open(out / r["image"]).convert("RGB"), dtype=np.float64)
            if theirs.shape == ours.shape:
                found[r["name"]] = {"psnr_db": psnr(theirs, ours, peak=255.0),
                                    "max_abs_diff": max_abs_diff(theirs, ours)}
    return found


parse_size = parse_bytes  # '4GB', '3.5GiB', '512MB' or bytes: the planner's parser (GB = GiB = 1024**3)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "bench"


# ---- command line: `edge bench ...` (registered by edge/cli.py) and `python -m edge.bench ...` ----

def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    b = subparsers.add_parser(
        "bench", help="measure a bundle, side by side with the runtimes a user would pick instead",
        usage="edge bench BUNDLE [options]\n       edge bench --arch ARCH --random-weights [options]\n"
              "       edge bench compare RESULTS.json RESULTS.json ... [-o DIR]",
        description=__doc__.split("\n\n")[0])
    b.add_argument("bundle", nargs="?", help="bundle folder (or the word `compare`, then result files)")
    b.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    b.add_argument("--arch", help="bench a published architecture (sd15, sd21, sd21-base) instead of a bundle")
    b.add_argument("--random-weights", action="store_true", help="with --arch: random weights (built and cached "
                   "under $EDGE_CACHE_DIR or ~/.cache/edge-diffusion)")
    b.add_argument("--steps", type=count_arg("--steps"), default=20)
    b.add_argument("--height", type=count_arg("--height"), help="default: the model's trained size")
    b.add_argument("--width", type=count_arg("--width"))
    b.add_argument("--repeat", type=count_arg("--repeat"), default=1, help="generations to time (default 1)")
    b.add_argument("--guidance", type=number_arg("--guidance", minimum=0.0, rule=GUIDANCE_RULE), default=7.5,
                   help="> 1: classifier-free guidance, UNet batch 2")
    b.add_argument("--scheduler", default="euler")
    b.add_argument("--prompt", default=DEFAULT_PROMPT)
    b.add_argument("--negative-prompt", default="")
    b.add_argument("--seed", type=count_arg("--seed", minimum=0), default=0,
                   help="initial latents (the same for every runtime)")
    b.add_argument("--threads", type=count_arg("--threads"),
                   help="intra-op threads for every runtime (default: each one's own)")
    b.add_argument("--memory-budget", help="run edge under this budget (its memory planner) and report whether "
                   "its peak RSS fits, e.g. 4GB")
    b.add_argument("--peers", default="auto", help=f"comma list of {','.join(PEERS)}; "
                   f"default auto: {', '.join(AUTO_PEERS)} where ready")
    b.add_argument("--no-peers", action="store_true", help="measure edge only")
    b.add_argument("--backends", default="onnx", help=f"edge's engines to measure, comma list of "
                   f"{','.join(EDGE_BACKENDS)} (default onnx); the report names the fastest")
    b.add_argument("--peer-model", type=Path, help="diffusers folder the peers load (default: the bundle's source)")
    b.add_argument("--cache-interval", type=count_arg("--cache-interval"), default=1, metavar="N",
                   help="edge with DeepCache: the whole UNet every N steps (bundles converted with --deep-cache)")
    b.add_argument("--label", help="name of this run in tables and plots")
    b.add_argument("-o", "--output", type=Path, help="results folder (default bench-results/LABEL-TIME)")
    b.set_defaults(run=run_from_args)
    return b


def run_from_args(a: argparse.Namespace) -> int:
    if a.bundle == "compare" and not Path("compare").is_dir():
        out = a.output if a.output is not None else Path("bench-results") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
        from edge.bench_report import compare

        paths = compare([Path(f) for f in a.files], out)
        print(paths["markdown"].read_text(encoding="utf-8"))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    if a.files:
        raise ValueError(f"unexpected argument(s) after the bundle: {' '.join(a.files)}")
    results, paths = bench(
        a.bundle and Path(a.bundle), arch=a.arch, random_weights=a.random_weights, steps=a.steps, height=a.height,
        width=a.width, repeat=a.repeat, guidance=a.guidance, scheduler=a.scheduler, prompt=a.prompt,
        negative_prompt=a.negative_prompt, seed=a.seed, threads=a.threads,
        memory_budget=None if a.memory_budget is None else parse_size(a.memory_budget),
        peers="none" if a.no_peers else a.peers, peer_model_dir=a.peer_model, out=a.output, label=a.label,
        backends=a.backends, cache_interval=a.cache_interval)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if any(not r["ok"] for r in results["runs"]) else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m edge.bench ARGS` = `edge bench ARGS`, with the same one-line errors as the edge CLI."""
    from edge.cli import main as edge_main

    return edge_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
