"""PLMS: the linear multistep half of PNDM, as Stable Diffusion runs it (Liu et al. 2022, "Pseudo Numerical
Methods for Diffusion Models on Manifolds", eqs. 9 and 12), i.e. diffusers' PNDMScheduler(skip_prk_steps=True)."""

from __future__ import annotations

import numpy as np

from .config import (
    SchedulerConfig, alphas_cumprod, check_index, check_steps, first_step, noised, predict_x0_eps, spaced_timesteps,
)

# Adams-Bashforth weights, newest model output first, by how many outputs are available.
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PNDMScheduler:
    """Makes steps + 1 model calls (1 when steps == 1): the second timestep is visited twice.

    The run's first call (index `start`) takes an Euler-like step; its second redoes that step from the first
    sample with the mean of the two outputs (a Heun-like correction); from the third on, Adams-Bashforth of order
    up to 4 over the outputs of the first, third, fourth, ... calls (the second's output is not kept, as in
    diffusers).

    img2img slices the steps + 1 calls at `start`, as diffusers does, and diffusers' call counter then makes call
    start + 1 the correction, from timesteps[start + 1] + T // steps down to timesteps[start + 1], wherever the
    duplicate is. For start >= 2 the duplicate is gone, so the next call steps from timesteps[start + 2] and one
    step of the schedule is skipped; for start = 1 the correction begins a step above the sample's level.
    Reproduced here, to run as diffusers runs.

    State: `model_outputs[i]` holds call i's raw UNet output and `first_sample` the sample given to the first
    call; step(i) writes them and reads only earlier slots, and set_timesteps clears them.
    """

    needs_noise = False

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)  # (T,)
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.init_noise_sigma = 1.0
        self.start = 0  # after set_timesteps: the first call index of the run (> 0 for img2img)
        self.noise_alpha = np.zeros(0)
        self.model_outputs: list[np.ndarray | None] = []
        self.first_sample: np.ndarray | None = None

    def set_timesteps(self, steps: int, strength: float = 1.0) -> None:
        check_steps(steps, self.config)
        self.start = first_step(steps, strength)
        cfg = self.config
        ts = np.round(spaced_timesteps(cfg, steps, "leading")).astype(np.int64)  # (steps,) descending
        self.timesteps = np.concatenate([ts[:1], ts[1:2], ts[1:]])  # (steps + 1,), or (1,) when steps == 1
        ratio = cfg.num_train_timesteps // steps  # diffusers' step size, whatever the spacing
        t_from, t_to = self.timesteps.copy(), self.timesteps - ratio
        second = self.start + 1  # the run's second call re-steps from its first sample: t + ratio down to t
        if second < len(self.timesteps):
            t_from[second], t_to[second] = self.timesteps[second] + ratio, self.timesteps[second]
        final = 1.0 if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.alpha = self.alphas_cumprod[t_from]  # (calls,)
        self.alpha_prev = np.where(t_to >= 0, self.alphas_cumprod[np.maximum(t_to, 0)], final)  # (calls,)
        self.noise_alpha = np.append(self.alphas_cumprod[self.timesteps], 1.0)  # (calls + 1,) the last: clean
        self.model_outputs = [None] * len(self.timesteps)
        self.first_sample = None

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """x0 noised to timesteps[i] (diffusers' add_noise); i = len(timesteps) gives x0, the level after the end."""
        check_index(i, len(self.noise_alpha))
        return noised(x0, noise, self.noise_alpha[i])  # (B, C, H, W)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        check_index(i, len(self.timesteps), self.start)
        return sample

    def denoised(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """The model's estimate of the clean latents from this call's output alone (float64), for previews:
        step() itself moves along a combination of several calls' outputs and never forms it."""
        check_index(i, len(self.timesteps), self.start)
        x = sample.astype(np.float64)  # (B, C, H, W) at timesteps[i]'s level (the second call's too)
        return predict_x0_eps(model_output.astype(np.float64), x, self.noise_alpha[i], self.config.prediction_type)[0]

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        check_index(i, len(self.timesteps), self.start)
        s = self.start
        self.model_outputs[i] = model_output.astype(np.float64)  # (B, C, H, W)
        x = sample.astype(np.float64)  # (B, C, H, W)
        if i == s:
            self.first_sample = x
            out = self.model_outputs[s]
        elif i == s + 1:
            out = (self.model_outputs[i] + self._earlier(s)) / 2
            if self.first_sample is None:
                raise ValueError(f"PLMS step {i} needs the sample given to step {s}; run the steps in order from {s}")
            x = self.first_sample
        else:
            idx = [j for j in range(i, max(i - 4, s) - 1, -1) if j != s + 1][:4]  # newest first, 2nd call skipped
            out = sum(w * self._earlier(j) for w, j in zip(_AB[len(idx)], idx))
        if i - 4 >= s:
            self.model_outputs[i - 4] = None  # no longer needed
        a, a_prev = self.alpha[i], self.alpha_prev[i]
        _, eps = predict_x0_eps(out, x, a, self.config.prediction_type)
        # Eq. 9: the transfer from x_t to x_{t-delta} along eps.
        denom = a * (1.0 - a_prev) ** 0.5 + (a * (1.0 - a) * a_prev) ** 0.5
        return ((a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom).astype(np.float32)  # (B, C, H, W)

    def _earlier(self, j: int) -> np.ndarray:
        out = self.model_outputs[j]
        if out is None:
            raise ValueError(f"PLMS step needs the model output of step {j}; run the steps in order from {self.start}")
        return out
