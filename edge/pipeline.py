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

from edge.bundle import Manifest, read_manifest, verify_files
from edge.schedulers import make_scheduler, scheduler_config_from_dict
from edge.tokenizer import ClipTokenizer

Callback = Callable[[int, int, np.ndarray], None]  # (step index, total steps, latents)


@dataclass
class Result:
    images: list[Image.Image]
    timings: dict[str, float]  # seconds: text_encoder, unet (all steps), unet_per_step, vae_decoder, total
    params: dict[str, Any]  # what produced the images, as written into the PNGs
    latents: np.ndarray = field(repr=False)  # (N, C, h, w) final latents, before decoding


class Pipeline:
    def __init__(self, bundle: Path, manifest: Manifest, sessions: dict[str, ort.InferenceSession],
                 tokenizer: ClipTokenizer, load_seconds: dict[str, float]):
        self.bundle = bundle
        self.manifest = manifest
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.load_seconds = load_seconds  # session creation per component

    @classmethod
    def load(cls, bundle: Path | str, *, threads: int | None = None, verify: bool = True,
             providers: list[str] | None = None, memory_arena: bool = False) -> "Pipeline":
        """Open a bundle; `verify` checks every graph's sha256 against the manifest first.

        `memory_arena` keeps onnxruntime's CPU arena, which holds on to its largest activations between
        calls (faster allocation, GBs more resident for a full-size UNet); off by default, as on a device.
        """
        bundle = Path(bundle)
        manifest = read_manifest(bundle)
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = memory_arena
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"] if providers is None else providers
        sessions, seconds = {}, {}
        for name in ("text_encoder", "unet", "vae_decoder"):
            component = manifest.components[name]
            if verify:
                verify_files(bundle, component)
            t = time.perf_counter()
            sessions[name] = ort.InferenceSession(str(bundle / component.file), options, providers=providers)
            seconds[name] = time.perf_counter() - t
        tok = ClipTokenizer(bundle / manifest.tokenizer["vocab"], bundle / manifest.tokenizer["merges"],
                            max_length=manifest.text_max_length, pad_token=manifest.pad_token)
        return cls(bundle, manifest, sessions, tok, seconds)

    def generate(self, prompt: str, negative_prompt: str = "", steps: int = 20, guidance: float = 7.5,
                 scheduler: str = "euler", seed: int = 0, height: int | None = None, width: int | None = None,
                 latents: np.ndarray | None = None, callback: Callback | None = None,
                 num_images: int = 1) -> Result:
        height, width = self._check_size(height, width)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        sched = make_scheduler(scheduler, scheduler_config_from_dict(self.manifest.scheduler))
        sched.set_timesteps(steps)
        rng = np.random.default_rng(seed)
        latents = self._initial_latents(latents, num_images, height, width, rng)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        t = time.perf_counter()
        context = self.encode_text(prompt, negative_prompt, guided=guidance > 1, copies=latents.shape[0])
        timings["text_encoder"] = time.perf_counter() - t

        t = time.perf_counter()
        x = latents * np.float32(sched.init_noise_sigma)
        for i, x in enumerate(self.denoise(x, context, sched, guidance, rng)):
            if callback is not None:
                callback(i, steps, x)
        timings["unet"] = time.perf_counter() - t
        timings["unet_per_step"] = timings["unet"] / len(sched.timesteps)

        t = time.perf_counter()
        images = [self.decode(x[k : k + 1]) for k in range(x.shape[0])]
        timings["vae_decoder"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start

        params = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
                  "scheduler": scheduler, "guidance": guidance, "height": height, "width": width,
                  "bundle_id": self.manifest.bundle_id}
        return Result(images=images, timings=timings, params=params, latents=x)

    def encode_text(self, prompt: str, negative_prompt: str, guided: bool, copies: int) -> np.ndarray:
        """(2N, 77, D) as [unconditional x N, conditional x N] when guided, else (N, 77, D)."""
        texts = [(negative_prompt, "negative prompt"), (prompt, "prompt")] if guided else [(prompt, "prompt")]
        run = self.sessions["text_encoder"].run
        states = [run(None, {"input_ids": self.tokenizer.encode_prompt(s, what)})[0] for s, what in texts]
        return np.concatenate([np.repeat(h, copies, axis=0) for h in states])  # (B, 77, D)

    def denoise(self, x: np.ndarray, context: np.ndarray, sched, guidance: float,
                rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Yield the latents after each scheduler step; the caller decides what to do with them."""
        unet = self.sessions["unet"]
        guided = context.shape[0] == 2 * x.shape[0]
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, i)  # (N, C, h, w)
            x_in = np.concatenate([x_in, x_in]) if guided else x_in
            timestep = np.full((x_in.shape[0],), t, dtype=np.float32)
            feeds = {"sample": x_in.astype(np.float32), "timestep": timestep, "encoder_hidden_states": context}
            out = unet.run(None, feeds)[0]  # (B, C, h, w)
            if guided:
                uncond, cond = np.split(out, 2)
                out = uncond + np.float32(guidance) * (cond - uncond)
            noise = rng.standard_normal(x.shape, dtype=np.float32) if sched.needs_noise else None
            x = sched.step(out, i, x, noise=noise)
            yield x

    def decode(self, latents: np.ndarray) -> Image.Image:
        z = (latents / np.float32(self.manifest.vae_scaling_factor)).astype(np.float32)  # (1, C, h, w)
        image = self.sessions["vae_decoder"].run(None, {"latent_sample": z})[0][0]  # (3, H, W) in ~[-1, 1]
        image = np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)  # (H, W, 3)
        return Image.fromarray((image * 255).round().astype(np.uint8))

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
