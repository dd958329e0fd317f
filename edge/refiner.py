"""SDXL base + refiner, as people use them: the base denoises the first part of the schedule, down to the noise level
`high_noise_frac` of the way through (diffusers' `denoising_end`), and hands its latents over; the refiner (an
SDXL refiner bundle: its second text encoder only, aesthetic-score conditioning) runs the rest of the same schedule
(`denoising_start`) and decodes.

Both run the same steps of the same sampler: the base the timesteps at or above the cut-off
t = round(T - high_noise_frac x T), the refiner those below it, as diffusers splits them. Under a memory budget each
bundle is planned on its own and the base's graphs are all freed before the refiner's load: they are never resident
together. Without one, each keeps what it loaded (the next generation starts warm).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from edge.adapters import describe, lora_files
from edge.inputs import output_size
from edge.pipeline import Callback, Pipeline, Result
from edge.schedulers import make_scheduler, scheduler_config_from_dict
from edge.stages.start import noise_latents
from edge.validate import check_generate, whole_number

REFINER_FAMILY = "sdxl-refiner"


def check_pair(base: Pipeline, refiner: Pipeline) -> None:
    """A refiner bundle whose latents are the base's: same channels, VAE scale and scaling factor."""
    b, r = base.manifest, refiner.manifest
    if r.family != REFINER_FAMILY:
        raise ValueError(f"--refiner {refiner.bundle}: a {r.family} bundle; expected an SDXL refiner bundle "
                         "(converted from e.g. stabilityai/stable-diffusion-xl-refiner-1.0)")
    if b.family == REFINER_FAMILY:
        raise ValueError(f"{base.bundle} is itself an SDXL refiner: give the base model's bundle first")
    mine, theirs = (b.latent_channels, b.vae_scale_factor, b.vae_scaling_factor), \
        (r.latent_channels, r.vae_scale_factor, r.vae_scaling_factor)
    if mine != theirs:
        raise ValueError(f"--refiner {refiner.bundle}: its latents (channels, VAE scale, scaling factor) {theirs} are "
                         f"not the base's {mine}; it was made for another model")


def handoff_step(timesteps: np.ndarray, high_noise_frac: float, train_steps: int) -> int:
    """How many of `timesteps` the base runs: those at or above round(T - frac x T) (diffusers' denoising_end)."""
    if isinstance(high_noise_frac, bool) or not isinstance(high_noise_frac, (int, float)) or \
            not math.isfinite(high_noise_frac) or not 0 < high_noise_frac < 1:
        raise ValueError(f"high_noise_frac {high_noise_frac!r}: expected a number between 0 and 1 (e.g. 0.8: the "
                         "base denoises the first 80% of the noise, the refiner the rest)")
    cutoff = int(round(train_steps - high_noise_frac * train_steps))
    k = int(np.sum(np.asarray(timesteps) >= cutoff))
    if not 0 < k < len(timesteps):
        who = "the refiner" if k == len(timesteps) else "the base"
        raise ValueError(f"high_noise_frac {high_noise_frac:g} with {len(timesteps)} steps leaves {who} no step "
                         f"(timesteps {int(timesteps[0])}..{int(timesteps[-1])}, cut-off {cutoff}); give more "
                         "steps or a fraction further from 0 and 1")
    return k


def generate_refined(base: Pipeline, refiner: Pipeline, prompt: str, negative_prompt: str = "", *,
                     high_noise_frac: float = 0.8, steps: int | None = None, guidance: float | None = None,
                     scheduler: str | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
                     latents: np.ndarray | None = None, num_images: int = 1, prompt_syntax: str = "auto",
                     loras=(), lora_dir: Path | str | None = None, callback: Callback | None = None) -> Result:
    """Text to image with the base, finished by the refiner (`steps` etc. left None: the base's recommendation).
    `loras` (and `<lora:NAME:SCALE>` in the prompts, from `lora_dir`) apply to the base, as a LoRA made for the base
    model is used: the refiner finishes the picture the LoRA made (Pipeline.generate's `loras`)."""
    check_pair(base, refiner)
    text, negative_text, active = lora_files(base.adapters, loras, prompt, negative_prompt, lora_dir)
    base.use_loras(active)
    steps, guidance, scheduler = base.manifest.generation_defaults(
        steps=steps, guidance=guidance, scheduler=scheduler).values()
    guidance, seed = check_generate(guidance, seed)
    steps = whole_number("steps", steps)
    height, width = output_size(base.manifest, height, width)
    scheds = [make_scheduler(scheduler, scheduler_config_from_dict(p.manifest.scheduler)) for p in (base, refiner)]
    scheds[0].set_timesteps(steps)
    k = handoff_step(scheds[0].timesteps, high_noise_frac, int(base.manifest.scheduler.get("num_train_timesteps",
                                                                                            1000)))
    # the refiner's run starts at step k, as img2img's does (a multistep sampler's first step there is first order,
    # as diffusers' set_begin_index makes it): int(steps x strength) = steps - k exactly
    scheds[1].set_timesteps(steps, (steps - k + 0.5) / steps)
    rng = np.random.default_rng(seed)
    guided = guidance > 1
    timings: dict[str, float] = {"text_encoder": 0.0, "unet": 0.0}
    t_start = time.perf_counter()
    x = noise_latents(base.manifest, latents, num_images, height, width, rng) * np.float32(scheds[0].init_noise_sigma)

    # the base runs steps [0, k), the refiner [k, steps): each plans, encodes the prompts its own way, denoises
    for pipe, sched, first, last in ((base, scheds[0], 0, k), (refiner, scheds[1], k, steps)):
        pipe.plan = pipe.plan_for(height, width, len(x), guided=guided)
        t = time.perf_counter()
        context = pipe.encode_text(text, negative_text, guided=guided, copies=len(x), syntax=prompt_syntax,
                                   size=(height, width))
        pipe._done_with("text_encoder")
        timings["text_encoder"] += time.perf_counter() - t
        t = time.perf_counter()
        for i, x in zip(range(first, last), pipe.denoise(x, context, sched, guidance, rng, start=first)):
            if callback is not None:
                callback(i, steps, x)
        pipe._done_with("unet")  # as the plan says (the decoder's stage does not hold the UNet)
        timings["refiner_unet" if pipe is refiner else "base_unet"] = time.perf_counter() - t
        timings["unet"] += time.perf_counter() - t
        if pipe is base:
            _free_under_budget(base)  # never resident together under a budget
    timings["unet_per_step"] = timings["unet"] / steps

    t = time.perf_counter()
    images = [refiner.decode(x[i : i + 1]) for i in range(len(x))]
    _free_under_budget(refiner)  # the next generation's base plans without it
    timings["vae_decoder"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    params = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
              "scheduler": scheduler, "guidance": guidance, "height": height, "width": width,
              "bundle_id": base.manifest.bundle_id, "refiner": refiner.manifest.bundle_id,
              "high_noise_frac": high_noise_frac, **({"prompt_syntax": prompt_syntax} if prompt_syntax != "auto" else {}),
              **({"loras": describe(active)} if active else {})}
    return Result(images=images, timings=timings, params=params, latents=x)


def _free_under_budget(pipe: Pipeline) -> None:
    for name in list(pipe.graphs.sessions) if pipe.memory_budget is not None else ():
        pipe.graphs.free(name)
