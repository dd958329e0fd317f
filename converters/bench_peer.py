"""One peer runtime measured in its own fresh process, for `edge bench --peers`: what a user would pick
instead of edge, run on the same model, size, steps, scheduler, prompt and initial latents.

Run by path with whichever Python has the peer installed (the optimum and OpenVINO peers live in their own
virtual environments), so this file imports only the standard library at the top, and never imports `edge`:

    python bench_peer.py SPEC.json      # SPEC: {"peer": "diffusers" | "diffusers-int8" | "optimum" | "optimum-int8"
                                        #        | "openvino" | "openvino-f32" | "openvino-int8",
                                        #        "mode": "run" | "export" | "quantize", ...}

It writes SPEC["out_json"] (timings of its own calls, the peak RSS the kernel recorded for this process)
and the first generation's image. Memory over time is sampled from outside, by the harness.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

T_START = time.time()  # before the heavy imports, which are part of a peer's cold start

SCHEDULERS = {  # a copy of edge.schedulers.DIFFUSERS_EQUIVALENT: this file runs in peer venvs without edge
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}


class TimedSession:
    """An onnxruntime session (optimum's) whose runs are timed into `calls` as (stage, start, end)."""

    def __init__(self, session, stage: str, calls: list):
        self._session, self._stage, self._calls = session, stage, calls

    def run(self, *args, **kwargs):
        t0 = time.time()
        out = self._session.run(*args, **kwargs)
        self._calls.append((self._stage, t0, time.time()))
        return out

    def run_with_iobinding(self, *args, **kwargs):
        t0 = time.time()
        out = self._session.run_with_iobinding(*args, **kwargs)
        self._calls.append((self._stage, t0, time.time()))
        return out

    def __getattr__(self, name: str):
        return getattr(self._session, name)


class TimedRequest:
    """An OpenVINO compiled model (optimum-intel's `part.request`) whose calls are timed into `calls`."""

    def __init__(self, request, stage: str, calls: list):
        self._request, self._stage, self._calls = request, stage, calls

    def __call__(self, *args, **kwargs):
        t0 = time.time()
        out = self._request(*args, **kwargs)
        self._calls.append((self._stage, t0, time.time()))
        return out

    def __getattr__(self, name: str):
        return getattr(self._request, name)


def _vm(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _peak_rss() -> tuple[int, str]:
    hwm = _vm("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM (kernel high-water mark of this process)"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), "getrusage ru_maxrss"  # bytes on macOS


def _time_torch_module(module, stage: str, calls: list) -> None:
    """Forward hooks (torch's own API) record each call of `module`."""
    starts: list[float] = []
    module.register_forward_pre_hook(lambda *_: starts.append(time.time()))
    module.register_forward_hook(lambda *_: calls.append((stage, starts.pop(), time.time())))


def load_diffusers(spec: dict, calls: list):
    import torch
    from diffusers import StableDiffusionPipeline

    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    pipe = StableDiffusionPipeline.from_pretrained(spec["model"], torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    precision = "eager fp32"
    if spec["peer"] == "diffusers-int8":  # torch's own CPU int8 without calibration: dynamic, Linear layers only
        pipe.unet = torch.ao.quantization.quantize_dynamic(pipe.unet, {torch.nn.Linear}, dtype=torch.qint8)
        precision = "eager, int8 dynamic Linear in the UNet"
    _time_torch_module(pipe.text_encoder, "text_encoder", calls)
    _time_torch_module(pipe.unet, "unet", calls)
    _time_torch_module(pipe.vae.decoder, "vae_decoder", calls)
    import diffusers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    runtime = f"diffusers {diffusers.__version__} (torch {torch.__version__.split('+')[0]}, {precision})"
    return pipe, versions, runtime, "torch CPU", None


def load_optimum(spec: dict, calls: list):
    import diffusers
    import onnxruntime as ort
    import optimum.version
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    options = ort.SessionOptions()
    if spec["threads"] is not None:
        options.intra_op_num_threads = spec["threads"]
    pipe = ORTStableDiffusionPipeline.from_pretrained(spec["optimum_dir"], provider="CPUExecutionProvider",
                                                      session_options=options, local_files_only=True)
    for stage, part in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet), ("vae_decoder", pipe.vae_decoder)):
        part.session = TimedSession(part.session, stage, calls)
    versions = {"optimum": optimum.version.__version__, "onnxruntime": ort.__version__,
                "diffusers": diffusers.__version__}
    kind = ", int8 UNet (ORTQuantizer avx512_vnni, dynamic)" if spec["peer"] == "optimum-int8" else ""
    runtime = f"optimum {optimum.version.__version__} (onnxruntime {ort.__version__}, CPU{kind})"
    return pipe, versions, runtime, "CPUExecutionProvider", None


OV_TYPES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def load_openvino(spec: dict, calls: list):
    """optimum-intel's pipeline on OpenVINO's CPU plugin, compiled with OpenVINO's own defaults but for the
    thread count: the inference precision is the one OpenVINO picks on this CPU (openvino-f32: held to fp32),
    read back and reported."""
    import diffusers
    import openvino as ov
    from optimum.intel import OVStableDiffusionPipeline
    from optimum.intel.version import __version__ as intel_version

    ov_config = {} if spec["threads"] is None else {"INFERENCE_NUM_THREADS": spec["threads"]}
    if spec["peer"] == "openvino-f32":
        ov_config["INFERENCE_PRECISION_HINT"] = "f32"
    # compiles every part for the CPU, as a user's from_pretrained does: part of the load time
    pipe = OVStableDiffusionPipeline.from_pretrained(spec["openvino_dir"], ov_config=ov_config, local_files_only=True)
    inference = {}
    for stage, part in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet), ("vae_decoder", pipe.vae_decoder)):
        hint = part.request.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        inference[stage] = OV_TYPES.get(hint, hint)
        part.request = TimedRequest(part.request, stage, calls)
    core = ov.Core()
    int8 = spec["peer"] == "openvino-int8"
    precision = {"inference": inference, "weights": "int8 (nncf weight compression)" if int8 else "fp32",
                 "device": core.get_property("CPU", "FULL_DEVICE_NAME"),
                 "device_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))}
    versions = {"optimum-intel": intel_version, "openvino": ov.__version__.split("-")[0],
                "diffusers": diffusers.__version__}
    kinds = sorted(set(inference.values()))
    runtime = (f"optimum-intel {intel_version} (OpenVINO {versions['openvino']}, CPU, {'/'.join(kinds)} inference"
               + (", int8 weights" if int8 else "") + ")")
    return pipe, versions, runtime, "OpenVINO CPU", precision


def quantize_openvino(spec: dict) -> None:
    """The int8 an OpenVINO user gets without calibration data: optimum-intel's 8-bit weight compression
    (OVWeightQuantizationConfig(bits=8), nncf: int8 weights, activations at the inference precision) of
    every part of the fp32 export. Cached like the export."""
    import shutil

    from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

    out = Path(spec["openvino_dir"])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = OVStableDiffusionPipeline.from_pretrained(spec["fp32_dir"], compile=False, local_files_only=True,
                                                     quantization_config=OVWeightQuantizationConfig(bits=8))
    pipe.save_pretrained(tmp)
    tmp.rename(out)


def export(spec: dict) -> None:
    """The peer library's own export of the diffusers folder, done once and cached (not part of any timing):
    optimum's ONNX, or optimum-intel's OpenVINO IR with fp32 weights (its 8-bit default, for models over 1B
    parameters, turned off: the fp peer is fp on every model; OpenVINO picks the precision it computes in)."""
    if spec["peer"] == "openvino":
        from optimum.intel import OVStableDiffusionPipeline as Pipeline

        out, options = Path(spec["openvino_dir"]), {"load_in_8bit": False, "compile": False}
    else:
        from optimum.onnxruntime import ORTStableDiffusionPipeline as Pipeline

        out, options = Path(spec["optimum_dir"]), {}
    tmp = out.with_name(out.name + ".partial")
    staging = _for_old_transformers(Path(spec["model"]), out.with_name(out.name + ".staging"))
    _check_text_encoder_loads(staging)
    pipe = Pipeline.from_pretrained(str(staging), export=True, local_files_only=True, **options)
    pipe.save_pretrained(tmp)
    tmp.rename(out)
    if staging != Path(spec["model"]):
        import shutil

        shutil.rmtree(staging)


def quantize_optimum(spec: dict) -> None:
    """The int8 a user of optimum gets: `ORTQuantizer` with its AVX-512 VNNI config (dynamic, uint8
    activations, int8 weights, its default operators: Conv and MatMul among them) on the UNet of the fp32
    export, the other parts shared with it by hard links. Cached like the export."""
    import os
    import shutil

    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    fp32, out = Path(spec["fp32_dir"]), Path(spec["optimum_dir"])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fp32, tmp, copy_function=os.link, ignore=lambda d, names: names if Path(d).name == "unet" else [])
    quantizer = ORTQuantizer.from_pretrained(fp32 / "unet", file_name="model.onnx")
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    written = quantizer.quantize(config, tmp / "unet", use_external_data_format=True)
    graph = next(Path(written).glob("*quantized.onnx"))
    graph.rename(tmp / "unet" / "model.onnx")  # the pipeline loads unet/model.onnx; the data file keeps its name
    shutil.copy2(fp32 / "unet" / "config.json", tmp / "unet" / "config.json")
    tmp.rename(out)


