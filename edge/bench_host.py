"""Host-side work of `edge bench`, each piece in a child process so this one never imports torch and its own
memory figures stay clean: building a published architecture with random weights and converting it
(cached), the peers' virtual environments and their exports (cached), and the peer runs themselves.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from edge.bench_probe import run_child, summarize

Log = Callable[[str], None]
# The int8 peers are what each library's own tools give without calibration, the sdcpp ones stable-diffusion.cpp's
# own 8- and 4-bit gguf weights, openvino-f32 OpenVINO held to fp32 inference (its default on a CPU with bf16 or
# AMX is bf16): the equal-precision peer of an fp32 bundle. Run only when asked for.
PEERS = ("diffusers", "optimum", "openvino", "openvino-f32", "diffusers-int8", "optimum-int8", "openvino-int8",
         "sdcpp-q8_0", "sdcpp-q4_0")
AUTO_PEERS = ("diffusers", "optimum", "openvino")  # `--peers auto`: these, where ready
# Each peer library that pins transformers differently from edge's converters gets its own environment.
# torch goes first and pinned: any other route makes pip pull a multi-GB CUDA build.
PEER_TORCH = "torch==2.13.0"
# optimum-onnx 0.1.0 needs transformers < 4.58 (and a diffusers its export code knows).
OPTIMUM_PACKAGES = ("optimum-onnx[onnxruntime]==0.1.0", "optimum==2.1.0", "transformers==4.57.6",
                    "diffusers==0.39.0", "huggingface-hub==0.36.2", "onnxruntime==1.32.0", "onnx==1.23.2")
# optimum-intel 2.2.0 needs optimum 2.3 (optimum's environment pins 2.1), transformers < 5.6 and
# huggingface-hub < 1.22 (so diffusers <= 0.39). It is installed without its dependencies, which are all here
# but torchvision: PyPI's torchvision is a CUDA build that breaks transformers' imports beside the CPU torch,
# and nothing optimum-intel runs for Stable Diffusion uses it.
OPENVINO_PACKAGES = ("openvino==2026.4.1", "openvino-tokenizers==2026.4.1.0", "nncf==3.4.0", "optimum==2.3.0",
                     "transformers==5.5.4", "diffusers==0.39.0", "huggingface-hub==1.21.0", "requests",
                     "setuptools")
OPENVINO_NO_DEPS = ("optimum-intel==2.2.0",)
# stable-diffusion.cpp (ggml) through its Python binding, compiled here from the source package: the native CPU
# flags (GGML_NATIVE: the AVX2 / AVX-512 / VNNI / dot-product kernels this CPU has), two build jobs. No torch.
SDCPP_PACKAGES = ("--no-binary", "stable-diffusion-cpp-python", "stable-diffusion-cpp-python==0.4.7")
SDCPP_BUILD_ENV = {"CMAKE_ARGS": "-DGGML_NATIVE=ON", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
SDCPP_WTYPES = {"sdcpp-q8_0": "q8_0", "sdcpp-q4_0": "q4_0"}  # peer -> the gguf weight type sd.cpp converts to
# edge's scheduler -> stable-diffusion.cpp's sample method and sigma schedule of the same algorithm (sd.cpp's
# "discrete" spaces SD's 1000 training timesteps evenly; diffusers' SD 1.5 config says "leading").
SDCPP_SAMPLERS = {"euler": ("euler", "discrete"), "euler_a": ("euler_a", "discrete"),
                  "dpmpp_2m": ("dpm++2m", "discrete"), "dpmpp_2m_karras": ("dpm++2m", "karras"), "lcm": ("lcm", "lcm")}
# stable-diffusion.cpp builds SD 1.x's networks at their published sizes and refuses a file of any other shape.
SDCPP_SD1_CONFIG = {"unet/config.json": {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                                         "cross_attention_dim": 768, "in_channels": 4},
                    "text_encoder/config.json": {"hidden_size": 768, "num_hidden_layers": 12},
                    "vae/config.json": {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4},
                    "scheduler/scheduler_config.json": {"prediction_type": "epsilon"}}


class BenchError(ValueError):
    """A benchmark that cannot be set up; the message says what would work."""


def cache_dir() -> Path:
    """$EDGE_CACHE_DIR, else ~/.cache/edge-diffusion."""
    root = os.environ.get("EDGE_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "edge-diffusion"


def _peer_script(name: str = "bench_peer.py") -> Path:
    """converters/bench_peer.py (or `name` beside it), wherever `edge.converters` is installed (it is run by
    path, not imported)."""
    spec = importlib.util.find_spec("edge.converters")
    if spec is None or spec.origin is None:
        raise BenchError("the peers need edge's converters package (edge.converters), which is not installed")
    return Path(spec.origin).parent / name


def _need_converter(what: str) -> None:
    for module in ("torch", "diffusers", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise BenchError(f"{what} needs the converter extra ({module} is not installed here): "
                             "pip install 'edge-diffusion[convert]' on a host, or bench a converted bundle")


def _run_quiet(cmd: list[str], what: str, log_path: Path, echo: Log | None = None,
               extra_env: dict[str, str] | None = None) -> None:
    """Run a set-up step with its output in `log_path` (and each line through `echo`, for progress);
    on failure, raise with the log's last lines."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as f:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **(extra_env or {})}  # no bars
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env)
        for line in proc.stdout:
            f.write(line)
            if echo is not None and line.strip():
                echo(line.rstrip())
        proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise BenchError(f"{what} failed (exit {proc.returncode}); full log: {log_path}\n{tail}")


