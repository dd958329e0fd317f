"""Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency Models: Synthesizing
High-Resolution Images with Few-Step Inference", Algorithm 3): denoise to x0 in one jump, re-noise to the next t."""

from __future__ import annotations

import numpy as np

from .config import SchedulerConfig, alphas_cumprod, check_index, check_steps, clipped_x0, first_step, noised

_SIGMA_DATA = 0.5  # the consistency-model boundary scalings' data std (Song et al. 2023)


class LCMScheduler:
    """Matches diffusers' LCMScheduler: the steps are an evenly strided subset of the distillation schedule
    t = k-1, 2k-1, ..., T-1 (k = T // original_inference_steps), so timestep_spacing and steps_offset do not apply.

    step(i) needs a unit-Gaussian `noise` shaped like the sample on every step but the last, where it returns
    the denoised x0; diffusers draws one `randn(sample.shape)` on those same steps.

    img2img (`strength`) slices this schedule as StableDiffusionImg2ImgPipeline does; diffusers' own
    LatentConsistencyModelImg2ImgPipeline instead passes strength to LCMScheduler.set_timesteps, which draws the
    steps from a shortened distillation schedule (other timesteps).
    """

    needs_noise = True

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)  # (T,)
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.init_noise_sigma = 1.0
        self.start = 0  # after set_timesteps: the first step index of the run (> 0 for img2img)
        self.noise_alpha = np.zeros(0)

    def set_timesteps(self, steps: int, strength: float = 1.0) -> None:
        cfg = self.config
        check_steps(steps, cfg)
        self.start = first_step(steps, strength)
        if not 1 <= cfg.original_inference_steps <= cfg.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps must be between 1 and {cfg.num_train_timesteps}; "
                f"got {cfg.original_inference_steps}"
            )
        if steps > cfg.original_inference_steps:
            raise ValueError(
                f"lcm steps must be at most original_inference_steps={cfg.original_inference_steps}; got {steps}"
            )
        k = cfg.num_train_timesteps // cfg.original_inference_steps
        origin = np.arange(cfg.original_inference_steps, 0, -1, dtype=np.int64) * k - 1  # (orig,) descending
        picks = np.floor(np.linspace(0, len(origin), steps, endpoint=False)).astype(np.int64)  # (steps,)
        self.timesteps = origin[picks]  # (steps,)
        self.alpha = self.alphas_cumprod[self.timesteps]  # (steps,)
        self.alpha_prev = np.append(self.alpha[1:], np.nan)  # (steps,) the last step does not re-noise
        self.noise_alpha = np.append(self.alpha, 1.0)  # (steps + 1,) add_noise's level; the last is "clean"
        scaled_t = self.timesteps * cfg.timestep_scaling  # (steps,)
        self.c_skip = _SIGMA_DATA**2 / (scaled_t**2 + _SIGMA_DATA**2)  # (steps,)
        self.c_out = scaled_t / (scaled_t**2 + _SIGMA_DATA**2) ** 0.5  # (steps,)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """x0 noised to timesteps[i] (diffusers' add_noise); i = len(timesteps) gives x0, the level after the end."""
        check_index(i, len(self.noise_alpha))
        return noised(x0, noise, self.noise_alpha[i])  # (B, C, H, W)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        check_index(i, len(self.timesteps), self.start)
        return sample

    def denoised(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """The consistency function f(x, t) = c_skip x + c_out x0 (float64): the clean latents, at every step."""
        check_index(i, len(self.timesteps), self.start)
        x0 = clipped_x0(model_output, sample, self.alpha[i], self.config)  # (B, C, H, W)
        return self.c_out[i] * x0 + self.c_skip[i] * sample.astype(np.float64)  # (B, C, H, W)

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """The consistency function f(x, t) = c_skip x + c_out x0, then x_prev = sqrt(a_prev) f + sqrt(1 - a_prev) z."""
        denoised = self.denoised(model_output, i, sample)  # (B, C, H, W)
        if i == len(self.timesteps) - 1:
            return denoised.astype(np.float32)
        if noise is None:
            raise ValueError(f"lcm step {i} of {len(self.timesteps)} needs `noise` shaped {sample.shape}")
        a_prev = self.alpha_prev[i]
        return (a_prev**0.5 * denoised + (1.0 - a_prev) ** 0.5 * noise.astype(np.float64)).astype(np.float32)
