"""The training noise schedule, read from a diffusers `scheduler_config.json`, and the helpers all schedulers share."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SchedulerConfig:
    """How the UNet was trained to be noised, as the model's `scheduler_config.json` states it.

    None is "the json does not say": each scheduler then uses the default of the diffusers class of its algorithm
    (`DEFAULTS`, applied by `with_defaults`), as `DiffusersClass.from_config(json)` would. SD 1.5's json states
    no timestep_spacing, so Euler starts from t = 999 ("linspace") and DDIM from t = 1 + 980 ("leading").
    """

    num_train_timesteps: int | None = None  # T: the discrete noise levels t = 0 .. T-1 seen in training
    beta_start: float | None = None  # beta at t = 0
    beta_end: float | None = None  # beta at t = T-1
    beta_schedule: str | None = None  # "linear" in beta, or "scaled_linear" (linear in sqrt(beta))
    prediction_type: str | None = None  # UNet output: the noise ("epsilon") or the velocity ("v_prediction")
    steps_offset: int | None = None  # added to "leading" timesteps (SD 1.5 states 1, so its last step is t = 1)
    timestep_spacing: str | None = None  # "leading" / "trailing" / "linspace" (lcm has its own schedule)
    set_alpha_to_one: bool | None = None  # DDIM/PNDM last step: alpha_prev = 1, else alphas_cumprod[0]
    clip_sample: bool | None = None  # DDIM/LCM: clip the predicted x0 to +-clip_sample_range
    clip_sample_range: float | None = None  # the bound used when clip_sample
    original_inference_steps: int | None = None  # LCM: length of the distillation schedule the steps are drawn from
    timestep_scaling: float | None = None  # LCM: t is multiplied by this in the consistency boundary scalings

    def __post_init__(self) -> None:
        if self.beta_schedule is not None:
            _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.prediction_type is not None:
            _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing is not None:
            _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.num_train_timesteps is not None and self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1; got {self.num_train_timesteps}")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(allowed)}")


# The __init__ defaults of the diffusers class each scheduler matches (DIFFUSERS_EQUIVALENT in __init__.py;
# tests/test_schedulers.py reads them back from diffusers' signatures). A key the class does not take is set
# to what the algorithm here does without it.
_DIFFUSERS_BASE = SchedulerConfig(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
    steps_offset=0, timestep_spacing="linspace", set_alpha_to_one=False, clip_sample=False, clip_sample_range=1.0,
    original_inference_steps=50, timestep_scaling=10.0,
)
DEFAULTS: dict[str, SchedulerConfig] = {
    "ddim": replace(_DIFFUSERS_BASE, timestep_spacing="leading", set_alpha_to_one=True, clip_sample=True),
    "pndm": replace(_DIFFUSERS_BASE, timestep_spacing="leading"),
    "euler": _DIFFUSERS_BASE,
    "euler_a": _DIFFUSERS_BASE,
    "dpmpp_2m": _DIFFUSERS_BASE,
    "dpmpp_2m_karras": _DIFFUSERS_BASE,
    "lcm": replace(_DIFFUSERS_BASE, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   timestep_spacing="leading", set_alpha_to_one=True),
}


def with_defaults(config: SchedulerConfig, scheduler: str) -> SchedulerConfig:
    """`config` with every key it leaves open set to `scheduler`'s diffusers default; what it states is kept."""
    if scheduler not in DEFAULTS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(DEFAULTS)}")
    stated = {f.name: getattr(config, f.name) for f in fields(config) if getattr(config, f.name) is not None}
    return replace(DEFAULTS[scheduler], **stated)


# Keys that describe a different *training* noise schedule than the one we model; a model with any other
# value was trained differently, and sampling it with our schedules would be wrong.
_MUST_BE_NEUTRAL = {
    "trained_betas": None, "rescale_betas_zero_snr": False, "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
}


