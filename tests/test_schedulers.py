"""Golden tests: each numpy scheduler against the diffusers scheduler of the same name, step by step.

Both run the whole sampling loop from the same latents with the same dummy model; the stochastic ones (euler_a,
lcm) get the same noise, drawn from two generators with one seed in the order diffusers draws it. Each case runs
twice:

- lockstep, on diffusers' own alphas_cumprod: at every step ours gets the sample and model output diffusers got,
  so each step's error is that step's alone; bound 1e-5 relative. Where a step cancels (output norm far below
  the input's), diffusers' float32 arithmetic itself is off by more than that, so the bound is
  1e-5 * |ref out| + 1e-6 * |ref in| (1e-6 is ~17 float32 ulps of the input); see test_float32_reference_floor.
- as shipped, each on its own trajectory and our float64 alphas_cumprod; diffusers' float32 torch.linspace and
  cumprod differ from it by ~1e-6 relative (up to 1.5e-4 in sigma near t = 0), so the bound is 2e-4 relative.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference side only: the `convert` extra
diffusers = pytest.importorskip("diffusers")

from edge.schedulers import (  # noqa: E402
    DIFFUSERS_EQUIVALENT, SCHEDULERS, SchedulerConfig, make_scheduler, scheduler_config_from_dict, with_defaults,
)
from edge.schedulers.config import DEFAULTS, alphas_cumprod  # noqa: E402

torch.set_num_threads(1)
# diffusers' schedulers call np.array(tensor, copy=False) under numpy 2: harmless, and not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# Stable Diffusion 1.5's scheduler_config.json, as shipped (no timestep_spacing: each class uses its default).
SD15 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
CONFIGS = {
    "sd15": SD15,
    "sd15_leading": {**SD15, "timestep_spacing": "leading"},  # as SDXL's json: leading for every class
    "sd15_trailing": {**SD15, "timestep_spacing": "trailing"},
    # leading without steps_offset: each class's own offset (0) applies, not SD 1.5's 1
    "leading_no_offset": {k: v for k, v in {**SD15, "timestep_spacing": "leading"}.items() if k != "steps_offset"},
    "empty": {},  # nothing stated: every key is the class's default (DDIM clips, LCM's betas differ from Euler's)
    "linear_linspace": {  # also non-default clipping (ddim, lcm) and LCM distillation settings
        "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000,
        "timestep_spacing": "linspace", "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": True,
        "clip_sample_range": 1.5, "original_inference_steps": 25, "timestep_scaling": 0.05,
    },
}
REFERENCE = DIFFUSERS_EQUIVALENT  # our name -> (diffusers class name, extra config)
SHAPE = (2, 4, 8, 8)  # (B, C, H, W)
STEP_RTOL = 1e-5  # lockstep, on diffusers' own alphas_cumprod
INPUT_FLOOR = 1e-6  # lockstep: float32 rounding of a cancelling step's input, relative to the input's norm
SHIPPED_RTOL = 2e-4  # as shipped: diffusers float32 sigma near t = 0 is off by up to 1.5e-4 (beta_start 1e-4)


def dummy_unet(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet, nonlinear in x and t so multistep history matters."""
    x = x.astype(np.float64)
    return (0.3 * x + 0.2 * np.sin(x + t / 100.0) + 0.1 * np.cos(t / 137.0)).astype(np.float32)


def norm(a: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64)))


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return norm(ours.astype(np.float64) - ref) / norm(ref)


def run_pair(name: str, config: dict, steps: int, lockstep: bool) -> list[tuple[float, float]]:
    """Run both loops, asserting equal schedules on the way; per step, return (relative error, |in| / |out|)."""
    cls_name, extra = REFERENCE[name]
    ref = getattr(diffusers, cls_name).from_config(config, **extra)
    ref.set_timesteps(steps)
    ours = make_scheduler(name, scheduler_config_from_dict(config))
    if lockstep:
        ours.alphas_cumprod = ref.alphas_cumprod.numpy().astype(np.float64)  # (T,) read by set_timesteps
    ours.set_timesteps(steps)
    tol = 1e-6 if lockstep else SHIPPED_RTOL

    ref_ts = ref.timesteps.numpy()
    assert ours.timesteps.dtype in (np.float64, np.int64)
    np.testing.assert_array_equal(ours.timesteps.astype(ref_ts.dtype), ref_ts)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=tol)

    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps)).numpy()  # (B, C, H, W)
    x_ref = torch.from_numpy(latents) * ref.init_noise_sigma
    x = (latents * ours.init_noise_sigma).astype(np.float32)
    gen_ref, gen_ours = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    results = []
    for i, t in enumerate(ref.timesteps):
        ref_in = ref.scale_model_input(x_ref, t)
        assert rel_err(ours.scale_model_input(x_ref.numpy(), i), ref_in.numpy()) <= tol
        ref_out = torch.from_numpy(dummy_unet(ref_in.numpy(), float(t)))
        kwargs = {"generator": gen_ref} if ours.needs_noise else {}
        x_ref_next = ref.step(ref_out, t, x_ref, **kwargs).prev_sample

        noise = None
        # diffusers' euler_a draws on every step; lcm on every step but the last.
        if name == "euler_a" or (name == "lcm" and i < len(ours.timesteps) - 1):
            noise = torch.randn(SHAPE, generator=gen_ours).numpy()
        if lockstep:
            x = ours.step(ref_out.numpy(), i, x_ref.numpy(), noise=noise)
        else:
            out = dummy_unet(ours.scale_model_input(x, i), float(ours.timesteps[i]))
            x = ours.step(out, i, x, noise=noise)
        assert x.dtype == np.float32 and x.shape == SHAPE
        results.append((rel_err(x, x_ref_next.numpy()), norm(x_ref.numpy()) / norm(x_ref_next.numpy())))
        x_ref = x_ref_next
    assert len(results) == len(ours.timesteps)
    return results


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_matches_diffusers(name: str, prediction_type: str, config_name: str, steps: int) -> None:
    config = {**CONFIGS[config_name], "prediction_type": prediction_type}
    lockstep = run_pair(name, config, steps, lockstep=True)
    for i, (err, in_over_out) in enumerate(lockstep):
        assert err <= STEP_RTOL + INPUT_FLOOR * in_over_out, f"lockstep step {i}: {lockstep}"
    shipped = run_pair(name, config, steps, lockstep=False)
    assert max(err for err, _ in shipped) <= SHIPPED_RTOL, f"as shipped: {shipped}"


