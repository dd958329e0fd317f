"""One measured run of the edge runtime in this process: import, load, then `repeat` generations.

Every graph run is timed by the pipeline itself (`Pipeline.timed_calls`), so the flow measured is
`Pipeline.generate` itself, not a copy of it, whether its components stay resident or not. No torch here, and not even numpy
before the clock starts: importing the runtime is part of its cold start, as torch's is of a peer's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

from edge.bench_probe import RssSampler, peak_rss_self, read_rss, ru_maxrss_self, summarize

Log = Callable[[str], None]


def measure_edge(bundle: Path, *, prompt: str, negative_prompt: str, steps: int, guidance: float,
                 scheduler: str, seed: int, height: int, width: int, repeat: int, threads: int | None,
                 image_path: Path, latents_path: Path, log: Log, memory_budget: str | None = None,
                 backend: str = "onnx", cache_interval: int = 1) -> dict[str, Any]:
    """Load `bundle` on `backend` (onnx: onnxruntime; openvino) and generate `repeat` times from the same
    initial latents, drawn from `seed` exactly as `edge generate --seed` draws them and saved to `latents_path`
    for the peers; `cache_interval` N > 1: DeepCache (the whole UNet every N steps)."""
    t0 = time.time()
    baseline = read_rss()
    with RssSampler() as sampler:
        t = time.perf_counter()
        import numpy as np
        import onnxruntime as ort

        from edge.pipeline import Pipeline
        import_s = time.perf_counter() - t

        log(f"[edge] loading {bundle}")
        load_start = time.time()
        t = time.perf_counter()
        pipe = Pipeline.load(bundle, threads=threads, memory_budget=memory_budget, backend=backend)
        load_s = time.perf_counter() - t
        load_end = time.time()
        opened_at_load = dict(pipe.load_seconds)  # under a budget, stages open more during generation
        log("[edge] sessions: " + ", ".join(f"{k} {v:.2f}s" for k, v in opened_at_load.items())
            + f" (load {load_s:.2f}s in all, sha256 checks included)")

        m = pipe.manifest
        shape = (1, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
        latents = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)  # (1, C, h, w)
        np.save(latents_path, latents)
        calls: list[tuple[str, float, float]] = []
        pipe.timed_calls = calls
        totals, result = [], None
        for k in range(repeat):
            result = pipe.generate(prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                   scheduler=scheduler, seed=seed, height=height, width=width, latents=latents,
                                   cache_interval=cache_interval, callback=_step_progress(f"[edge] run {k + 1}/{repeat}"))
            totals.append(result.timings["total"])
        end = time.time()
    peak, peak_source = peak_rss_self()
    if max(sampler.rss, default=0) > peak:  # the kernel's per-thread RSS counters lag by a few pages (SPLIT_RSS)
        peak, peak_source = max(sampler.rss), peak_source + ", raised to the highest VmRSS sample"
    result.images[0].save(image_path)

    provider, runtime, versions = _engine(pipe, backend)
    if cache_interval > 1:
        runtime += f", DeepCache: whole UNet every {cache_interval} steps"
    stage_calls = {stage: [b - a for s, a, b in calls if s == stage] for stage in ("text_encoder", "unet", "vae_decoder")}
    per_generation = {stage: _per_generation(v, repeat) for stage, v in stage_calls.items()}
    unet_calls = stage_calls["unet"]
    return {
        "name": "edge" if backend == "onnx" else f"edge-{backend}",
        "runtime": runtime,
        "ok": True,
        "error": None,
        "backend": backend,
        "versions": {"onnxruntime": ort.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
                     **versions},
        "execution_provider": provider,
        "threads": threads,
        "cold_start_s": import_s + load_s,
        "import_s": import_s,
        "load_s": load_s,
        "sessions_s": opened_at_load,
        "load_other_s": load_s - sum(opened_at_load.values()),  # sha256 checks, manifest, tokenizer
        "text_encoder_s": summarize(per_generation["text_encoder"]),
        "unet_call_s": {**summarize(unet_calls), "first": unet_calls[0] if unet_calls else None},
        "unet_calls_per_generation": len(unet_calls) // repeat,
        "cache_interval": cache_interval,
        "unet_batch": (pipe.plan.guidance_batch if guidance > 1 else 1) * latents.shape[0],
        "memory_budget": memory_budget,
        "plan": pipe.plan.describe() if pipe.plan is not None and pipe.plan.stages else None,
        "vae_decode_s": summarize(per_generation["vae_decoder"]),
        "end_to_end_s": {**summarize(totals), "first": totals[0], "all": totals},
        "first_image_s": import_s + load_s + totals[0],
        "peak_rss_bytes": peak,
        "peak_rss_source": peak_source,
        "ru_maxrss_bytes": ru_maxrss_self(),
        "baseline_rss_bytes": baseline,
        "memory_timeline": sampler.timeline(t0),
        "stages": [{"stage": "load", "start_s": load_start - t0, "end_s": load_end - t0}]
                  + [{"stage": s, "start_s": a - t0, "end_s": b - t0} for s, a, b in calls],
        "wall_s": end - t0,
        "image": image_path.name,
    }


def _engine(pipe, backend: str) -> tuple[str, str, dict[str, str]]:
    """(execution provider, runtime line, extra versions) of the engine the pipeline runs on."""
    import onnxruntime as ort

    if backend == "openvino":
        import openvino

        version = openvino.__version__.split("-")[0]
        return "OpenVINO CPU", f"edge (OpenVINO {version}, CPU, {pipe.precision_of('unet')})", {"openvino": version}
    provider = pipe.providers[0]
    return provider, f"edge (onnxruntime {ort.__version__}, {provider.removesuffix('ExecutionProvider')})", {}


def main() -> None:
    """`python -m edge.bench_run` < JSON keywords of measure_edge: one run in a fresh process (its own peak RSS),
    the result as JSON on stdout, progress on stderr."""
    import json

    spec = json.loads(sys.stdin.read())
    spec.update(image_path=Path(spec["image_path"]), latents_path=Path(spec["latents_path"]),
                log=lambda line: print(line, file=sys.stderr, flush=True))
    json.dump(measure_edge(Path(spec.pop("bundle")), **spec), sys.stdout)


def _per_generation(durations: list[float], repeat: int) -> list[float]:
    """Sum the calls of each generation (text encoding is two calls with guidance, decoding one per image)."""
    n = len(durations) // repeat if repeat else 0
    return [sum(durations[k * n : (k + 1) * n]) for k in range(repeat)] if n else []


def _step_progress(prefix: str, width: int = 24) -> Callable[[int, int, Any], None]:
    """A one-line bar on a terminal; in a log (not a TTY) only the closing line."""
    start = time.perf_counter()
    live = sys.stderr.isatty()

    def show(i: int, total: int, _latents) -> None:
        last = i + 1 == total
        if live or last:
            done = int(width * (i + 1) / total)
            rate = (time.perf_counter() - start) / (i + 1)
            print(f"\r{prefix} [{'#' * done}{'.' * (width - done)}] step {i + 1}/{total} {rate:.2f}s/step",
                  end="\n" if last else "", file=sys.stderr, flush=True)

    return show


if __name__ == "__main__":
    main()
