"""Text to image on onnxruntime: tokenize -> encode text -> denoise (a generator of latents) -> decode.

No torch here. The whole flow reads top to bottom in `Pipeline.generate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnxruntime as ort
from PIL import Image

from edge.bundle import Component, Manifest, read_manifest, verify_files, verify_tokenizer
from edge.memprobe import release_memory, rss_bytes
from edge.plan import Plan, int8_notes, make_plan, parse_bytes
from edge.schedulers import make_scheduler, scheduler_config_from_dict
from edge.sessions import session_options
from edge.tokenizer import ClipTokenizer
from edge.validate import check_generate
from edge.vae_tiling import decode_tiled, decode_tiled_shared

STAGES = ("text_encoder", "unet", "vae_decoder")

Callback = Callable[[int, int, np.ndarray], None]  # (step index, total steps, latents)


@dataclass
class Result:
    images: list[Image.Image]
    timings: dict[str, float]  # seconds: text_encoder, unet (all steps), unet_per_step, vae_decoder, total
    params: dict[str, Any]  # what produced the images, as written into the PNGs
    latents: np.ndarray = field(repr=False)  # (N, C, h, w) final latents, before decoding


def _to_pil(image: np.ndarray) -> Image.Image:
    """(3, H, W) in ~[-1, 1] -> an 8-bit RGB image."""
    image = np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)  # (H, W, 3)
    return Image.fromarray((image * 255).round().astype(np.uint8))


class Pipeline:
    def __init__(self, bundle: Path, manifest: Manifest, options: dict[bool, ort.SessionOptions] | None,
                 providers: list[str], tokenizer: ClipTokenizer, memory_budget: int | None, verify: bool):
        self.bundle = bundle
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.memory_budget = memory_budget
        self.sessions: dict[str, list[ort.InferenceSession]] = {}  # loaded components, graphs in run order
        self.load_seconds: dict[str, float] = {}  # session creation per component, latest load
        self._options, self.providers, self._verify = options, providers, verify
        self._verified: set[str] = set()
        self._base_rss = rss_bytes()  # the process before any graph: what the planner adds to
        self.plan: Plan | None = None  # the plan of the latest generate() (or of load())
        self.timed_calls: list[tuple[str, float, float]] | None = None  # a list logs every graph run (UNet: per call)

    @classmethod
    def load(cls, bundle: Path | str, *, threads: int | None = None, verify: bool = True,
             providers: list[str] | None = None, memory_arena: bool = False,
             memory_budget: str | int | None = None, preload: bool = True, backend: str = "onnx",
             compute_units: str = "cpu_and_ne", optimization: str | None = None) -> "Pipeline":
        """Open a bundle; `verify` checks every graph's sha256 against the manifest before it is loaded.

        `memory_budget` ("4GB", "1.5GiB", bytes) plans every generate() to stay within it (see edge.plan):
        a budget no plan meets is refused here, for the default size, before anything is loaded.
        Without one, every component is loaded now and stays resident (`preload=False`: at first use).
        `memory_arena` keeps onnxruntime's CPU arena, which holds on to its largest activations between
        calls (faster allocation, GBs more resident for a full-size UNet); off by default, as on a device.
        `optimization` is onnxruntime's graph optimisation level (see session_options): by default "all"
        without a budget (fastest) and "extended" under one (leaner; what the planner's figures assume).
        `backend="coreml"` runs the bundle's Core ML graphs on macOS (edge.coreml_backend; `compute_units`:
        all, cpu_only, cpu_and_gpu, cpu_and_ne).
        """
        if backend == "coreml":
            from edge.coreml_backend import CoreMLPipeline

            return CoreMLPipeline.load_coreml(bundle, compute_units=compute_units, verify=verify,
                                              memory_budget=memory_budget, preload=preload)
        if backend != "onnx":
            raise ValueError(f"unknown backend {backend!r}; choose 'onnx' or 'coreml'")
        bundle = Path(bundle)
        manifest = read_manifest(bundle)
        if not manifest.components:
            raise ValueError(f"{bundle} holds only Core ML graphs: load it with backend='coreml' (macOS)")
        budget = None if memory_budget is None else parse_bytes(memory_budget)
        if optimization is None:
            optimization = "all" if budget is None else "extended"
        options = {int8: session_options(threads, memory_arena, optimization, int8=int8) for int8 in (True, False)}
        providers = ["CPUExecutionProvider"] if providers is None else providers
        return cls._start(bundle, manifest, options, providers, budget, verify, preload)

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
            for name in STAGES:
                pipe._open(name)
        return pipe

    def plan_for(self, height: int, width: int, num_images: int = 1, guided: bool = True) -> Plan:
        """How generate() will run at this size within the budget; BudgetError if nothing fits."""
        if self.memory_budget is None:
            return Plan(None, True, 2 if guided else 1, False, None, 0, self._base_rss, (),
                        notes=int8_notes(self.manifest))
        return make_plan(self.manifest, self.memory_budget, height, width, num_images=num_images,
                         guided=guided, base=self._base_rss)

    def generate(self, prompt: str, negative_prompt: str = "", steps: int = 20, guidance: float = 7.5,
                 scheduler: str = "euler", seed: int = 0, height: int | None = None, width: int | None = None,
                 latents: np.ndarray | None = None, callback: Callback | None = None,
                 num_images: int = 1) -> Result:
        guidance, seed = check_generate(guidance, seed)
        height, width = self._check_size(height, width)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        sched = make_scheduler(scheduler, scheduler_config_from_dict(self.manifest.scheduler))
        sched.set_timesteps(steps)
        rng = np.random.default_rng(seed)
        latents = self._initial_latents(latents, num_images, height, width, rng)
        self.plan = self.plan_for(height, width, latents.shape[0], guided=guidance > 1)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        t = time.perf_counter()
        context = self.encode_text(prompt, negative_prompt, guided=guidance > 1, copies=latents.shape[0])
        self._done_with("text_encoder")
        timings["text_encoder"] = time.perf_counter() - t

        t = time.perf_counter()
        x = latents * np.float32(sched.init_noise_sigma)
        for i, x in enumerate(self.denoise(x, context, sched, guidance, rng)):
            if callback is not None:
                callback(i, steps, x)
        self._done_with("unet")
        timings["unet"] = time.perf_counter() - t
        timings["unet_per_step"] = timings["unet"] / len(sched.timesteps)

        t = time.perf_counter()
        images = [self.decode(x[k : k + 1]) for k in range(x.shape[0])]
        self._done_with("vae_decoder")
        timings["vae_decoder"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start

        params = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
                  "scheduler": scheduler, "guidance": guidance, "height": height, "width": width,
                  "bundle_id": self.manifest.bundle_id}
        return Result(images=images, timings=timings, params=params, latents=x)

    def encode_text(self, prompt: str, negative_prompt: str, guided: bool, copies: int) -> np.ndarray:
        """(2N, 77, D) as [unconditional x N, conditional x N] when guided, else (N, 77, D)."""
        texts = [(negative_prompt, "negative prompt"), (prompt, "prompt")] if guided else [(prompt, "prompt")]
        session = self._open("text_encoder")[0]
        states = [self._run("text_encoder", session, None, {"input_ids": self.tokenizer.encode_prompt(s, what)})[0]
                  for s, what in texts]
        return np.concatenate([np.repeat(h, copies, axis=0) for h in states])  # (B, 77, D)

    def denoise(self, x: np.ndarray, context: np.ndarray, sched, guidance: float,
                rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Yield the latents after each scheduler step; the caller decides what to do with them."""
        guided = context.shape[0] == 2 * x.shape[0]
        one_call = not guided or (self.plan is None or self.plan.guidance_batch == 2)
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, i).astype(np.float32)  # (N, C, h, w)
            if one_call:
                x_in = np.concatenate([x_in, x_in]) if guided else x_in
                out = self.unet(x_in, t, context)  # (B, C, h, w)
            else:  # two batch-1 calls: half the activations, same result
                uncond_ctx, cond_ctx = np.split(context, 2)
                out = np.concatenate([self.unet(x_in, t, uncond_ctx), self.unet(x_in, t, cond_ctx)])
            if guided:
                uncond, cond = np.split(out, 2)
                out = uncond + np.float32(guidance) * (cond - uncond)
            noise = rng.standard_normal(x.shape, dtype=np.float32) if sched.needs_noise else None
            x = sched.step(out, i, x, noise=noise)
            yield x

    def unet(self, sample: np.ndarray, t: float, context: np.ndarray) -> np.ndarray:
        """One UNet call, (B, C, h, w) -> noise prediction; a split UNet runs chunk by chunk.

        Logged in `timed_calls` as one "unet" entry: all its chunks, and loading those not resident.
        """
        start = time.time()
        env = {"sample": sample, "timestep": np.full((sample.shape[0],), t, dtype=np.float32),
               "encoder_hidden_states": context}
        component = self.manifest.components["unet"]
        per_call = self.plan is not None and self.plan.unet_per_call
        keep = self.plan.unet_keep if per_call else len(component.graphs)
        sessions = self._open("unet", keep)  # the resident chunks; the others load for this call only
        chunks = component.chunks or (None,)
        last_use = {n: k for k, c in enumerate(component.chunks) for n in c.inputs}
        for k, chunk in enumerate(chunks):
            session = sessions[k] if k < keep else self._load_graph(component, k)
            names = [o.name for o in session.get_outputs()]
            feeds = {i.name: env[i.name] for i in session.get_inputs()}
            env.update(zip(names, session.run(names, feeds)))
            del session, feeds
            if chunk is not None:
                env = {n: v for n, v in env.items() if last_use.get(n, -1) > k or n == "noise_pred"}
        if self.timed_calls is not None:
            self.timed_calls.append(("unet", start, time.time()))
        return env["noise_pred"]

    def decode(self, latents: np.ndarray) -> Image.Image:
        z = (latents / np.float32(self.manifest.vae_scaling_factor)).astype(np.float32)  # (1, C, h, w)
        tile = None if self.plan is None else self.plan.vae_tile
        scale = self.manifest.vae_scale_factor
        components = self.manifest.components
        if tile is not None and "vae_decoder_tiled" in components:  # shared GroupNorm statistics
            tiled = components["vae_decoder_tiled"]
            shared = self._open("vae_decoder_tiled")[0]
            first = tiled.inputs[0].name  # "hidden": the tail of a cut decoder; "latent_sample": older bundles
            up, overlap = 1, self.plan.vae_overlap
            if first == "hidden":  # the head (mid block, first up block) runs on the whole latent, the tail per tile
                head = self._open("vae_decoder_head")[0]
                hidden = self._run("vae_decoder", head, None, {"latent_sample": z})[0]  # (1, M, 2^k h, 2^k w)
                up = hidden.shape[2] // z.shape[2]
                z, tile, overlap, scale = hidden, tile * up, overlap * up, scale // up

            def run_shared(part: np.ndarray, stats: np.ndarray, mix: float | np.ndarray,
                           weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                gn_mix = np.broadcast_to(np.asarray(mix, np.float32), tiled.inputs[2].shape)  # (L,), or (1,): older
                feeds = {first: part, "gn_stats": stats, "gn_mix": gn_mix}
                if first == "hidden":  # older tiled graphs report plain per-tile means
                    feeds["gn_weight"] = weight
                image, local = self._run("vae_decoder", shared, None, feeds)
                return image, local  # (1, 3, th*s, tw*s), (L, 2, G)

            stats_shape = tuple(tiled.inputs[1].shape)
            trained = [d // self.manifest.vae_scale_factor for d in self.manifest.default_size]
            # larger than the model was trained at: GroupNorm statistics fixed one layer per pass (L + 1 passes)
            layerwise = first == "hidden" and (latents.shape[2] > trained[0] or latents.shape[3] > trained[1])
            image = decode_tiled_shared(run_shared, z, tile, overlap, scale, stats_shape, layerwise=layerwise)[0]
            return _to_pil(image)
        session = self._open("vae_decoder")[0]

        def run(part: np.ndarray) -> np.ndarray:
            return self._run("vae_decoder", session, None, {"latent_sample": part})[0]  # (1, 3, H, W)

        if tile is None:
            image = run(z)[0]  # (3, H, W) in ~[-1, 1]
        else:  # an older bundle: each tile normalises with its own statistics
            image = decode_tiled(run, z, tile, self.plan.vae_overlap, scale)[0]
        return _to_pil(image)

    # ----------------------------------------------------------------------- loading and freeing

    def _run(self, name: str, session: ort.InferenceSession, outputs, feeds: dict) -> list[np.ndarray]:
        if self.timed_calls is None:
            return session.run(outputs, feeds)
        start = time.time()  # wall clock, to line calls up with other timelines
        try:
            return session.run(outputs, feeds)
        finally:
            self.timed_calls.append((name, start, time.time()))

    def _open(self, name: str, count: int | None = None) -> list[ort.InferenceSession]:
        """The component's first `count` (default: all) sessions, loading those not resident."""
        component = self.manifest.components[name]
        count = len(component.graphs) if count is None else count
        loaded = self.sessions.setdefault(name, [])
        if len(loaded) < count:
            t = time.perf_counter()
            loaded += [self._load_graph(component, k) for k in range(len(loaded), count)]
            self.load_seconds[name] = time.perf_counter() - t
        return loaded

    def _load_graph(self, component: Component, k: int) -> ort.InferenceSession:
        if self._verify and component.name not in self._verified:
            verify_files(self.bundle, component)
            self._verified.add(component.name)
        options = self._options[component.precision.startswith("int8")]  # int8 graphs: exact kernels (edge.cpu)
        return ort.InferenceSession(str(self.bundle / component.graphs[k]), options,
                                    providers=self.providers)

    def _done_with(self, name: str) -> None:
        """Free a component after its stage unless the plan keeps everything resident."""
        if self.plan is not None and not self.plan.resident:
            for loaded in [n for n in self.sessions if n == name or n.startswith(name + "_")]:
                del self.sessions[loaded]
            release_memory()

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        dh, dw = self.manifest.default_size
        height, width = (dh if height is None else height), (dw if width is None else width)
        m = self.manifest.size_multiple
        halvings = (m // self.manifest.vae_scale_factor).bit_length() - 1
        for what, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0 or v % m:
                hint = f"; nearest: {max(m, round(v / m) * m)}" if isinstance(v, (int, np.integer)) else ""
                raise ValueError(
                    f"{what} {v!r} must be a positive multiple of {m} for this bundle (the VAE works in "
                    f"{self.manifest.vae_scale_factor}-pixel steps and the UNet halves the latent {halvings} "
                    f"time(s)){hint}"
                )
        return int(height), int(width)

    def _initial_latents(self, latents: np.ndarray | None, n: int, height: int, width: int,
                         rng: np.random.Generator) -> np.ndarray:
        f, c = self.manifest.vae_scale_factor, self.manifest.latent_channels
        if latents is None:
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"num_images must be a whole number >= 1, got {n!r}")
            return rng.standard_normal((n, c, height // f, width // f), dtype=np.float32)
        latents = np.asarray(latents, dtype=np.float32)
        expected = (c, height // f, width // f)
        if latents.ndim != 4 or latents.shape[1:] != expected:
            raise ValueError(f"latents must have shape (N, {c}, {height // f}, {width // f}) for a "
                             f"{height}x{width} image, got {latents.shape}")
        return latents
