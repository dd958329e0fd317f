"""Stable Diffusion on onnxruntime, as stages (edge/stages/): text conditioning -> start latents -> denoise
(a generator of latents) -> decode. No torch here. The whole flow reads top to bottom in `Pipeline.generate`.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnxruntime as ort
from PIL import Image

from edge.adapters import Adapters, describe, lora_files
from edge.embeddings import Embedding, read_embedding
from edge.bundle import Component, Manifest, read_manifest, verify_tokenizer
from edge.graphs import Graphs
from edge.images import ImageInput, paste_back, to_tensor
from edge.inputs import image_inputs, image_size, output_size
from edge.memprobe import lean_malloc, rss_bytes
from edge.plan import TINY, Plan, int8_notes, make_plan, parse_bytes
from edge.schedulers import make_scheduler, scheduler_config_from_dict
from edge.sessions import open_session, run_options, session_options, with_initializers
from edge.stages import decode as decode_stage
from edge.stages.control import PREFIX as CONTROLNET
from edge.stages.control import check_controls, controlled, describe_control
from edge.stages.denoise import Blend, denoise, unet_call
from edge.stages.guidance_embedding import INPUT, embedding_width, guidance_embedding, guided_by_cfg
from edge.stages.inpaint import INPAINT_CHANNELS, blend, prepare, unet_channels
from edge.stages.preview import preview as preview_stage
from edge.stages.start import encode_image, image_latents, noise_latents
from edge.stages.text import encode_text
from edge.tokenizer import ClipTokenizer
from edge.validate import check_cache_interval, check_decoder, check_generate, whole_number

STAGES = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")  # loaded first; those the bundle has

Callback = Callable[[int, int, np.ndarray], None]  # (step index, total steps, latents)


@dataclass
class Result:
    images: list[Image.Image]
    timings: dict[str, float]  # seconds: text_encoder, unet (all steps), unet_per_step, vae_decoder, total
    params: dict[str, Any]  # what produced the images, as written into the PNGs
    latents: np.ndarray = field(repr=False)  # (N, C, h, w) final latents, before decoding


class Pipeline:
    def __init__(self, bundle: Path, manifest: Manifest, options: dict[bool, ort.SessionOptions] | None,
                 providers: list[str], tokenizer: ClipTokenizer, memory_budget: int | None, verify: bool):
        self.bundle = bundle
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.memory_budget = memory_budget
        self._options, self.providers = options, providers
        self.graphs = Graphs(bundle, manifest, self._new_session, verify)  # sessions, opened and freed by plan
        self.adapters = Adapters(bundle, manifest, verify)  # run-time LoRA: weights given in place of the graph's
        self._base_rss = rss_bytes()  # the process before any graph: what the planner adds to
        self.plan: Plan | None = None  # the plan of the latest generate() (or of load())
        self.denoised: np.ndarray | None = None  # (N, C, h, w) the latest step's estimate of the clean latents

    @classmethod
    def load(cls, bundle: Path | str, *, threads: int | None = None, verify: bool = True,
             providers: list[str] | None = None, memory_arena: bool | str | None = None,
             memory_budget: str | int | None = None, preload: bool = True, backend: str = "onnx",
             compute_units: str = "cpu_and_ne", optimization: str | None = None,
             inference_precision: str | None = None) -> "Pipeline":
        """Open a bundle; `verify` checks every graph's sha256 against the manifest before it is loaded.

        `memory_budget` ("4GB", "1.5GiB", bytes) plans every generate() to stay within it (see edge.plan):
        a budget no plan meets is refused here, for the default size, before anything is loaded.
        Without one, every component is loaded now and stays resident (`preload=False`: at first use).
        `memory_arena` (edge.sessions.ARENA_MODES) and `optimization` (onnxruntime's graph optimisation level) by
        default: "per_run" and "all" without a budget (fastest), "off" and "extended" under one (the planner's).
        `backend="coreml"` runs the bundle's Core ML graphs on macOS (edge.coreml_backend; `compute_units`:
        all, cpu_only, cpu_and_gpu, cpu_and_ne). `backend="openvino"` compiles the same ONNX graphs with OpenVINO
        (edge.openvino_backend; `inference_precision`: None for OpenVINO's choice on this CPU, or f32/bf16/f16).
        """
        if backend == "coreml":
            from edge.coreml_backend import CoreMLPipeline

            return CoreMLPipeline.load_coreml(bundle, compute_units=compute_units, verify=verify,
                                              memory_budget=memory_budget, preload=preload)
        if backend == "openvino":
            from edge.openvino_backend import OpenVINOPipeline

            return OpenVINOPipeline.load_openvino(bundle, threads=threads, verify=verify, memory_budget=memory_budget,
                                                  preload=preload, inference_precision=inference_precision)
        if backend != "onnx":
            raise ValueError(f"unknown backend {backend!r}; choose 'onnx', 'openvino' or 'coreml'")
        bundle = Path(bundle)
        manifest = read_manifest(bundle)
        if not manifest.components:
            raise ValueError(f"{bundle} holds only Core ML graphs: load it with backend='coreml' (macOS)")
        budget = None if memory_budget is None else parse_bytes(memory_budget)
        optimization = optimization or ("all" if budget is None else "extended")
        memory_arena = ("per_run" if budget is None else "off") if memory_arena is None else memory_arena
        if budget is not None:
            lean_malloc()  # freed buffers leave the process at once, as the planner's figures were measured
        options = {int8: session_options(threads, memory_arena, optimization, int8=int8) for int8 in (True, False)}
        providers = ["CPUExecutionProvider"] if providers is None else providers
        args = {"_option_args": {"threads": threads, "memory_arena": memory_arena, "optimization": optimization},
                "_run_options": run_options(memory_arena)}
        return cls._start(bundle, manifest, options, providers, budget, verify, preload, **args)

    @classmethod
    def _start(cls, bundle: Path, manifest: Manifest, options, providers: list[str], budget: int | None,
               verify: bool, preload: bool, **attributes) -> "Pipeline":
        """A pipeline over a read manifest: tokenizer, the plan for the default size, and (if everything
        stays resident) every stage loaded now. A budget no plan meets raises BudgetError here."""
        if verify:
            verify_tokenizer(bundle, manifest)  # a damaged vocab.json or merges.txt is named, not parsed
        tok = ClipTokenizer(bundle / manifest.tokenizer["vocab"], bundle / manifest.tokenizer["merges"],
                            max_length=manifest.text_max_length, pad_token=manifest.pad_token)
        pipe = cls(bundle, manifest, options, providers, tok, budget, verify)
        for name, value in attributes.items():  # backend settings that planning and loading read
            setattr(pipe, name, value)
        pipe.plan = pipe.plan_for(*manifest.default_size)
        if pipe.plan.resident and preload:
            for name in (n for n in STAGES if n in manifest.components):
                pipe.graphs.open(name)
        return pipe

    def plan_for(self, height: int, width: int, num_images: int = 1, guided: bool = True,
                 image: bool = False, decoder: str = "full", controlnets: tuple[str, ...] = ()) -> Plan:
        """How generate() will run at this size within the budget; BudgetError if nothing fits. `image`:
        img2img or inpainting (the VAE encoder's stage too); `decoder`: "full" or "tiny"."""
        if self.memory_budget is None:
            return Plan(None, True, 2 if guided else 1, False, None, 0, self._base_rss, (),
                        notes=int8_notes(self.manifest), decoder=decoder, tiny_previews=True)
        return make_plan(self.manifest, self.memory_budget, height, width, num_images=num_images, guided=guided,
                         base=self._base_rss + self.adapters.extra_bytes(), image=image, decoder=decoder,
                         controlnets=controlnets)

    def generate(self, prompt: str, negative_prompt: str = "", steps: int | None = None, guidance: float | None = None,
                 scheduler: str | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
                 latents: np.ndarray | None = None, callback: Callback | None = None, num_images: int = 1,
                 image: ImageInput | None = None, strength: float = 0.75, resize: bool = False,
                 mask: ImageInput | None = None, mask_blur: int = 0,
                 expand: tuple[int, int, int, int] | None = None, prompt_syntax: str = "auto",
                 decoder: str = "full", cache_interval: int = 1, loras=(), lora_dir: Path | str | None = None,
                 controls=()) -> Result:
        """Text to image (`steps`, `guidance`, `scheduler` left None: the bundle's recommendation, Manifest.
        generation_defaults), or with `image` (PIL image or path) img2img: the image encoded, noised to `strength`
        (0 < strength <= 1: the fraction of the steps that run) and denoised from there. `resize` fits an image
        whose size the bundle does not accept to the nearest size it does (else it is refused, naming it).
        With `mask` (white = repaint; `mask_blur` px soft edge) inpainting, and with `expand` (left, top, right,
        bottom pixels) outpainting: only the masked area is redrawn, the rest is pasted back from the input.
        `prompt_syntax`: "auto", "a1111" (`(word:1.3)`), "compel" (`word++`) or "none" (edge.prompts); `decoder`:
        "full" or "tiny" (the bundle's tiny autoencoder); `cache_interval` N > 1: DeepCache (--deep-cache bundles).
        `loras`: [(LoRA file, scale)] applied for this generation (edge.adapters), with any `<lora:NAME:SCALE>` in
        the prompts (NAME.safetensors in `lora_dir`); only the graphs whose weights change are reloaded.
        `controls`: [edge.stages.control.Control], the bundle's ControlNets with their images, scales, windows."""
        steps, guidance, scheduler = self.manifest.generation_defaults(
            steps=steps, guidance=guidance, scheduler=scheduler).values()
        guidance, seed = check_generate(guidance, seed)
        text, negative_text, active = lora_files(self.adapters, loras, prompt, negative_prompt, lora_dir)
        self.use_loras(active)
        check_decoder(self.manifest, decoder)
        check_cache_interval(self.manifest, cache_interval)
        picture, soft = image_inputs(self.graphs, image, resize, mask, mask_blur, expand)
        if picture is not None:
            height, width = image_size(picture, height, width)
        height, width = output_size(self.manifest, height, width)
        controls = check_controls(self.manifest, controls, height, width)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        sched = make_scheduler(scheduler, scheduler_config_from_dict(self.manifest.scheduler))
        sched.set_timesteps(steps, 1.0 if image is None else strength)
        rng = np.random.default_rng(seed)
        guided = guided_by_cfg(self.manifest, guidance)  # an LCM UNet takes guidance as an input instead
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        # start latents: seeded noise at the scheduler's initial level, or the encoded image noised to strength;
        # inpainting adds the mask-side inputs (edge.stages.inpaint) in diffusers' order of draws
        count = whole_number("num_images", num_images) if latents is None else len(np.atleast_1d(latents))
        nets = {"controlnets": tuple(CONTROLNET + c.name for c in controls)} if controls else {}
        self.plan = self.plan_for(height, width, count, guided=guided, decoder=decoder, image=picture is not None, **nets)
        t = time.perf_counter()
        nine = unet_channels(self.graphs) == INPAINT_CHANNELS
        pixels = None if picture is None else to_tensor(picture)  # (1, 3, H, W)
        x0 = None if pixels is None or (nine and strength == 1.0) else encode_image(self.graphs, pixels, rng)
        latents = noise_latents(self.manifest, latents, num_images, height, width, rng)  # (N, C, h, w)
        repaint = None if soft is None else prepare(self.graphs, pixels, soft, rng)
        self._done_with("vae_encoder")
        if picture is not None:
            timings["vae_encoder"] = time.perf_counter() - t
        from_noise = x0 is None or (repaint is not None and strength == 1.0)
        x = latents * np.float32(sched.init_noise_sigma) if from_noise else image_latents(x0, latents, sched)
        extra = None if repaint is None or repaint.extra is None else np.repeat(repaint.extra, len(x), axis=0)
        mixing = None if repaint is None or nine else blend(sched, x0, latents, repaint.latent_mask)

        t = time.perf_counter()
        context = self.encode_text(text, negative_text, guided=guided, copies=latents.shape[0],
                                   syntax=prompt_syntax, size=(height, width))
        self._done_with("text_encoder")
        timings["text_encoder"] = time.perf_counter() - t

        t = time.perf_counter()
        runs = len(sched.timesteps) - sched.start  # img2img runs the last `strength` of the steps
        for i, x in enumerate(self.denoise(x, context, sched, guidance, rng, start=sched.start, extra=extra,
                                           blend=mixing, cache_interval=cache_interval, controls=controls)):
            if callback is not None:
                callback(i, runs, x)
        self._done_with("unet", *(CONTROLNET + c.name for c in controls))
        timings["unet"] = time.perf_counter() - t
        timings["unet_per_step"] = timings["unet"] / max(runs, 1)

        t = time.perf_counter()
        images = [self.decode(x[k : k + 1]) for k in range(x.shape[0])]
        if repaint is not None:  # outside the mask, the input's own pixels
            images = [paste_back(picture, im, repaint.mask) for im in images]
        self._done_with("vae_decoder" if decoder == "full" else TINY)
        timings["vae_decoder"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start

        params = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
                  "scheduler": scheduler, "guidance": guidance, "height": height, "width": width,
                  "bundle_id": self.manifest.bundle_id, **({"strength": strength} if image is not None else {}),
                  **({"prompt_syntax": prompt_syntax} if prompt_syntax != "auto" else {}),
                  **({"mask": True, "mask_blur": mask_blur} if mask is not None else {}),
                  **({"expand": list(expand)} if expand is not None else {}),
                  **({"decoder": decoder} if decoder != "full" else {}),
                  **({"cache_interval": cache_interval} if cache_interval != 1 else {}),
                  **({"loras": describe(active)} if active else {}),
                  **({"controls": [describe_control(c) for c in controls]} if controls else {})}
        return Result(images=images, timings=timings, params=params, latents=x)

    # ----------------------------------------------------------------------- the stages, on this bundle

    def encode_text(self, prompt: str, negative_prompt: str, guided: bool, copies: int,
                    syntax: str = "auto", size: tuple[int, int] | None = None) -> np.ndarray:
        """(2N, L, D) as [unconditional x N, conditional x N] when guided, else (N, L, D) (edge.stages.text);
        staged plans load SDXL's text encoders one at a time."""
        staged = self.plan is not None and not self.plan.resident
        return encode_text(self.graphs, self.tokenizer, prompt, negative_prompt, guided, copies, syntax, size, staged)

    def denoise(self, x: np.ndarray, context: np.ndarray, sched, guidance: float, rng: np.random.Generator,
                start: int = 0, extra: np.ndarray | None = None, blend: Blend | None = None,
                cache_interval: int = 1, controls=()) -> Iterator[np.ndarray]:
        """Yield the latents after each scheduler step (edge.stages.denoise; ControlNets: edge.stages.control); the
        model's estimate of the clean latents at that step is kept as `self.denoised`, for previews."""
        two_calls = self.plan is not None and self.plan.guidance_batch == 1
        unet = controlled(self.unet, self.graphs, self.plan, controls, sched.timesteps, start) if controls else self.unet
        width = embedding_width(self.manifest)
        if width is not None:  # the guidance scale as the UNet's input (LCM), not as a second, unconditional pass
            unet = functools.partial(unet, inputs={INPUT: guidance_embedding(guidance, width, len(x))})
        for x, self.denoised in denoise(unet, x, context, sched, guidance, rng, two_calls=two_calls,
                                        start=start, extra=extra, blend=blend, cache_interval=cache_interval):
            yield x

    def unet(self, sample: np.ndarray, t: float, context: np.ndarray, cache: dict | None = None,
             reuse: bool = False, residuals: dict | None = None, inputs: dict | None = None) -> np.ndarray:
        """One UNet call, (B, C, h, w) -> noise prediction; a split UNet runs chunk by chunk (DeepCache: `cache`)."""
        return unet_call(self.graphs, self.plan, sample, t, context, cache, reuse, residuals, inputs)

    def decode(self, latents: np.ndarray) -> Image.Image:
        """(1, C, h, w) latents -> an image, whole or in tiles as the plan says."""
        return decode_stage.decode(self.graphs, self.plan, latents)

    def preview(self, latents: np.ndarray | None = None, index: int = 0, decoder: str = "auto") -> Image.Image:
        """A picture of the image as it forms, for progress previews (edge.stages.preview): by default of the
        latest step's estimate of the clean latents (image `index` of the batch), else of (1, C, h, w) `latents`;
        by the tiny autoencoder where the bundle has one and the plan leaves room, else by the linear map."""
        if latents is None:
            if self.denoised is None:
                raise ValueError("no denoising step has run yet: call preview() from generate()'s callback, or "
                                 "pass latents")
            latents = self.denoised[index : index + 1]
        return preview_stage(self.graphs, self.plan, latents, decoder)

    # ----------------------------------------------------------------------- sessions (edge.graphs)

    sessions = property(lambda self: self.graphs.sessions)  # component -> its loaded sessions
    load_seconds = property(lambda self: self.graphs.load_seconds)  # component -> seconds of its latest load
    timed_calls = property(lambda self: self.graphs.timed_calls, lambda self, v: setattr(self.graphs, "timed_calls", v))
    _run_options = property(lambda self: self.graphs.run_options, lambda self, v: setattr(self.graphs, "run_options", v))

    def load_embedding(self, path: Path | str, token: str | None = None) -> Embedding:
        """A textual-inversion embedding (edge.embeddings): its token works in prompts from the next generate()."""
        return self.adapters.add_embedding(read_embedding(path, token), self.tokenizer)

    def use_loras(self, loras: list) -> list[tuple[str, int]]:
        """Make [(LoraFile, scale)] the active LoRAs; reloads (and returns) the graphs whose weights change."""
        changed = self.adapters.use(loras, warn=lambda m: warnings.warn(m, stacklevel=4))
        for name, k in changed:
            self.graphs.reload(name, k)
        return changed

    def _new_session(self, component: Component, k: int) -> ort.InferenceSession:
        """Graph k of a component as an onnxruntime session (the Core ML backend makes MLModels instead), with
        the active LoRAs' weights in place of the graph's own."""
        int8 = component.precision.startswith("int8")  # int8 graphs: exact kernels (edge.cpu)
        weights = self.adapters.overrides.get((component.name, k))
        options = self._options[int8] if not weights else with_initializers(
            self._option_args, int8, weights, self.adapters.alive.setdefault((component.name, k), []))
        return open_session(self.bundle / component.graphs[k], options, self.providers)

    def _done_with(self, *names: str) -> None:
        for name in names if self.plan is not None and not self.plan.resident else ():  # else all stay resident
            self.graphs.free(name)