# How `--arch NAME --random-weights` converts: spelled out (and part of the cache key), so a bundle built under
# older converter defaults is rebuilt rather than measured.
ARCH_CONVERT_ARGS = ["--attention", "fused", "--precision", "fp32"]


def arch_bundle(arch: str, log: Log, seed: int = 0) -> tuple[Path, Path]:
    """The cached bundle of `arch` with random weights and the diffusers folder it came from (the peers run
    that folder), building either when missing or when the architecture's configs changed."""
    from edge.converters.arch import config_dir  # names and configs only; torch is imported by the children

    folder = config_dir(arch)
    _need_converter(f"--arch {arch} --random-weights")
    digest = hashlib.sha256()
    for f in sorted(folder.rglob("*.json")):
        digest.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    stamp = {"arch": arch, "seed": seed, "configs_sha256": digest.hexdigest(), "convert": ARCH_CONVERT_ARGS}
    root = cache_dir()
    model, bundle = root / "models" / f"{arch}-random", root / "bundles" / f"{arch}-random"
    stamp_file = bundle.with_name(bundle.name + ".source.json")
    old = _read_json(stamp_file) or {}
    if (bundle / "manifest.json").is_file() and model.is_dir() and old == stamp:
        log(f"[cache] {bundle} (random {arch})")
        return bundle, model
    same_model = model.is_dir() and {k: old.get(k) for k in ("arch", "seed", "configs_sha256")} == \
        {k: stamp[k] for k in ("arch", "seed", "configs_sha256")}
    for path in ((bundle, stamp_file) if same_model else (model, bundle, stamp_file)):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    logs = root / "logs"
    if not same_model:
        partial = model.with_name(model.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        t = time.perf_counter()
        log(f"[cache] building {arch} with random weights (fp32) -> {model}")
        _run_quiet([sys.executable, "-m", "edge.converters.arch", arch, "--seed", str(seed), "--save", str(partial)],
                   f"building {arch}", logs / f"build-{arch}.log", echo=lambda s: log(f"[cache]   {s}"))
        os.replace(partial, model)
        log(f"[cache] built in {time.perf_counter() - t:.0f}s")
    log(f"[cache] converting {model} -> {bundle} ({' '.join(ARCH_CONVERT_ARGS)}; minutes at full size)")
    t = time.perf_counter()
    _run_quiet([sys.executable, "-m", "edge.cli", "convert", str(model), "-o", str(bundle), *ARCH_CONVERT_ARGS],
               f"converting {arch}", logs / f"convert-{arch}.log", echo=lambda s: log(f"[cache]   {s}"))
    stamp_file.write_text(json.dumps(stamp) + "\n")
    log(f"[cache] converted in {time.perf_counter() - t:.0f}s")
    return bundle, model


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def peer_model(source: dict[str, Any], given: Path | None) -> tuple[Path | None, str]:
    """The diffusers folder the peers load: `given`, else the folder the bundle was converted from.
    (None, why) when there is none."""
    if given is not None:
        if not (given / "model_index.json").is_file():
            raise BenchError(f"--peer-model {given} is not a diffusers folder (no model_index.json)")
        return given, ""
    name = source.get("name")
    if source.get("kind") == "diffusers_folder" and name and (Path(name) / "model_index.json").is_file():
        return Path(name), ""
    return None, (f"the bundle was converted from {source.get('kind')} {name!r}, not a diffusers folder "
                  "found on this machine; pass --peer-model DIR")


def _peer_python(name: str, steps: tuple[tuple[str, ...], ...], create: bool, log: Log,
                 build_env: dict[str, str] | None = None) -> tuple[Path | None, str]:
    """The Python of peer `name`'s environment under $EDGE_CACHE_DIR/peers/, created (minutes, ~1.5 GB) only
    when `create` by one `pip install` per step (with `build_env` set, for packages compiled here).
    (None, why) if absent."""
    venv = cache_dir() / "peers" / name
    python = venv / "bin" / "python"
    if (venv / ".installed").is_file():
        return python, ""
    env_words = "".join(f"{k}={shlex.quote(v)} " for k, v in (build_env or {}).items())
    commands = "; ".join(f"{env_words}pip install " + " ".join(step) for step in steps)
    if not create:
        asked = name if name in PEERS else ",".join(p for p in PEERS if p.startswith(name + "-"))  # sdcpp-q8_0,...
        return None, (f"its environment {venv} does not exist yet (`edge bench --peers {asked}` creates it: "
                      f"{commands})")
    log(f"[{name}] creating {venv}: {commands}")
    shutil.rmtree(venv, ignore_errors=True)
    logs = cache_dir() / "logs" / f"{name}-venv.log"
    _run_quiet([sys.executable, "-m", "venv", str(venv)], f"creating the {name} venv", logs)
    for step in steps:
        _run_quiet([str(python), "-m", "pip", "install", "-q", *step], f"pip install {' '.join(step)} ({name} venv)",
                   logs, extra_env=build_env)
    (venv / ".installed").write_text(json.dumps(steps) + "\n")
    return python, ""


def optimum_python(create: bool, log: Log) -> tuple[Path | None, str]:
    """The optimum environment's Python (see OPTIMUM_PACKAGES)."""
    return _peer_python("optimum", ((PEER_TORCH,), OPTIMUM_PACKAGES), create, log)


def openvino_python(create: bool, log: Log) -> tuple[Path | None, str]:
    """The OpenVINO environment's Python: optimum-intel and OpenVINO (see OPENVINO_PACKAGES)."""
    return _peer_python("openvino", ((PEER_TORCH,), OPENVINO_PACKAGES, ("--no-deps", *OPENVINO_NO_DEPS)), create,
                        log)


def sdcpp_python(create: bool, log: Log) -> tuple[Path | None, str]:
    """The stable-diffusion.cpp environment's Python (see SDCPP_PACKAGES): pip compiles stable-diffusion.cpp and
    ggml, 179 s on 2 cores (Xeon, AVX-512)."""
    return _peer_python("sdcpp", (SDCPP_PACKAGES,), create, log, build_env=SDCPP_BUILD_ENV)


def _model_key(model: Path) -> str:
    """A peer export's cache key: the folder's path and its files' timestamps."""
    key = hashlib.sha256(str(model.resolve()).encode())
    for f in sorted(model.rglob("*")):
        key.update(f"{f.relative_to(model)}:{f.stat().st_mtime_ns}".encode())
    return key.hexdigest()[:12]


def _peer_step(python: Path, spec: dict[str, Any], out: Path, what: str, log_name: str,
               script: str = "bench_peer.py") -> None:
    """One cached set-up step of a peer (an export, a quantization) in its own environment."""
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_path = out.with_name(out.name + ".spec.json")
    spec_path.write_text(json.dumps(spec))
    _run_quiet([str(python), str(_peer_script(script)), str(spec_path)], what, cache_dir() / "logs" / log_name)
    spec_path.unlink()


def optimum_export(python: Path, model: Path, log: Log) -> Path:
    """optimum's own ONNX export of `model`, cached by the folder's path and contents' timestamps."""
    out = cache_dir() / "optimum" / f"{model.name}-{_model_key(model)}"
    if (out / "model_index.json").is_file():
        return out
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    log(f"[optimum] exporting {model} to ONNX with optimum -> {out}")
    _peer_step(python, {"peer": "optimum", "mode": "export", "model": str(model), "optimum_dir": str(out)}, out,
               "optimum export", "optimum-export.log")
    return out


def openvino_export(python: Path, model: Path, int8: bool, log: Log) -> Path:
    """optimum-intel's OpenVINO export of `model` (fp32 weights; OpenVINO picks the inference precision when it
    compiles), or with `int8` that export with OpenVINO's own 8-bit weight compression (nncf, through
    optimum-intel's OVWeightQuantizationConfig(bits=8): what `optimum-cli export openvino --weight-format int8`
    writes). Cached beside optimum's exports, by the same key."""
    fp = cache_dir() / "openvino" / f"{model.name}-{_model_key(model)}"
    out = fp.with_name(fp.name + "-int8") if int8 else fp
    if (out / "model_index.json").is_file():
        return out
    if int8:
        fp = openvino_export(python, model, False, log)
        log(f"[openvino-int8] compressing {fp}'s weights to int8 with optimum-intel (nncf) -> {out}")
        spec = {"peer": "openvino-int8", "mode": "quantize", "fp32_dir": str(fp), "openvino_dir": str(out)}
    else:
        log(f"[openvino] exporting {model} to OpenVINO IR with optimum-intel -> {out}")
        spec = {"peer": "openvino", "mode": "export", "model": str(model), "openvino_dir": str(out)}
    _peer_step(python, spec, out, f"{spec['peer']} {spec['mode']}", f"{spec['peer']}-{spec['mode']}.log")
    return out


def optimum_int8(python: Path, fp32_export: Path, log: Log) -> Path:
    """optimum's own int8 (ORTQuantizer, dynamic, AVX-512 VNNI config) of its fp32 export, cached beside it."""
    out = fp32_export.with_name(fp32_export.name + "-int8")
    if (out / "model_index.json").is_file():
        return out
    log(f"[optimum-int8] quantizing {fp32_export}/unet with optimum's ORTQuantizer -> {out}")
    _peer_step(python, {"peer": "optimum-int8", "mode": "quantize", "fp32_dir": str(fp32_export),
                        "optimum_dir": str(out)}, out, "optimum int8 quantization", "optimum-int8.log")
    return out


def sdcpp_problem(model: Path, scheduler: str) -> str:
    """Why stable-diffusion.cpp cannot run `model` with `scheduler` ("" when it can), read from the configs
    before anything is built."""
    if scheduler not in SDCPP_SAMPLERS:
        return (f"stable-diffusion.cpp has no sampler of edge's {scheduler!r} algorithm; "
                f"use --scheduler {', '.join(SDCPP_SAMPLERS)}")
    for name, published in SDCPP_SD1_CONFIG.items():
        config = _read_json(model / name) or {}
        wrong = [f"{k} {config.get(k)!r} (SD 1.x: {v!r})" for k, v in published.items() if config.get(k) != v]
        if wrong:
            return (f"stable-diffusion.cpp builds SD 1.x's networks at their published sizes only, and {model}'s "
                    f"{name.split('/')[0]} has {', '.join(wrong)}; bench an SD 1.x-sized model "
                    "(e.g. --arch sd15 --random-weights)")
    if importlib.util.find_spec("diffusers") is None:
        return ("writing the checkpoint stable-diffusion.cpp reads needs the converter extra here "
                "(pip install 'edge-diffusion[convert]')")
    return ""


def sdcpp_spec(python: Path, model: Path, peer: str, scheduler: str, log: Log) -> dict[str, Any]:
    """What the sdcpp peer's run needs: its gguf file (made once, cached) and sd.cpp's names for the sampler.

    `model` is written as the original-layout single-file checkpoint stable-diffusion.cpp reads (edge's
    converters, in this environment), then converted by sd.cpp's own convert mode to a gguf of the peer's weight
    type: what its docs do (`sd-cli -M convert -m v1-5-pruned-emaonly.safetensors --type q8_0`). sd.cpp quantises
    only rows that are a whole number of blocks (32 weights): 3x3 convolution kernels, biases, norms and the
    embeddings keep the checkpoint's fp32. Converted once rather than quantised on every load (`wtype`), so a
    run loads the file a user of sd.cpp would have. Cached beside the other peers' exports, by the same key."""
    wtype = SDCPP_WTYPES[peer]
    base = cache_dir() / "sdcpp" / f"{model.name}-{_model_key(model)}"
    checkpoint, gguf = base.with_name(base.name + ".safetensors"), base.with_name(f"{base.name}-{wtype}.gguf")
    if not gguf.is_file():
        if not checkpoint.is_file():
            log(f"[{peer}] writing {model} as an LDM single-file checkpoint -> {checkpoint}")
            _peer_step(Path(sys.executable), {"mode": "checkpoint", "model": str(model), "checkpoint": str(checkpoint)},
                       checkpoint, "writing the sdcpp checkpoint", "sdcpp-checkpoint.log", "bench_peer_sdcpp.py")
        log(f"[{peer}] converting {checkpoint} to a {wtype} gguf with stable-diffusion.cpp -> {gguf}")
        _peer_step(python, {"mode": "convert", "checkpoint": str(checkpoint), "gguf": str(gguf), "wtype": wtype},
                   gguf, f"{peer} convert", f"{peer}-convert.log", "bench_peer_sdcpp.py")
    sample_method, sd_scheduler = SDCPP_SAMPLERS[scheduler]
    return {"model": str(model), "gguf": str(gguf), "wtype": wtype, "sample_method": sample_method,
            "sd_scheduler": sd_scheduler}


def run_peer(peer: str, python: Path, spec: dict[str, Any], workdir: Path, log: Log) -> dict[str, Any]:
    """One peer in a fresh process; its figures in the same shape as edge's run."""
    spec = {**spec, "peer": peer, "mode": "run", "out_json": str(workdir / f"{peer}.raw.json"),
            "out_png": str(workdir / f"{peer}.png")}
    spec_path = workdir / f"{peer}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)  # the peer's own environment, nothing of ours
    log(f"[{peer}] starting a fresh process ({python})")
    script = _peer_script("bench_peer_sdcpp.py" if peer.startswith("sdcpp") else "bench_peer.py")
    code, sampler, t0 = run_child([str(python), str(script), str(spec_path)], env=env)
    raw_path = Path(spec["out_json"])
    if code != 0 or not raw_path.is_file():
        return {"name": peer, "ok": False, "error": f"{peer} exited with code {code} (its output is above)"}
    raw = json.loads(raw_path.read_text(encoding="utf-8"))
    raw_path.unlink()
    spec_path.unlink()
    return _normalize(raw, sampler.timeline(t0), t0, spec)


def _normalize(raw: dict[str, Any], timeline: dict, t0: float, spec: dict[str, Any]) -> dict[str, Any]:
    repeat, calls, totals = spec["repeat"], raw["calls"], raw["end_to_end_all"]

    def per_generation(stage: str) -> list[float]:
        n = len(calls[stage]) // repeat
        return [sum(calls[stage][k * n : (k + 1) * n]) for k in range(repeat)] if n else []

    unet = calls["unet"]
    startup = raw["t_start"] - t0  # interpreter start-up, before the peer's first line ran
    return {
        "name": raw["name"], "runtime": raw["runtime"], "ok": True, "error": None, "versions": raw["versions"],
        "execution_provider": raw["execution_provider"], "threads": raw["threads"],
        "torch_threads": raw.get("torch_threads"),
        "cold_start_s": raw["cold_start_s"], "import_s": raw["import_s"], "load_s": raw["load_s"],
        "interpreter_start_s": startup,
        "text_encoder_s": summarize(per_generation("text_encoder")),
        "unet_call_s": {**summarize(unet), "first": unet[0] if unet else None},
        "unet_calls_per_generation": len(unet) // repeat,
        "unet_batch": 2 if spec["guidance"] > 1 else 1,
        "vae_decode_s": summarize(per_generation("vae_decoder")),
        "end_to_end_s": {**summarize(totals), "first": totals[0], "all": totals},
        "first_image_s": raw["cold_start_s"] + totals[0],
        "peak_rss_bytes": max(raw["peak_rss_bytes"], timeline["max_sampled_bytes"]),
        "peak_rss_source": raw["peak_rss_source"],
        "memory_timeline": timeline,
        "stages": [{"stage": s, "start_s": a - t0, "end_s": b - t0} for s, a, b in raw["stage_marks"]],
        "image": Path(spec["out_png"]).name,
        "precision": raw.get("precision"),  # what the runtime itself says it computes in, where it says
        "same_latents": raw.get("same_latents", True),  # False: its own noise (sdcpp), so no image comparison
        "notes": raw.get("notes", []),  # how its figures differ from the others', for the report
    }


def ratios(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, float | None]:
    """edge's figure over the peer's: below 1 means edge is faster or smaller."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "unet_call": ratio(ours["unet_call_s"].get("median"), peer["unet_call_s"].get("median")),
        "end_to_end": ratio(ours["end_to_end_s"].get("median"), peer["end_to_end_s"].get("median")),
        "peak_rss": ratio(ours["peak_rss_bytes"], peer["peak_rss_bytes"]),
        "cold_start": ratio(ours["cold_start_s"], peer["cold_start_s"]),
    }
