"""img2img and inpainting with every numpy scheduler, against diffusers' schedulers driven as its pipelines drive them.

The reference side is StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline's own code where it is a
function (get_timesteps), and their loops copied line for line where it is not (add_noise at timesteps[:1], the
4-channel inpaint blend at timesteps[i + 1]). Each side runs its own trajectory with its own alphas_cumprod
(diffusers' are float32), from the same latents, noise and dummy denoiser; the stochastic schedulers (euler_a, lcm)
get the same noise, drawn from two generators of one seed in the order diffusers draws it.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference side only: the `convert` extra
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (  # noqa: E402
    StableDiffusionImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (  # noqa: E402
    StableDiffusionInpaintPipeline,
)

from test_schedulers import CONFIGS as SCHEDULER_CONFIGS, SD15  # noqa: E402  the json forms tested there

from edge.metrics import max_abs_diff, psnr  # noqa: E402
from edge.schedulers import DIFFUSERS_EQUIVALENT, first_step, make_scheduler, scheduler_config_from_dict  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

# SD 1.5's scheduler_config.json as shipped (each class then uses its own default spacing) and with the spacing
# stated, and a linear-beta v-prediction json with clipping (ddim, lcm) and non-default LCM distillation settings.
CONFIGS = {
    **{name: SCHEDULER_CONFIGS[name] for name in ("sd15", "sd15_leading", "sd15_trailing")},
    "linear_linspace_v": {**SCHEDULER_CONFIGS["linear_linspace"], "prediction_type": "v_prediction"},
}
SHAPE = (2, 4, 8, 8)  # (B, C, h, w)
STRENGTHS = [0.3, 0.6, 0.9, 1.0]  # 0.9 of 6 or 10 steps starts PNDM on its duplicated timestep
STEPS = [6, 10]
ADD_NOISE_DB = 100.0
LOOP_DB = 60.0
R = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)  # (B, C, h, w) the denoiser's fixed part


def denoiser_np(x: np.ndarray, t: float) -> np.ndarray:
    """The dummy UNet: 0.1 x + a fixed random tensor, that tensor scaled a little with t so timesteps matter."""
    return (np.float32(0.1) * x + R * np.float32(1.0 + float(t) / 1000.0)).astype(np.float32)


def denoiser_torch(x: torch.Tensor, t: float) -> torch.Tensor:
    """denoiser_np, in torch (float32 throughout, as numpy's)."""
    return torch.tensor(0.1, dtype=torch.float32) * x + torch.from_numpy(R) * torch.tensor(
        1.0 + float(t) / 1000.0, dtype=torch.float32)


def reference(name: str, config: dict, steps: int):
    cls_name, extra = DIFFUSERS_EQUIVALENT[name]
    ref = getattr(diffusers, cls_name).from_config(config, **extra)
    ref.set_timesteps(steps)
    return ref


def ours(name: str, config: dict, steps: int, strength: float):
    scheduler = make_scheduler(name, scheduler_config_from_dict(config))
    scheduler.set_timesteps(steps, strength)
    return scheduler


def latents_and_noise() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x0 = (0.8 * rng.standard_normal(SHAPE)).astype(np.float32)  # (B, C, h, w) "VAE latents * scaling factor"
    return x0, rng.standard_normal(SHAPE).astype(np.float32)  # (B, C, h, w)


def step_noise(name: str, i: int, last: int, gen: torch.Generator) -> np.ndarray | None:
    """diffusers' euler_a draws on every step, lcm on every step but the last."""
    if name == "euler_a" or (name == "lcm" and i < last):
        return torch.randn(SHAPE, generator=gen).numpy()
    return None


CASES = [(n, c, s, k) for n in DIFFUSERS_EQUIVALENT for c in CONFIGS for s in STEPS for k in STRENGTHS]
IDS = [f"{n}-{c}-{s}-{k}" for n, c, s, k in CASES]


@pytest.mark.parametrize(("name", "config_name", "steps", "strength"), CASES, ids=IDS)
def test_start_and_remaining_timesteps(name: str, config_name: str, steps: int, strength: float) -> None:
    config = CONFIGS[config_name]
    mine = ours(name, config, steps, strength)
    for pipeline in (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline):
        ref = reference(name, config, steps)
        remaining, _ = pipeline.get_timesteps(SimpleNamespace(scheduler=ref), steps, strength, "cpu")
        assert mine.start == first_step(steps, strength) == len(ref.timesteps) - len(remaining)
        expected = remaining.numpy()
        np.testing.assert_array_equal(mine.timesteps[mine.start:].astype(expected.dtype), expected)
        if hasattr(ref, "set_begin_index"):
            assert ref.begin_index == mine.start


def diffusers_add_noise(ref, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
    """diffusers' add_noise at timesteps[i]; the sigma schedulers read the index from begin_index, as in img2img."""
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(i)
    out = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[i:i + 1])
    return out.numpy()


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", list(DIFFUSERS_EQUIVALENT))
def test_add_noise(name: str, config_name: str, steps: int) -> None:
    x0, noise = latents_and_noise()
    mine, ref = ours(name, CONFIGS[config_name], steps, 1.0), reference(name, CONFIGS[config_name], steps)
    for i in range(len(mine.timesteps)):
        got = mine.add_noise(x0, noise, i)
        assert got.dtype == np.float32 and got.shape == SHAPE
        db = psnr(diffusers_add_noise(ref, x0, noise, i), got)
        assert db >= ADD_NOISE_DB, f"step {i}: {db:.1f} dB"
    # One past the last step: the clean latents, which diffusers' inpaint loop blends in after its last step.
    np.testing.assert_array_equal(mine.add_noise(x0, noise, len(mine.timesteps)), x0)


def run_loops(name: str, config: dict, steps: int, strength: float, mask: np.ndarray | None) -> list[float]:
    """Both loops from x0 (img2img; with `mask` (1, 1, h, w), 1 = repaint, the 4-channel inpaint blend); per step,
    the PSNR of our sample against diffusers'."""
    x0, noise = latents_and_noise()
    ref = reference(name, config, steps)
    pipeline = StableDiffusionImg2ImgPipeline if mask is None else StableDiffusionInpaintPipeline
    timesteps, _ = pipeline.get_timesteps(SimpleNamespace(scheduler=ref), steps, strength, "cpu")
    mine = ours(name, config, steps, strength)
    x0_t, noise_t = torch.from_numpy(x0), torch.from_numpy(noise)
    if mask is not None and strength == 1.0:  # the inpaint pipeline's is_strength_max: pure noise, as text2img
        x_ref = noise_t * ref.init_noise_sigma
        x = (noise * mine.init_noise_sigma).astype(np.float32)
    else:
        x_ref = ref.add_noise(x0_t, noise_t, timesteps[:1])
        x = mine.add_noise(x0, noise, mine.start)
    gen_ref, gen_ours = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    kwargs = {"generator": gen_ref} if mine.needs_noise else {}
    mask_t = None if mask is None else torch.from_numpy(mask)
    figures = [psnr(x_ref.numpy(), x)]
    for k, t in enumerate(timesteps):
        x_ref = ref.step(denoiser_torch(ref.scale_model_input(x_ref, t), float(t)), t, x_ref, **kwargs).prev_sample
        if mask_t is not None:  # diffusers' 4-channel inpaint loop, as written there
            proper = x0_t
            if k < len(timesteps) - 1:
                proper = ref.add_noise(proper, noise_t, torch.tensor([timesteps[k + 1]]))
            x_ref = (1 - mask_t) * proper + mask_t * x_ref

        i = mine.start + k
        assert np.float32(mine.timesteps[i]) == np.float32(t)
        out = denoiser_np(mine.scale_model_input(x, i), float(mine.timesteps[i]))
        x = mine.step(out, i, x, noise=step_noise(name, i, len(mine.timesteps) - 1, gen_ours))
        if mask is not None:
            x = mask * x + (1 - mask) * mine.add_noise(x0, noise, i + 1)  # (B, C, h, w)
        assert x.dtype == np.float32 and x.shape == SHAPE
        figures.append(psnr(x_ref.numpy(), x))
    assert len(figures) == len(mine.timesteps) - mine.start + 1
    return figures


@pytest.mark.parametrize(("name", "config_name", "steps", "strength"), CASES, ids=IDS)
def test_img2img_loop(name: str, config_name: str, steps: int, strength: float) -> None:
    figures = run_loops(name, CONFIGS[config_name], steps, strength, mask=None)
    assert min(figures) >= LOOP_DB, [round(f, 1) for f in figures]


@pytest.mark.parametrize(("name", "config_name", "steps", "strength"), CASES, ids=IDS)
def test_inpaint_blending_loop(name: str, config_name: str, steps: int, strength: float) -> None:
    mask = (np.random.default_rng(5).random((1, 1, *SHAPE[2:])) < 0.5).astype(np.float32)  # (1, 1, h, w)
    figures = run_loops(name, CONFIGS[config_name], steps, strength, mask=mask)
    assert min(figures) >= LOOP_DB, [round(f, 1) for f in figures]


def test_inpaint_keeps_the_unmasked_latents_exactly() -> None:
    """After the last step the kept region is x0 itself: add_noise one past the end adds nothing."""
    x0, noise = latents_and_noise()
    mask = np.zeros((1, 1, *SHAPE[2:]), dtype=np.float32)  # (1, 1, h, w) nothing to repaint
    mask[..., :4] = 1.0
    for name in DIFFUSERS_EQUIVALENT:
        mine = ours(name, SD15, 10, 0.6)
        x = mine.add_noise(x0, noise, mine.start)
        gen = torch.Generator().manual_seed(0)
        for i in range(mine.start, len(mine.timesteps)):
            out = denoiser_np(mine.scale_model_input(x, i), float(mine.timesteps[i]))
            x = mine.step(out, i, x, noise=step_noise(name, i, len(mine.timesteps) - 1, gen))
            x = mask * x + (1 - mask) * mine.add_noise(x0, noise, i + 1)
        assert max_abs_diff(x0[..., 4:], x[..., 4:]) == 0.0, name


@pytest.mark.parametrize("name", list(DIFFUSERS_EQUIVALENT))
def test_full_strength_is_the_text_to_image_schedule(name: str) -> None:
    a, b = ours(name, SD15, 10, 1.0), make_scheduler(name, scheduler_config_from_dict(SD15))
    b.set_timesteps(10)
    assert a.start == b.start == 0
    np.testing.assert_array_equal(a.timesteps, b.timesteps)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_bad_strength_names_the_value(strength: object) -> None:
    with pytest.raises(ValueError, match=rf"strength must be a number from 0 to 1 .*got {strength!r}"):
        make_scheduler("euler", scheduler_config_from_dict(SD15)).set_timesteps(10, strength)  # type: ignore[arg-type]


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.0), (10, 0.09), (6, 0.1)])
def test_strength_that_leaves_no_step(steps: int, strength: float) -> None:
    with pytest.raises(ValueError, match=f"strength {strength} of {steps} steps leaves no step to run"):
        make_scheduler("ddim", scheduler_config_from_dict(SD15)).set_timesteps(steps, strength)