def test_float32_reference_floor() -> None:
    """The one cancelling step in the grid (Euler, v-prediction, sigma 157 -> 0.01) is off by 5e-5 against diffusers
    in float32 but agrees to float32 rounding with the same diffusers step evaluated in float64."""
    config = {**CONFIGS["linear_linspace"], "prediction_type": "v_prediction"}
    ref = diffusers.EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(2)
    ours = make_scheduler("euler", scheduler_config_from_dict(config))
    ours.alphas_cumprod = ref.alphas_cumprod.numpy().astype(np.float64)
    ours.set_timesteps(2)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * ref.init_noise_sigma
    t = ref.timesteps[0]
    out = torch.from_numpy(dummy_unet(ref.scale_model_input(x, t).numpy(), float(t)))
    mine = ours.step(out.numpy(), 0, x.numpy().astype(np.float32))
    ref32 = ref.step(out, t, x.float()).prev_sample.numpy()
    ref._step_index, ref.sigmas = None, ref.sigmas.double()
    ref64 = ref.step(out.double(), t, x).prev_sample.numpy()
    assert norm(x.numpy()) / norm(ref64) > 100  # the step cancels
    assert rel_err(ref32, ref64) > STEP_RTOL  # diffusers' float32 misses 1e-5 here ...
    assert rel_err(mine, ref64) < 1e-6  # ... and ours does not


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_alphas_cumprod(beta_schedule: str) -> None:
    config = {**SD15, "beta_schedule": beta_schedule}
    ours = alphas_cumprod(scheduler_config_from_dict(config))
    assert ours.dtype == np.float64 and ours.shape == (1000,)
    ref = diffusers.DDIMScheduler.from_config(config).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours, ref, rtol=2e-6)  # diffusers' float32 linspace and cumprod
    lo, hi = (0.00085, 0.012) if beta_schedule == "linear" else (0.00085**0.5, 0.012**0.5)
    betas = np.linspace(lo, hi, 1000) ** (1 if beta_schedule == "linear" else 2)
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
    with pytest.raises(ValueError, match="unsupported scheduler config rescale_betas_zero_snr=True: .* supported: False"):
        scheduler_config_from_dict({**SD15, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="unsupported scheduler config trained_betas"):
        scheduler_config_from_dict({**SD15, "trained_betas": [0.1, 0.2]})


@pytest.mark.parametrize("cls", ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                 "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler",
                                 "HeunDiscreteScheduler", "DEISMultistepScheduler"])
def test_any_diffusers_sampler_config_of_the_sd_schedule_is_read(cls: str) -> None:
    """Models ship with whichever sampler their author liked; its own options are not the training schedule."""
    import diffusers

    config = dict(getattr(diffusers, cls).from_config(SD15).config)
    assert scheduler_config_from_dict(config).beta_schedule == "scaled_linear"


