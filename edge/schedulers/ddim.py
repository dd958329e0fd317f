"""DDIM with eta = 0: deterministic sampling (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12)."""

from __future__ import annotations

import numpy as np

from .config import (
    SchedulerConfig, alphas_cumprod, check_index, check_steps, clipped_x0, first_step, noised, predict_x0_eps,
    spaced_timesteps,
)


class DDIMScheduler:
    """Matches diffusers' DDIMScheduler(eta=0) step for step.

    Like diffusers, the step always goes to t - T // steps, even where the timestep spacing ("linspace",
    "trailing") puts the next timestep elsewhere.
    """

    needs_noise = False

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)  # (T,)
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.init_noise_sigma = 1.0
        self.start = 0  # after set_timesteps: the first step index of the run (> 0 for img2img)
        self.noise_alpha = np.zeros(0)

    def set_timesteps(self, steps: int, strength: float = 1.0) -> None:
        check_steps(steps, self.config)
        self.start = first_step(steps, strength)
        cfg = self.config
        self.timesteps = np.round(spaced_timesteps(cfg, steps, "leading")).astype(np.int64)  # (steps,)
        prev = self.timesteps - cfg.num_train_timesteps // steps  # (steps,)
        final = 1.0 if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.alpha = self.alphas_cumprod[self.timesteps]  # (steps,)
        self.alpha_prev = np.where(prev >= 0, self.alphas_cumprod[np.maximum(prev, 0)], final)  # (steps,)
        self.noise_alpha = np.append(self.alpha, 1.0)  # (steps + 1,) add_noise's level; the last is "clean"

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """x0 noised to timesteps[i] (diffusers' add_noise); i = len(timesteps) gives x0, the level after the end."""
        check_index(i, len(self.noise_alpha))
        return noised(x0, noise, self.noise_alpha[i])  # (B, C, H, W)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        check_index(i, len(self.timesteps), self.start)
        return sample

    def denoised(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """The model's estimate of the clean latents at step i (float64): what previews show, what step() follows."""
        check_index(i, len(self.timesteps), self.start)
        return clipped_x0(model_output, sample, self.alpha[i], self.config)  # (B, C, H, W)

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
        x = sample.astype(np.float64)  # (B, C, H, W)
        x0 = self.denoised(model_output, i, sample)  # (B, C, H, W)
        _, eps = predict_x0_eps(model_output.astype(np.float64), x, self.alpha[i], self.config.prediction_type)
        a_prev = self.alpha_prev[i]
        return (a_prev**0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps).astype(np.float32)  # (B, C, H, W)
