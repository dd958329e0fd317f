"""Golden tests: each numpy scheduler against the diffusers scheduler of the same name, step by step.

Both run the whole sampling loop on their own trajectory with the same dummy model and the same starting
latents; the stochastic ones (euler_a, lcm) get the same noise, drawn from two generators with one seed in the
order diffusers draws it.

diffusers builds alphas_cumprod with a float32 torch.linspace and cumprod, which differs from the float64
schedule by ~1e-6 relative (up to ~1e-4 in sigma near t = 0, where 1 - alpha_bar cancels). So each case runs
twice: once with our scheduler on diffusers' own schedule (tests the algorithm: every step within 1e-5), and
once as shipped, on our float64 schedule (within 1e-4).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from edge.schedulers import SCHEDULERS, SchedulerConfig, make_scheduler, scheduler_config_from_dict  # noqa: E402
from edge.schedulers.config import alphas_cumprod  # noqa: E402

torch.set_num_threads(1)

# Stable Diffusion 1.5's scheduler_config.json, as shipped (no timestep_spacing: each class uses its default).
SD15 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
CONFIGS = {
    "sd15": SD15,
    "sd15_trailing": {**SD15, "timestep_spacing": "trailing"},
    "linear_linspace": {
        "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000,
        "timestep_spacing": "linspace", "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": True,
        "clip_sample_range": 1.5,
    },
}
REFERENCE = {  # our name -> (diffusers class name, extra config)
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}
SHAPE = (2, 4, 8, 8)  # (B, C, H, W)
STEP_RTOL = 1e-5  # the algorithm, on diffusers' own alphas_cumprod
SHIPPED_RTOL = 1e-4  # as shipped: float64 alphas_cumprod against diffusers' float32 one


def dummy_unet(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet, nonlinear in x and t so multistep history matters."""
    x = x.astype(np.float64)
    return (0.3 * x + 0.2 * np.sin(x + t / 100.0) + 0.1 * np.cos(t / 137.0)).astype(np.float32)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours.astype(np.float64) - ref) / np.linalg.norm(ref.astype(np.float64)))


def run_pair(name: str, config: dict, steps: int, diffusers_schedule: bool) -> list[float]:
    """Run both loops; assert schedule equality on the way and return each step's relative error."""
    cls_name, extra = REFERENCE[name]
    ref = getattr(diffusers, cls_name).from_config(config, **extra)
    ref.set_timesteps(steps)
    ours = make_scheduler(name, scheduler_config_from_dict(config))
    if diffusers_schedule:
        ours.alphas_cumprod = ref.alphas_cumprod.numpy().astype(np.float64)  # (T,) read by set_timesteps
    ours.set_timesteps(steps)
    tol = 1e-6 if diffusers_schedule else SHIPPED_RTOL

    ref_ts = ref.timesteps.numpy()
    assert ours.timesteps.dtype in (np.float64, np.int64)
    np.testing.assert_array_equal(ours.timesteps.astype(ref_ts.dtype), ref_ts)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=tol)

    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps)).numpy()  # (B, C, H, W)
    x_ref = torch.from_numpy(latents) * ref.init_noise_sigma
    x = (latents * ours.init_noise_sigma).astype(np.float32)
    gen_ref, gen_ours = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    errors = []
    for i, t in enumerate(ref.timesteps):
        ref_in = ref.scale_model_input(x_ref, t)
        assert rel_err(ours.scale_model_input(x_ref.numpy(), i), ref_in.numpy()) <= tol
        ref_out = torch.from_numpy(dummy_unet(ref_in.numpy(), float(t)))
        kwargs = {"generator": gen_ref} if ours.needs_noise else {}
        x_ref = ref.step(ref_out, t, x_ref, **kwargs).prev_sample

        noise = None
        # diffusers' euler_a draws on every step; lcm on every step but the last.
        if name == "euler_a" or (name == "lcm" and i < len(ours.timesteps) - 1):
            noise = torch.randn(SHAPE, generator=gen_ours).numpy()
        out = dummy_unet(ours.scale_model_input(x, i), float(ours.timesteps[i]))
        x = ours.step(out, i, x, noise=noise)
        assert x.dtype == np.float32 and x.shape == SHAPE
        errors.append(rel_err(x, x_ref.numpy()))
    assert len(errors) == len(ours.timesteps)
    return errors


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_matches_diffusers(name: str, prediction_type: str, config_name: str, steps: int) -> None:
    config = {**CONFIGS[config_name], "prediction_type": prediction_type}
    errors = run_pair(name, config, steps, diffusers_schedule=True)
    assert max(errors) <= STEP_RTOL, f"step errors {errors}"
    errors = run_pair(name, config, steps, diffusers_schedule=False)
    assert max(errors) <= SHIPPED_RTOL, f"step errors {errors}"


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_alphas_cumprod(beta_schedule: str) -> None:
    config = {**SD15, "beta_schedule": beta_schedule}
    ours = alphas_cumprod(scheduler_config_from_dict(config))
    assert ours.dtype == np.float64 and ours.shape == (1000,)
    ref = diffusers.DDIMScheduler.from_config(config).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours, ref, rtol=2e-6)  # diffusers' float32 cumprod noise
    betas = np.linspace(0.00085, 0.012, 1000) if beta_schedule == "linear" else np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(ours, [np.prod(1 - betas[: t + 1]) for t in range(1000)], rtol=1e-12)