def scheduler_config_from_dict(d: dict) -> SchedulerConfig:
    """Map a diffusers scheduler_config.json, key by key; a key it lacks stays None (see SchedulerConfig).

    Other keys are the saved preferences of whichever diffusers sampler the model shipped with
    (skip_prk_steps, use_karras_sigmas, solver_order, predict_x0, ...): the sampler here is chosen by
    name in make_scheduler, so they are read past. Keys starting with '_' are metadata.
    """
    for key, neutral in _MUST_BE_NEUTRAL.items():
        if d.get(key, neutral) not in (neutral, [], ()):
            raise ValueError(f"unsupported scheduler config {key}={d[key]!r}: this model was trained with a "
                             f"different noise schedule; supported: {neutral!r}")

    return SchedulerConfig(
        num_train_timesteps=_stated(d, "num_train_timesteps", int),
        beta_start=_stated(d, "beta_start", float),
        beta_end=_stated(d, "beta_end", float),
        beta_schedule=d.get("beta_schedule"),
        prediction_type=d.get("prediction_type"),
        steps_offset=_stated(d, "steps_offset", int),
        timestep_spacing=d.get("timestep_spacing"),
        set_alpha_to_one=_stated(d, "set_alpha_to_one", bool),
        clip_sample=_stated(d, "clip_sample", bool),
        clip_sample_range=_stated(d, "clip_sample_range", float),
        original_inference_steps=_stated(d, "original_inference_steps", int),
        timestep_scaling=_stated(d, "timestep_scaling", float),
    )


def _stated(d: dict, key: str, kind: type) -> Any:
    """d[key] as `kind`; None where the json does not state it (or states null). Accepts what diffusers'
    classes work with: true/false (or 0/1) for flags, numbers for the rest."""
    value = d.get(key)
    if value is None:
        return None
    if kind is bool and value in (0, 1) and not isinstance(value, float):
        return bool(value)
    if kind is not bool and isinstance(value, (int, float)) and not isinstance(value, bool):
        return kind(value)
    expected = "true or false" if kind is bool else "a number"
    raise ValueError(f"scheduler config {key}={value!r}: expected {expected}")


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


def check_index(i: int, n: int, start: int = 0) -> None:
    """Steps before `start` are not part of an img2img run: a multistep method would read history it never had."""
    if not start <= i < n:
        raise IndexError(f"step index {i} is outside {start}..{n - 1}; call set_timesteps(steps) first")


def first_step(steps: int, strength: float) -> int:
    """The step index img2img starts from, so that the last int(steps * strength) steps run: diffusers'
    StableDiffusionImg2ImgPipeline.get_timesteps. Every scheduler here has diffusers order 1, so this is also the
    begin_index diffusers sets, and PNDM's duplicated second timestep counts as a step, as there."""
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number from 0 to 1 (1: all steps, from pure noise); got {strength!r}")
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(f"strength {strength} of {steps} steps leaves no step to run (int(steps * strength) = 0); "
                         f"steps * strength must be at least 1")
    return steps - kept


def check_noise_shapes(x0: np.ndarray, noise: np.ndarray) -> None:
    if np.shape(x0) != np.shape(noise):
        raise ValueError(f"add_noise: the latents {np.shape(x0)} and the noise {np.shape(noise)} differ in shape")


def noised(x0: np.ndarray, noise: np.ndarray, alpha_prod: float) -> np.ndarray:
    """sqrt(a) x0 + sqrt(1 - a) noise: the forward process q(x_t | x0) (Ho et al. 2020, eq. 4); a = 1 gives x0."""
    check_noise_shapes(x0, noise)
    x = alpha_prod**0.5 * np.asarray(x0, np.float64) + (1.0 - alpha_prod) ** 0.5 * np.asarray(noise, np.float64)
    return x.astype(np.float32)  # (B, C, H, W)


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


def clipped_x0(model_output: np.ndarray, sample: np.ndarray, alpha_prod: float,
               config: "SchedulerConfig") -> np.ndarray:
    """x0 from the UNet output (float64), clipped to the config's range where it asks (DDIM's and LCM's
    clip_sample)."""
    x0, _ = predict_x0_eps(model_output.astype(np.float64), sample.astype(np.float64), alpha_prod,
                           config.prediction_type)
    if config.clip_sample:
        x0 = np.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0
