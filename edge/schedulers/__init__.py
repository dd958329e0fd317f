"""Numpy schedulers, one algorithm per file, each checked step by step against the diffusers scheduler it names.

Usage (the caller owns the loop and the noise). Text-to-image:

    scheduler = make_scheduler("dpmpp_2m_karras", config)
    scheduler.set_timesteps(20)
    x = noise * scheduler.init_noise_sigma                       # (B, 4, H/8, W/8) unit Gaussian
    for i in range(scheduler.start, len(scheduler.timesteps)):   # start is 0 here
        out = unet(scheduler.scale_model_input(x, i), scheduler.timesteps[i])
        x = scheduler.step(out, i, x, noise=fresh_noise() if scheduler.needs_noise else None)

Image-to-image: set_timesteps(steps, strength) keeps the whole schedule and sets `start`, the first step index,
so that the last int(steps * strength) steps run (diffusers' StableDiffusionImg2ImgPipeline.get_timesteps). The
loop starts from the image's latents x0 noised to that step, and is otherwise the same; init_noise_sigma is NOT
applied (add_noise already gives the right scale, as in diffusers):

    scheduler.set_timesteps(20, strength=0.6)                    # start = 8: steps 8..19 run
    x = scheduler.add_noise(x0, noise, scheduler.start)          # x0: (B, 4, H/8, W/8) VAE latents * scaling
    for i in range(scheduler.start, len(scheduler.timesteps)): ... as above

Inpainting with a 4-channel UNet adds, after each step, diffusers' latent blending: the kept region is x0 noised
to the *next* step's level; add_noise(x0, noise, len(timesteps)) is x0 itself, so the last step needs no branch:

        x = scheduler.step(out, i, x, noise=...)
        x = mask * x + (1 - mask) * scheduler.add_noise(x0, noise, i + 1)   # mask (B, 1, H/8, W/8), 1 = repaint

with the same `noise` that started the loop. At strength 1 diffusers' inpaint pipeline starts from
noise * init_noise_sigma, as text-to-image does, and its img2img pipeline from add_noise(x0, noise, 0).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .config import SchedulerConfig, first_step, scheduler_config_from_dict, with_defaults
from .ddim import DDIMScheduler
from .dpmpp_2m import DPMPP2MKarrasScheduler, DPMPP2MScheduler
from .euler import EulerScheduler
from .euler_a import EulerAncestralScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler


class Scheduler(Protocol):
    """What every scheduler offers. step() reads only arrays set_timesteps precomputed, the index i and its
    arguments (multistep methods also read the outputs of earlier steps, which they keep in a documented list)."""

    needs_noise: bool  # True: step() wants a fresh unit-Gaussian `noise` shaped like the sample
    timesteps: np.ndarray  # after set_timesteps: the timestep passed to the UNet at each call, (calls,)
    init_noise_sigma: float  # after set_timesteps: multiply the initial unit-Gaussian latents by this
    start: int  # after set_timesteps: the first step index to run; > 0 when strength < 1 (img2img)

    def set_timesteps(self, steps: int, strength: float = 1.0) -> None: ...

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray: ...

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray: ...

    def denoised(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray: ...

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray: ...


SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerScheduler,
    "euler_a": EulerAncestralScheduler,
    "dpmpp_2m": DPMPP2MScheduler,
    "dpmpp_2m_karras": DPMPP2MKarrasScheduler,
    "lcm": LCMScheduler,
}


# Each scheduler here is checked against this diffusers scheduler (class name, config overrides); plain
# strings, so the runtime stays torch-free. converters/bench_peer.py keeps a copy: it runs where edge isn't.
DIFFUSERS_EQUIVALENT: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}


def make_scheduler(name: str, config: SchedulerConfig) -> Scheduler:
    """The scheduler registered under `name`, for a model trained with `config`; what `config` leaves open
    (None) takes the default of the diffusers class `name` matches, as that class's from_config would."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](with_defaults(config, name))


__all__ = ["DIFFUSERS_EQUIVALENT", "SCHEDULERS", "Scheduler", "SchedulerConfig", "first_step", "make_scheduler",
           "scheduler_config_from_dict", "with_defaults"]
