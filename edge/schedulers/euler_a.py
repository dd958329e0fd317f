"""Euler ancestral sampler: an Euler step down to sigma_down, then fresh noise up to sigma_next
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"; k-diffusion's
sample_euler_ancestral with eta = 1)."""

from __future__ import annotations

import numpy as np

from .euler import EulerScheduler


class EulerAncestralScheduler(EulerScheduler):
    """Matches diffusers' EulerAncestralDiscreteScheduler; the schedule (sigmas, timesteps, input scaling,
    default spacing "linspace") is Euler's.

    step(i) needs a unit-Gaussian `noise` shaped like the sample on every step but the last, where
    sigma_next = 0; diffusers draws one `randn(sample.shape)` on every step, the last included.
    """

    needs_noise = True

    def set_timesteps(self, steps: int, strength: float = 1.0) -> None:
        super().set_timesteps(steps, strength)
        s, s_next = self.sigmas[:-1], self.sigmas[1:]
        self.sigma_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5  # (steps,) std of the fresh noise
        self.sigma_down = s_next**2 / s  # (steps,) = sqrt(s_next^2 - sigma_up^2), where the Euler step lands

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        sigma, sigma_up = self.sigmas[i], self.sigma_up[i]
        x0 = self.denoised(model_output, i, sample)  # (B, C, H, W)
        x = sample.astype(np.float64)  # (B, C, H, W)
        x = x + (x - x0) / sigma * (self.sigma_down[i] - sigma)  # (B, C, H, W)
        if sigma_up > 0:
            if noise is None:
                raise ValueError(f"euler_a step {i} of {len(self.timesteps)} needs `noise` shaped {sample.shape}")
            x = x + noise.astype(np.float64) * sigma_up
        return x.astype(np.float32)  # (B, C, H, W)