def test_registry_covers_every_reference() -> None:
    assert list(SCHEDULERS) == list(REFERENCE)


def test_unknown_scheduler_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'xyz'; known: ddim, pndm, euler, euler_a, dpmpp_2m"):
        make_scheduler("xyz", SchedulerConfig())


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_bad_step_count(name: str, steps: int) -> None:
    with pytest.raises(ValueError, match=f"got {steps}"):
        make_scheduler(name, SchedulerConfig()).set_timesteps(steps)


def test_lcm_steps_beyond_distillation_schedule() -> None:
    with pytest.raises(ValueError, match="original_inference_steps=50; got 51"):
        make_scheduler("lcm", SchedulerConfig()).set_timesteps(51)


def test_config_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'; known: epsilon, v_prediction"):
        scheduler_config_from_dict({**SD15, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="unknown beta_schedule 'squaredcos_cap_v2'; known: linear, scaled_linear"):
        scheduler_config_from_dict({**SD15, "beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(ValueError, match="unknown timestep_spacing 'even'"):
        scheduler_config_from_dict({**SD15, "timestep_spacing": "even"})
    with pytest.raises(ValueError, match="unsupported rescale_betas_zero_snr=True; supported: False"):
        scheduler_config_from_dict({**SD15, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="unknown scheduler config key 'beta_max'"):
        scheduler_config_from_dict({**SD15, "beta_max": 0.02})


def test_sd15_json_maps_to_defaults() -> None:
    assert scheduler_config_from_dict(SD15) == SchedulerConfig()
    cfg = scheduler_config_from_dict({**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"})
    assert (cfg.prediction_type, cfg.timestep_spacing, cfg.steps_offset) == ("v_prediction", "trailing", 1)


@pytest.mark.parametrize("name", ["euler_a", "lcm"])
def test_noise_required_where_used(name: str) -> None:
    scheduler = make_scheduler(name, SchedulerConfig())
    scheduler.set_timesteps(4)
    x = np.zeros(SHAPE, dtype=np.float32)
    assert scheduler.needs_noise
    with pytest.raises(ValueError, match="needs `noise`"):
        scheduler.step(x, 0, x)
    assert scheduler.step(x, 3, x).dtype == np.float32  # the last step adds no noise


@pytest.mark.parametrize("name", ["pndm", "dpmpp_2m"])
def test_multistep_out_of_order(name: str) -> None:
    scheduler = make_scheduler(name, SchedulerConfig())
    scheduler.set_timesteps(10)
    x = np.ones(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="run the steps in order"):
        scheduler.step(x, 3, x)


def test_step_index_checked() -> None:
    scheduler = make_scheduler("ddim", SchedulerConfig())
    x = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(IndexError, match="call set_timesteps"):
        scheduler.step(x, 0, x)


def test_runtime_import_has_no_torch() -> None:
    code = "import sys, edge.schedulers; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
