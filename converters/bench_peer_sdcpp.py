"""stable-diffusion.cpp measured in its own fresh process, for `edge bench --peers sdcpp-q8_0,sdcpp-q4_0`: the
ggml C++ runtime a user would otherwise pick for quantised SD on a CPU, through its Python binding
(stable-diffusion-cpp-python), on the same model, size, steps, sampler, prompt and seed.

Run by path, like bench_peer.py, and it prints its figures in the same JSON shape:

    python bench_peer_sdcpp.py SPEC.json      # SPEC["mode"]: "checkpoint" | "convert" | "run"

- checkpoint (edge's own Python, the converter extra): the diffusers folder written as the original-layout
  (CompVis/LDM) single-file .safetensors that stable-diffusion.cpp reads (edge.converters.ldm_layout).
- convert (the sdcpp environment): that checkpoint converted once with sd.cpp's own convert mode to a gguf file
  of SPEC["wtype"] (q8_0, q4_0), cached. Converting once, rather than passing `wtype` to quantise on every load,
  is how sd.cpp models are shipped (its docs: `sd-cli -M convert --type q8_0`), so the load time measured is
  that of the gguf file a user would have, without a quantisation pass in it. sd.cpp quantises only rows of
  whole 32-weight blocks: SD 1.5's 3x3 convolutions stay fp32, and its gguf files are 3.2 GB (q8_0) and
  3.1 GB (q4_0) against the checkpoint's 4.3 GB.
- run (the sdcpp environment): load the gguf, generate SPEC["repeat"] times, time each stage.

Only the standard library is imported at the top, and `edge` never in the sdcpp environment. What sd.cpp cannot
share with the other runtimes: the initial latents (it draws its own noise from SPEC["seed"] with its
CUDA-compatible Philox generator, so the images differ: per-step time is compared, not the picture), and the
UNet batch (with guidance it runs the conditional and unconditional passes as two batch-1 calls per step; a
step's time, both calls, is what stands beside the others' batch-2 call).
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import sys
import time
from pathlib import Path

T_START = time.time()  # before the binding's import (it loads the shared library): part of the cold start


def write_checkpoint(spec: dict) -> None:
    """The diffusers folder as one LDM-layout checkpoint (edge's converters: torch and diffusers)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from edge.converters.ldm_layout import save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(spec["model"], torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    save_single_file(pipe, Path(spec["checkpoint"]))  # written beside, then renamed into place


def convert(spec: dict) -> None:
    """sd.cpp's own conversion of the checkpoint to a gguf file of one weight type (`sd -M convert --type`)."""
    from stable_diffusion_cpp import StableDiffusion

    out = Path(spec["gguf"])
    tmp = out.with_name(out.name + ".partial.gguf")
    tmp.unlink(missing_ok=True)
    converter = StableDiffusion(verbose=True)  # no model: the convert call takes the paths
    if not converter.convert(input_path=spec["checkpoint"], output_path=str(tmp), output_type=spec["wtype"]):
        raise SystemExit(f"stable-diffusion.cpp could not convert {spec['checkpoint']} to {spec['wtype']}")
    tmp.rename(out)


class Events:
    """sd.cpp's log lines and progress callbacks, each stamped with the wall clock as it arrives: the stage
    boundaries the timings are read from (the callbacks run on the calling thread, between ggml graphs)."""

    def __init__(self, sd_cpp, echo: str):
        self.log: list[tuple[float, str]] = []
        self.steps: list[tuple[float, int]] = []
        self._echo = echo

        @sd_cpp.sd_log_callback
        def on_log(level: int, text: bytes, data) -> None:
            line = text.decode("utf-8", errors="replace").rstrip()
            self.log.append((time.time(), line))
            if level >= 2:  # warnings and errors reach the bench's output; the rest stays in the record
                print(f"{self._echo} {line}", file=sys.stderr, flush=True)

        @sd_cpp.sd_progress_callback
        def on_step(step: int, steps: int, _seconds: float, data) -> None:
            self.steps.append((time.time(), step))  # while loading: bytes read, then one per denoising step

        self._callbacks = (on_log, on_step)  # kept: ctypes does not hold a callback alive
        sd_cpp.sd_set_log_callback(on_log, ctypes.c_void_p(0))
        sd_cpp.sd_set_progress_callback(on_step, ctypes.c_void_p(0))  # also keeps sd.cpp's bars off stderr

    def first(self, pattern: str, after: float) -> float:
        """The time of the first log line matching `pattern` at or after `after`."""
        for t, line in self.log:
            if t >= after and re.search(pattern, line):
                return t
        raise SystemExit(f"stable-diffusion.cpp did not log {pattern!r}; its log ends: "
                         + " | ".join(line for _, line in self.log[-5:]))

    def matching(self, pattern: str) -> list[re.Match]:
        return [m for _, line in self.log if (m := re.search(pattern, line))]

    def matching_all(self, pattern: str, line_pattern: str) -> list[tuple[str, ...]]:
        """Every match of `pattern` in the lines that match `line_pattern`."""
        return [g for _, line in self.log if re.search(line_pattern, line) for g in re.findall(pattern, line)]


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


def _generation(sd, events: Events, spec: dict, label: str) -> tuple[list, float, object]:
    """One generation: its stage marks (stage, start, end) from sd.cpp's own events, its wall time, its image.

    text encoder: the call's start to sd.cpp's "get_learned_condition completed" (prompt and negative prompt);
    UNet: one mark per denoising step, between consecutive progress callbacks (both guidance passes and the
    sampler's update); VAE: "decoding N latents" to "decode_first_stage completed"."""
    start = time.time()
    n_steps = len(events.steps)
    t = time.perf_counter()
    # edge and diffusers skip the unconditional pass at guidance <= 1, sd.cpp at exactly 1
    cfg_scale = spec["guidance"] if spec["guidance"] > 1 else 1.0
    images = sd.generate_image(
        prompt=spec["prompt"], negative_prompt=spec["negative_prompt"], width=spec["width"], height=spec["height"],
        cfg_scale=cfg_scale, sample_method=spec["sample_method"], scheduler=spec["sd_scheduler"],
        sample_steps=spec["steps"], seed=spec["seed"])  # progress arrives through `events`
    wall = time.perf_counter() - t
    steps = events.steps[n_steps:]
    if len(steps) != spec["steps"] + 1 or not images:
        raise SystemExit(f"{label}: stable-diffusion.cpp reported {len(steps)} progress events for {spec['steps']} "
                         f"steps and returned {len(images)} image(s)")
    cond_end = events.first(r"get_learned_condition completed", start)
    decode_start = events.first(r"decoding \d+ latents", steps[-1][0])
    decode_end = events.first(r"decode_first_stage completed", decode_start)
    marks = [("text_encoder", start, cond_end)]
    marks += [("unet", a, b) for (a, _), (b, _) in zip(steps, steps[1:])]
    marks.append(("vae_decoder", decode_start, decode_end))
    rate = (steps[-1][0] - steps[0][0]) / spec["steps"]
    print(f"{label} step {spec['steps']}/{spec['steps']} {rate:.2f}s/step", file=sys.stderr, flush=True)
    return marks, wall, images[0]


def run(spec: dict) -> dict:
    peer = spec["peer"]
    import stable_diffusion_cpp as sd_cpp
    from stable_diffusion_cpp import StableDiffusion

    events = Events(sd_cpp, f"[{peer}]")
    import_s = time.time() - T_START
    print(f"[{peer}] imported in {import_s:.1f}s; loading {spec['gguf']}", file=sys.stderr, flush=True)
    load_start = time.time()
    t = time.perf_counter()
    # txt2img only: no VAE encoder. Threads: the bench's, else the binding's default (half the CPUs).
    sd = StableDiffusion(model_path=spec["gguf"], n_threads=-1 if spec["threads"] is None else spec["threads"],
                         vae_decode_only=True, verbose=True)  # verbose: sd.cpp's own output is not redirected
    logging.getLogger("stable-diffusion-cpp-python").setLevel(logging.WARNING)  # but the binding prints no banner
    load_s = time.perf_counter() - t
    load_end = time.time()
    if not sd.model:  # the binding hands back a NULL context rather than raising
        raise SystemExit(f"stable-diffusion.cpp could not load {spec['gguf']}: "
                         + " | ".join(line for _, line in events.log[-3:]))
    print(f"[{peer}] loaded in {load_s:.1f}s", file=sys.stderr, flush=True)

    calls: list[tuple[str, float, float]] = []
    totals, image = [], None
    for k in range(spec["repeat"]):
        marks, wall, first = _generation(sd, events, spec, f"[{peer}] run {k + 1}/{spec['repeat']}")
        image = first if image is None else image
        calls += marks
        totals.append(wall)
    image.save(spec["out_png"])
    peak, source = _peak_rss()
    system = sd_cpp.sd_get_system_info().decode()
    features = sorted(k for k, v in re.findall(r"(\w+) = (\d)", system) if v == "1")
    tensor_types = {m.group(1).strip() or "all": {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", m.group(2))}
                    for m in events.matching(r"- ([\w ]*?)\s*[Ww]eight type stat:(.*)")}
    all_types = tensor_types.get("all", {})
    params_mb = {k: float(v) for k, v in events.matching_all(r"(\w+) ([\d.]+)MB\(RAM\)", r"total params memory")}
    version = sd_cpp.sd_version().decode()
    versions = {"stable-diffusion-cpp-python": sd_cpp.__version__,
                "stable-diffusion.cpp": version if version != "unknown" else f"vendored in {sd_cpp.__version__}"}
    return {
        "name": peer, "ok": True, "error": None, "versions": versions,
        "runtime": f"stable-diffusion.cpp (stable-diffusion-cpp-python {sd_cpp.__version__}, ggml CPU, "
                   f"{spec['wtype']} weights)",
        "execution_provider": "ggml CPU", "threads": sd.n_threads, "torch_threads": None,
        "import_s": import_s, "load_s": load_s, "cold_start_s": import_s + load_s,
        "calls": {s: [b - a for stage, a, b in calls if stage == s] for s in ("text_encoder", "unet", "vae_decoder")},
        "end_to_end_all": totals,
        "peak_rss_bytes": peak, "peak_rss_source": source,
        "stage_marks": [("load", load_start, load_end)] + calls,
        "t_start": T_START,
        "precision": {"weights": spec["wtype"], "gguf": Path(spec["gguf"]).name, "tensor_types": tensor_types,
                      "params_mb": params_mb,
                      "sample_method": spec["sample_method"], "scheduler": spec["sd_scheduler"],
                      "device_capabilities": features},
        "same_latents": False,
        "notes": [
            f"stable-diffusion.cpp draws its own initial noise (seed {spec['seed']}, its Philox generator), so its "
            "image is not compared with edge's; its per-step time is",
            "UNet s/call is one denoising step: with guidance, two batch-1 UNet calls (conditional and "
            "unconditional) and the sampler's update, beside the others' one batch-2 call",
            f"{spec['wtype']} where sd.cpp's convert quantises (rows of whole 32-weight blocks: "
            f"{all_types.get(spec['wtype'], 0)} tensors); 3x3 convolutions, norms, biases and embeddings keep the "
            f"checkpoint's fp32 ({all_types.get('f32', 0)} tensors)",
        ],
    }


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    if spec["mode"] == "checkpoint":
        write_checkpoint(spec)
    elif spec["mode"] == "convert":
        convert(spec)
    else:
        result = run(spec)
        Path(spec["out_json"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
