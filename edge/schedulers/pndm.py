"""PLMS: the linear multistep half of PNDM, as Stable Diffusion runs it (Liu et al. 2022, "Pseudo Numerical
Methods for Diffusion Models on Manifolds", eqs. 9 and 12), i.e. diffusers' PNDMScheduler(skip_prk_steps=True)."""

from __future__ import annotations

import numpy as np

from .config import SchedulerConfig, alphas_cumprod, check_index, check_steps, predict_x0_eps, spaced_timesteps

# Adams-Bashforth weights, newest model output first, by how many outputs are available.
_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PNDMScheduler:
    """Makes steps + 1 model calls (1 when steps == 1): the second timestep is visited twice.

    Call 0 takes an Euler-like step from the first timestep; call 1 redoes that step from the first sample with
    the mean of the two outputs (a Heun-like correction); from call 2 on, Adams-Bashforth of order up to 4 over the
    outputs of calls 0, 2, 3, ... (call 1's output is not kept, as in diffusers).

    State: `model_outputs[i]` holds call i's raw UNet output and `first_sample` the sample given to call 0;
    step(i) writes them and reads only earlier slots, and set_timesteps clears them.
    """

    needs_noise = False

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)  # (T,)
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.init_noise_sigma = 1.0
        self.model_outputs: list[np.ndarray | None] = []
        self.first_sample: np.ndarray | None = None

    def set_timesteps(self, steps: int) -> None:
        check_steps(steps, self.config)
        cfg = self.config
        ts = np.round(spaced_timesteps(cfg, steps, "leading")).astype(np.int64)  # (steps,) descending
        self.timesteps = np.concatenate([ts[:1], ts[1:2], ts[1:]])  # (steps + 1,), or (1,) when steps == 1
        ratio = cfg.num_train_timesteps // steps  # diffusers' step size, whatever the spacing
        t_from, t_to = self.timesteps.copy(), self.timesteps - ratio
        if len(ts) > 1:  # call 1 re-steps from the first sample: from t + ratio down to t
            t_from[1], t_to[1] = self.timesteps[1] + ratio, self.timesteps[1]
        final = 1.0 if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.alpha = self.alphas_cumprod[t_from]  # (calls,)
        self.alpha_prev = np.where(t_to >= 0, self.alphas_cumprod[np.maximum(t_to, 0)], final)  # (calls,)
        self.model_outputs = [None] * len(self.timesteps)
        self.first_sample = None

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        check_index(i, len(self.timesteps))
        return sample

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        check_index(i, len(self.timesteps))
        self.model_outputs[i] = model_output.astype(np.float64)  # (B, C, H, W)
        x = sample.astype(np.float64)  # (B, C, H, W)
        if i == 0:
            self.first_sample = x
            out = self.model_outputs[0]
        elif i == 1:
            out = (self.model_outputs[1] + self._earlier(0)) / 2
            if self.first_sample is None:
                raise ValueError("PLMS step 1 needs the sample given to step 0; run the steps in order from 0")
            x = self.first_sample
        else:
            idx = [j for j in range(i, max(i - 4, 0) - 1, -1) if j != 1][:4]  # newest first, call 1 skipped
            out = sum(w * self._earlier(j) for w, j in zip(_AB[len(idx)], idx))
        if i >= 4:
            self.model_outputs[i - 4] = None  # no longer needed
        a, a_prev = self.alpha[i], self.alpha_prev[i]
        _, eps = predict_x0_eps(out, x, a, self.config.prediction_type)
        # Eq. 9: the transfer from x_t to x_{t-delta} along eps.
        denom = a * (1.0 - a_prev) ** 0.5 + (a * (1.0 - a) * a_prev) ** 0.5
        return ((a_prev / a) ** 0.5 * x - (a_prev - a) * eps / denom).astype(np.float32)  # (B, C, H, W)

    def _earlier(self, j: int) -> np.ndarray:
        out = self.model_outputs[j]
        if out is None:
            raise ValueError(f"PLMS step needs the model output of step {j}; run the steps in order from 0")
        return out