@pytest.mark.parametrize("name", list(DIFFUSERS_EQUIVALENT))
def test_steps_before_start_refused(name: str) -> None:
    """A multistep method started early would read history this run never had; every scheduler says so alike."""
    mine = ours(name, SD15, 10, 0.6)
    x = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(IndexError, match=r"step index 3 is outside 4\.\.\d+"):
        mine.step(x, 3, x, noise=x)
    with pytest.raises(IndexError, match=r"step index 3 is outside 4\.\."):
        mine.scale_model_input(x, 3)


@pytest.mark.parametrize("name", list(DIFFUSERS_EQUIVALENT))
def test_add_noise_checks_its_arguments(name: str) -> None:
    mine = ours(name, SD15, 10, 1.0)
    x0, noise = latents_and_noise()
    with pytest.raises(IndexError, match=rf"step index {len(mine.timesteps) + 1} is outside 0\.\.{len(mine.timesteps)}"):
        mine.add_noise(x0, noise, len(mine.timesteps) + 1)
    with pytest.raises(ValueError, match=r"latents \(2, 4, 8, 8\) and the noise \(1, 4, 8, 8\) differ"):
        mine.add_noise(x0, noise[:1], 0)
    fresh = make_scheduler(name, scheduler_config_from_dict(SD15))
    with pytest.raises(IndexError, match="call set_timesteps"):
        fresh.add_noise(x0, noise, 0)
