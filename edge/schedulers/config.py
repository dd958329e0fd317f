"""The training noise schedule, read from a diffusers `scheduler_config.json`, and the helpers all schedulers share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SchedulerConfig:
    """How the UNet was trained to be noised. Defaults are Stable Diffusion 1.5's `scheduler_config.json`."""

    num_train_timesteps: int = 1000  # T: the discrete noise levels t = 0 .. T-1 seen in training
    beta_start: float = 0.00085  # beta at t = 0
    beta_end: float = 0.012  # beta at t = T-1
    beta_schedule: str = "scaled_linear"  # "linear" in beta, or "scaled_linear" (linear in sqrt(beta))
    prediction_type: str = "epsilon"  # UNet output: the noise ("epsilon") or the velocity ("v_prediction", SD 2.x 768)
    steps_offset: int = 1  # added to "leading" timesteps, so SD's last step is t = 1
    # "leading" / "trailing" / "linspace". None (SD 1.5's json has no such key): each class's diffusers default,
    # "leading" for ddim and pndm, "linspace" for euler, euler_a and dpmpp_2m (lcm has its own schedule).
    timestep_spacing: str | None = None
    set_alpha_to_one: bool = False  # DDIM/PNDM/LCM last step: alpha_prev = 1, else alphas_cumprod[0]
    clip_sample: bool = False  # DDIM/LCM: clip the predicted x0 to +-clip_sample_range
    clip_sample_range: float = 1.0  # the bound used when clip_sample
    original_inference_steps: int = 50  # LCM: length of the distillation schedule the steps are drawn from
    timestep_scaling: float = 10.0  # LCM: t is multiplied by this in the consistency boundary scalings

    def __post_init__(self) -> None:
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing is not None:
            _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1; got {self.num_train_timesteps}")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(allowed)}")


# Keys that describe a different *training* noise schedule than the one we model; a model with any other
# value was trained differently, and sampling it with our schedules would be wrong.
_MUST_BE_NEUTRAL = {
    "trained_betas": None, "rescale_betas_zero_snr": False, "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
}


def scheduler_config_from_dict(d: dict) -> SchedulerConfig:
    """Map a diffusers scheduler_config.json, key by key.

    Other keys are the saved preferences of whichever diffusers sampler the model shipped with
    (skip_prk_steps, use_karras_sigmas, solver_order, predict_x0, ...): the sampler here is chosen by
    name in make_scheduler, so they are read past. Keys starting with '_' are metadata.
    """
    for key, neutral in _MUST_BE_NEUTRAL.items():
        if d.get(key, neutral) not in (neutral, [], ()):
            raise ValueError(f"unsupported scheduler config {key}={d[key]!r}: this model was trained with a "
                             f"different noise schedule; supported: {neutral!r}")
    base = SchedulerConfig()
    return SchedulerConfig(
        num_train_timesteps=int(d.get("num_train_timesteps", base.num_train_timesteps)),
        beta_start=float(d.get("beta_start", base.beta_start)),
        beta_end=float(d.get("beta_end", base.beta_end)),
        beta_schedule=d.get("beta_schedule", base.beta_schedule),
        prediction_type=d.get("prediction_type", base.prediction_type),
        steps_offset=int(d.get("steps_offset", base.steps_offset)),
        timestep_spacing=d.get("timestep_spacing", base.timestep_spacing),
        set_alpha_to_one=bool(d.get("set_alpha_to_one", base.set_alpha_to_one)),
        clip_sample=bool(d.get("clip_sample", base.clip_sample)),
        clip_sample_range=float(d.get("clip_sample_range", base.clip_sample_range)),
        original_inference_steps=int(d.get("original_inference_steps", base.original_inference_steps)),
        timestep_scaling=float(d.get("timestep_scaling", base.timestep_scaling)),
    )


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), the signal fraction at each training step (Ho et al. 2020)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)  # (T,)
    else:  # scaled_linear
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2  # (T,)
    return np.cumprod(1.0 - betas)  # (T,)


def check_steps(steps: int, config: SchedulerConfig) -> None:
    if not 1 <= steps <= config.num_train_timesteps:
        raise ValueError(f"steps must be between 1 and num_train_timesteps={config.num_train_timesteps}; got {steps}")


def check_index(i: int, n: int) -> None:
    if not 0 <= i < n:
        raise IndexError(f"step index {i} is outside 0..{n - 1}; call set_timesteps(steps) first")


def spaced_timesteps(config: SchedulerConfig, steps: int, default_spacing: str) -> np.ndarray:
    """Descending float64 timesteps per Table 2 of Lin et al. 2023 ("Common Diffusion Noise Schedules ... Flawed").

    "linspace" is left unrounded (Euler uses fractional t); integer schedulers round it with np.round.
    """
    spacing = resolved_spacing(config, default_spacing)
    n = config.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float64)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps)[::-1] * (n // steps) + config.steps_offset).astype(np.float64)
    return np.round(np.arange(n, 0, -n / steps)) - 1.0  # trailing


def resolved_spacing(config: SchedulerConfig, default_spacing: str) -> str:
    return default_spacing if config.timestep_spacing is None else config.timestep_spacing


def predict_x0_eps(
    model_output: np.ndarray, sample: np.ndarray, alpha_prod: float, prediction_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from the UNet output, for x_t = sqrt(a) x0 + sqrt(1-a) eps; v = sqrt(a) eps - sqrt(1-a) x0
    (Salimans & Ho 2022, "Progressive Distillation"), so schedulers never branch on the prediction type."""
    a, b = alpha_prod**0.5, (1.0 - alpha_prod) ** 0.5
    if prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    return a * sample - b * model_output, a * model_output + b * sample  # v_prediction
