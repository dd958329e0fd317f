"""DPM-Solver++(2M): second-order multistep solver of the diffusion ODE in data-prediction form
(Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2),
optionally on the Karras et al. 2022 sigma schedule (rho = 7)."""

from __future__ import annotations

import numpy as np

from .config import (
    SchedulerConfig, alphas_cumprod, check_index, check_steps, first_step, noised, predict_x0_eps, spaced_timesteps,
)


class DPMPP2MScheduler:
    """Matches diffusers' DPMSolverMultistepScheduler defaults: algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", default spacing "linspace".

    The run's first step (index `start`: 0, or later for img2img) and the last step (down to sigma = 0) are first
    order; the rest are second order and reuse the previous step's x0. State: `x0_history[i]` holds step i's
    predicted x0; step(i) writes it and reads only slot i - 1, and set_timesteps clears it.
    """

    needs_noise = False

    def __init__(self, config: SchedulerConfig, karras: bool = False) -> None:
        self.config = config
        self.karras = karras  # Karras et al. 2022 sigmas (rho = 7) instead of the spaced training timesteps
        self.alphas_cumprod = alphas_cumprod(config)  # (T,)
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.init_noise_sigma = 1.0
        self.start = 0  # after set_timesteps: the first step index of the run (> 0 for img2img)
        self.sigmas = np.zeros(0)
        self.x0_history: list[np.ndarray | None] = []

    def set_timesteps(self, steps: int, strength: float = 1.0) -> None:
        check_steps(steps, self.config)
        self.start = first_step(steps, strength)
        train_sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # (T,) ascending in t
        if self.karras:
            inv_rho_max, inv_rho_min = train_sigmas[-1] ** (1 / 7), train_sigmas[0] ** (1 / 7)
            sigmas = (inv_rho_max + np.linspace(0, 1, steps) * (inv_rho_min - inv_rho_max)) ** 7  # (steps,)
            # The UNet gets the training t of each sigma, interpolated in log sigma and rounded (as diffusers).
            t = np.interp(np.log(sigmas), np.log(train_sigmas), np.arange(len(train_sigmas)))
            self.timesteps = np.round(t).astype(np.int64)  # (steps,)
        else:
            self.timesteps = self._spaced(steps)  # (steps,)
            sigmas = train_sigmas[self.timesteps]  # (steps,)
        self.sigmas = np.concatenate([sigmas, [0.0]])  # (steps + 1,)
        alpha = (self.sigmas**2 + 1.0) ** -0.5  # (steps + 1,) VP signal scale alpha_t
        sigma_vp = self.sigmas * alpha  # (steps + 1,) VP noise scale sigma_t
        # First-order update x' = (sigma_t'/sigma_t) x + alpha_t' (1 - e^-h) D, with e^-h = sigmas[i+1] / sigmas[i].
        self.coef_x = sigma_vp[1:] / sigma_vp[:-1]  # (steps,)
        self.coef_d = alpha[1:] * (1.0 - self.sigmas[1:] / self.sigmas[:-1])  # (steps,)
        # Second order: r = h_{i-1} / h_i, log-SNR step ratio, where lambda = -log(sigma) (undefined at sigma 0).
        lam = -np.log(sigmas)  # (steps,)
        self.r = np.ones(len(sigmas))  # (steps,) unused at the first and last step
        self.r[1:-1] = (lam[1:-1] - lam[:-2]) / (lam[2:] - lam[1:-1])
        self.x0_history = [None] * len(sigmas)

    def _spaced(self, steps: int) -> np.ndarray:
        """diffusers spaces steps + 1 points and drops the last for "linspace" and "leading"."""
        if self.config.timestep_spacing == "trailing":
            return np.round(spaced_timesteps(self.config, steps, "linspace")).astype(np.int64)
        return np.round(spaced_timesteps(self.config, steps + 1, "linspace")[:-1]).astype(np.int64)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """alpha_i x0 + sigma_i alpha_i noise, alpha_i = 1 / sqrt(sigmas[i]^2 + 1): diffusers' add_noise at step
        index i, in the VP frame the UNet is run in; i = len(timesteps) gives x0 (sigma 0)."""
        check_index(i, len(self.sigmas))
        return noised(x0, noise, 1.0 / (self.sigmas[i] ** 2 + 1.0))  # (B, C, H, W)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        check_index(i, len(self.timesteps), self.start)
        return sample

    def denoised(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """The model's estimate of the clean latents at step i (float64): what previews show, what step() follows."""
        check_index(i, len(self.timesteps), self.start)
        alpha_prod = 1.0 / (self.sigmas[i] ** 2 + 1.0)
        x = sample.astype(np.float64)  # (B, C, H, W)
        return predict_x0_eps(model_output.astype(np.float64), x, alpha_prod, self.config.prediction_type)[0]

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        x0 = self.denoised(model_output, i, sample)  # (B, C, H, W)
        x = sample.astype(np.float64)  # (B, C, H, W)
        self.x0_history[i] = x0
        d = x0  # (B, C, H, W)
        if self.start < i < len(self.timesteps) - 1:
            x0_prev = self.x0_history[i - 1]
            if x0_prev is None:
                raise ValueError(f"DPM++(2M) step {i} needs step {i - 1}'s output; run the steps in order from "
                                 f"{self.start}")
            d = x0 + 0.5 * (x0 - x0_prev) / self.r[i]  # midpoint: D0 + D1 / 2
            self.x0_history[i - 1] = None  # no longer needed
        return (self.coef_x[i] * x + self.coef_d[i] * d).astype(np.float32)  # (B, C, H, W)


class DPMPP2MKarrasScheduler(DPMPP2MScheduler):
    """DPM-Solver++(2M) on the Karras sigma schedule (diffusers: use_karras_sigmas=True)."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config, karras=True)