def _for_old_transformers(model: Path, staging: Path) -> Path:
    """`model` itself, or a staging folder of links to its parts with the two that recent transformers save
    in a form the older transformers of the peers' environments misread rewritten (optimum's 4.57 reads
    neither; OpenVINO's 5.5 reads the tokenizer but not the text encoder):

    - the CLIP tokenizer as tokenizer.json alone: vocab.json + merges.txt are written out from it;
    - CLIPTextModel weights without the `text_model.` prefix: 4.x and 5.5 would leave every weight randomly
      initialised (with only a warning), so the prefix is put back.
    """
    tok, te = model / "tokenizer", model / "text_encoder"
    fix_tok = (tok / "tokenizer.json").is_file() and not (tok / "vocab.json").is_file()
    fix_te = _unprefixed_text_encoder(te)
    if not (fix_tok or fix_te):
        return model
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for part in model.iterdir():
        if not (part.name == "tokenizer" and fix_tok or part.name == "text_encoder" and fix_te):
            (staging / part.name).symlink_to(part.resolve())
    if fix_tok:
        shutil.copytree(tok, staging / "tokenizer")
        bpe = json.loads((tok / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        (staging / "tokenizer" / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False),
                                                        encoding="utf-8")
        (staging / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                                        encoding="utf-8")
    if fix_te:
        from safetensors.torch import load_file, save_file

        (staging / "text_encoder").mkdir()
        shutil.copy(te / "config.json", staging / "text_encoder" / "config.json")
        weights = {}
        for shard in sorted(te.glob("*.safetensors")):
            weights.update({f"text_model.{k}": v for k, v in load_file(str(shard)).items()})
        save_file(weights, str(staging / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    return staging


def _unprefixed_text_encoder(te: Path) -> bool:
    """Does the text encoder keep its weights without the `text_model.` prefix (transformers >= 5)?"""
    from safetensors import safe_open

    shards = sorted(te.glob("*.safetensors"))
    if not shards:
        return False
    with safe_open(str(shards[0]), framework="numpy") as f:
        keys = list(f.keys())
    return bool(keys) and not any(k.startswith("text_model.") for k in keys)


def _check_text_encoder_loads(folder: Path) -> None:
    """Refuse to export a text encoder whose weights this transformers would silently re-initialise."""
    from transformers import CLIPTextModel

    _, info = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), output_loading_info=True)
    if info["missing_keys"]:
        raise SystemExit(f"peer export: {len(info['missing_keys'])} text encoder weights would be random "
                         f"(e.g. {info['missing_keys'][0]}); this model's layout is not readable here")


LOADERS = {"diffusers": load_diffusers, "optimum": load_optimum, "openvino": load_openvino}


def run(spec: dict) -> dict:
    calls: list[tuple[str, float, float]] = []
    peer = spec["peer"]
    import numpy as np
    import torch

    if peer.startswith("diffusers"):  # the library's import is part of a user's cold start
        from diffusers import StableDiffusionPipeline  # noqa: F401
    elif peer.startswith("openvino"):
        from optimum.intel import OVStableDiffusionPipeline  # noqa: F401
    else:
        from optimum.onnxruntime import ORTStableDiffusionPipeline  # noqa: F401
    _quiet_libraries()
    import_s = time.time() - T_START
    print(f"[{peer}] imported in {import_s:.1f}s; loading", file=sys.stderr, flush=True)
    load_start = time.time()
    t = time.perf_counter()
    load = LOADERS[peer.split("-")[0]]
    pipe, versions, runtime, provider, precision = load(spec, calls)
    load_s = time.perf_counter() - t
    load_end = time.time()
    print(f"[{peer}] loaded in {load_s:.1f}s", file=sys.stderr, flush=True)

    import diffusers

    pipe.set_progress_bar_config(disable=True)
    cls_name, extra = SCHEDULERS[spec["scheduler"]]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    latents = torch.from_numpy(np.load(spec["latents"]))
    totals, image = [], None
    for k in range(spec["repeat"]):
        t = time.perf_counter()
        out = pipe(spec["prompt"], negative_prompt=spec["negative_prompt"], num_inference_steps=spec["steps"],
                   guidance_scale=spec["guidance"], height=spec["height"], width=spec["width"],
                   latents=latents.clone(), callback_on_step_end=_progress(f"[{peer}] run {k + 1}/{spec['repeat']}",
                                                                           spec["steps"]))
        totals.append(time.perf_counter() - t)
        image = out.images[0] if image is None else image
    image.save(spec["out_png"])
    peak, source = _peak_rss()
    durations = {s: [b - a for stage, a, b in calls if stage == s] for s in ("text_encoder", "unet", "vae_decoder")}
    return {
        "name": peer, "runtime": runtime, "ok": True, "error": None, "versions": versions,
        "execution_provider": provider, "threads": spec["threads"],
        "torch_threads": torch.get_num_threads(),
        "import_s": import_s, "load_s": load_s, "cold_start_s": import_s + load_s,
        "calls": {s: v for s, v in durations.items()},
        "end_to_end_all": totals,
        "peak_rss_bytes": peak, "peak_rss_source": source,
        "stage_marks": [("load", load_start, load_end)] + calls,
        "t_start": T_START,
        "precision": precision,
    }


def _progress(prefix: str, total: int):
    live = sys.stderr.isatty()
    start = time.perf_counter()

    def callback(pipe, i, timestep, kwargs):
        last = i + 1 == total
        if live or last:
            rate = (time.perf_counter() - start) / (i + 1)
            print(f"\r{prefix} step {i + 1}/{total} {rate:.2f}s/step", end="\n" if last else "",
                  file=sys.stderr, flush=True)
        return kwargs

    return callback


def _quiet_libraries() -> None:
    """Loading bars would drown the harness's progress lines; the libraries' own switches turn them off."""
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except ImportError:  # older releases: the bars stay
        pass


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    if spec["mode"] == "export":
        export(spec)
        return 0
    if spec["mode"] == "quantize":
        (quantize_openvino if spec["peer"] == "openvino-int8" else quantize_optimum)(spec)
        return 0
    result = run(spec)
    Path(spec["out_json"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
