"""Euler discrete sampler on the probability-flow ODE dx/dsigma = (x - x0) / sigma
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 1 without churn)."""

from __future__ import annotations

import numpy as np

from .config import (
    SchedulerConfig, alphas_cumprod, check_index, check_noise_shapes, check_steps, first_step, predict_x0_eps,
    resolved_spacing, spaced_timesteps,
)


class EulerScheduler:
    """Matches diffusers' EulerDiscreteScheduler (linear sigma interpolation, final sigma 0, default "linspace").

    Works in the variance-exploding frame x = x0 + sigma * eps: the UNet sees x / sqrt(sigma^2 + 1).
    """

    needs_noise = False

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)  # (T,)
        self.timesteps = np.zeros(0, dtype=np.float64)
        self.init_noise_sigma = 1.0
        self.start = 0  # after set_timesteps: the first step index of the run (> 0 for img2img)
        self.sigmas = np.zeros(0)

    def set_timesteps(self, steps: int, strength: float = 1.0) -> None:
        check_steps(steps, self.config)
        self.start = first_step(steps, strength)
        self.timesteps = spaced_timesteps(self.config, steps, "linspace")  # (steps,) float, maybe fractional
        train_sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # (T,)
        sigmas = np.interp(self.timesteps, np.arange(len(train_sigmas)), train_sigmas)  # (steps,)
        self.sigmas = np.concatenate([sigmas, [0.0]])  # (steps + 1,)
        sigma_max = float(sigmas.max())
        # diffusers' rule: "leading" starts from unit-variance-scaled noise, the others from sigma_max.
        leading = resolved_spacing(self.config, "linspace") == "leading"
        self.init_noise_sigma = (sigma_max**2 + 1.0) ** 0.5 if leading else sigma_max

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """x0 + sigma_i noise (diffusers' add_noise at step index i); i = len(timesteps) gives x0 (sigma 0)."""
        check_index(i, len(self.sigmas))
        check_noise_shapes(x0, noise)
        x = np.asarray(x0, np.float64) + self.sigmas[i] * np.asarray(noise, np.float64)  # (B, C, H, W)
        return x.astype(np.float32)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        check_index(i, len(self.timesteps), self.start)
        return (sample / (self.sigmas[i] ** 2 + 1.0) ** 0.5).astype(np.float32)  # (B, C, H, W)

    def denoised(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """The model's estimate of the clean latents at step i (float64): what previews show, what step() follows."""
        check_index(i, len(self.timesteps), self.start)
        scale = (self.sigmas[i] ** 2 + 1.0) ** -0.5  # the VP frame: x_t = scale * x, alpha_bar = scale^2
        x = sample.astype(np.float64) * scale  # (B, C, H, W)
        return predict_x0_eps(model_output.astype(np.float64), x, scale**2, self.config.prediction_type)[0]

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = self.denoised(model_output, i, sample)  # (B, C, H, W)
        x = sample.astype(np.float64)  # (B, C, H, W)
        derivative = (x - x0) / sigma  # (B, C, H, W)
        return (x + derivative * (sigma_next - sigma)).astype(np.float32)  # (B, C, H, W)