def test_sd15_json_keeps_what_it_states() -> None:
    cfg = scheduler_config_from_dict(SD15)
    assert (cfg.beta_schedule, cfg.beta_start, cfg.steps_offset, cfg.set_alpha_to_one, cfg.clip_sample) == (
        "scaled_linear", 0.00085, 1, False, False)
    assert cfg.timestep_spacing is None and cfg.prediction_type is None  # SD 1.5's json does not say
    spacing = {name: with_defaults(cfg, name).timestep_spacing for name in ("ddim", "pndm", "euler", "dpmpp_2m")}
    assert spacing == {"ddim": "leading", "pndm": "leading", "euler": "linspace", "dpmpp_2m": "linspace"}
    assert with_defaults(cfg, "euler").steps_offset == 1  # stated: kept
    cfg = scheduler_config_from_dict({**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"})
    assert (cfg.prediction_type, cfg.timestep_spacing, cfg.steps_offset) == ("v_prediction", "trailing", 1)
    assert with_defaults(cfg, "ddim").timestep_spacing == "trailing"


@pytest.mark.parametrize("name", list(REFERENCE))
def test_defaults_are_the_diffusers_class_defaults(name: str) -> None:
    """What a config leaves open is what the diffusers class of the same algorithm would use."""
    cls_name, _ = REFERENCE[name]
    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    resolved = with_defaults(SchedulerConfig(), name)
    shared = [f.name for f in fields(SchedulerConfig) if f.name in params]
    assert len(shared) >= 7, shared
    for key in shared:
        assert getattr(resolved, key) == params[key].default, f"{name}: {key}"
    assert all(getattr(resolved, f.name) is not None for f in fields(SchedulerConfig))


def test_defaults_cover_every_scheduler() -> None:
    assert list(DEFAULTS) == list(SCHEDULERS)
    with pytest.raises(ValueError, match="unknown scheduler 'xyz'; known: ddim, pndm"):
        with_defaults(SchedulerConfig(), "xyz")


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "ddim"])
def test_older_bundles_keep_what_they_recorded(name: str) -> None:
    """Converters before the stated-keys manifest recorded the source class's whole config, its defaults
    included (PNDM's "leading" for SD 1.5): those bundles sample as they always did, from those values."""
    recorded = json.loads(json.dumps(dict(diffusers.PNDMScheduler.from_config(SD15).config)))
    assert "timestep_spacing" in recorded["_use_default_values"]
    cfg = scheduler_config_from_dict(recorded)
    assert (cfg.timestep_spacing, cfg.prediction_type) == ("leading", "epsilon")
    cls_name, extra = REFERENCE[name]
    as_recorded = {k: v for k, v in recorded.items() if k != "_use_default_values"}  # every key as stated
    ref = getattr(diffusers, cls_name).from_config(as_recorded, **extra)
    ref.set_timesteps(6)
    ours = make_scheduler(name, cfg)
    ours.set_timesteps(6)
    np.testing.assert_array_equal(ours.timesteps.astype(np.int64), ref.timesteps.numpy().astype(np.int64))


def test_config_value_types_checked() -> None:
    with pytest.raises(ValueError, match="scheduler config steps_offset='1': expected a number"):
        scheduler_config_from_dict({**SD15, "steps_offset": "1"})
    with pytest.raises(ValueError, match="scheduler config clip_sample=2: expected true or false"):
        scheduler_config_from_dict({**SD15, "clip_sample": 2})
    assert scheduler_config_from_dict({**SD15, "clip_sample": 1, "timestep_spacing": None}).clip_sample is True


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


def test_the_peer_runner_keeps_the_same_scheduler_map():
    """converters/bench_peer.py runs in peer environments without edge, so it carries a copy of the map."""
    from edge.converters.bench_peer import SCHEDULERS
    from edge.schedulers import DIFFUSERS_EQUIVALENT

    assert SCHEDULERS == DIFFUSERS_EQUIVALENT


@pytest.mark.parametrize("name", [n for n in REFERENCE if n != "lcm"])
def test_denoised_recovers_the_clean_latents(name: str) -> None:
    """Given the exact noise of a sample noised by add_noise, denoised() returns the clean latents it came from, at
    every step: the estimate previews show is the scheduler's own frame, for every algorithm (LCM's consistency
    function mixes the sample back in by design; it is checked against diffusers below)."""
    ours = make_scheduler(name, scheduler_config_from_dict(SD15))
    ours.set_timesteps(10)
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    for i in range(len(ours.timesteps)):
        sample = ours.add_noise(x0.astype(np.float32), eps.astype(np.float32), i)
        assert rel_err(ours.denoised(eps.astype(np.float32), i, sample), x0) < 1e-4, i


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "lcm"])
def test_denoised_matches_diffusers_pred_original_sample(name: str, prediction_type: str) -> None:
    """Lockstep against the x0 diffusers reports from each step (`pred_original_sample`; LCM's `denoised`)."""
    config = {**SD15, "prediction_type": prediction_type}
    cls_name, extra = REFERENCE[name]
    ref = getattr(diffusers, cls_name).from_config(config, **extra)
    ref.set_timesteps(8)
    ours = make_scheduler(name, scheduler_config_from_dict(config))
    ours.alphas_cumprod = ref.alphas_cumprod.numpy().astype(np.float64)
    ours.set_timesteps(8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * ref.init_noise_sigma
    gen = torch.Generator().manual_seed(5)
    for i, t in enumerate(ref.timesteps):
        out = torch.from_numpy(dummy_unet(ref.scale_model_input(x, t).numpy(), float(t)))
        step = ref.step(out, t, x, **({"generator": gen} if ours.needs_noise else {}))
        expected = step.denoised if name == "lcm" else step.pred_original_sample
        assert rel_err(ours.denoised(out.numpy(), i, x.numpy()), expected.numpy()) < 1e-5, i
        x = step.prev_sample
