"""The edge runtime on a converted bundle draws what diffusers draws from the same model and latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge import Pipeline
from edge.metrics import psnr
from edge.schedulers import DIFFUSERS_EQUIVALENT

PROMPT, NEGATIVE, STEPS = "a red circle on a blue background", "blurry", 8


def _diffusers_scheduler(name: str, config):
    import diffusers

    cls, overrides = DIFFUSERS_EQUIVALENT[name]
    return getattr(diffusers, cls).from_config(config, **overrides)


@pytest.fixture(scope="module")
def references(models):
    """diffusers' own pipelines, loaded by diffusers from the same files edge convert read."""
    from diffusers import StableDiffusionPipeline

    pipes = {}
    for pred in ("epsilon", "v_prediction"):
        pipes[f"folder-{pred}"] = StableDiffusionPipeline.from_pretrained(
            models[f"folder-{pred}"], safety_checker=None, requires_safety_checker=False, local_files_only=True)
        pipes[f"single-{pred}"] = StableDiffusionPipeline.from_single_file(
            str(models[f"single-{pred}"]), config=str(models[f"config-{pred}"]), local_files_only=True,
            safety_checker=None, requires_safety_checker=False)
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


def _run_diffusers(pipe, scheduler: str, latents: np.ndarray, guidance: float, h: int, w: int):
    pipe.scheduler = _diffusers_scheduler(scheduler, pipe.scheduler.config)
    trajectory = []

    def keep(_pipe, i, t, kwargs):
        trajectory.append(kwargs["latents"].numpy().copy())
        return kwargs

    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance,
                   height=h, width=w, latents=torch.from_numpy(latents), output_type="np",
                   callback_on_step_end=keep)
    image = (out.images[0] * 255).round().astype(np.uint8)  # (H, W, 3), as diffusers' numpy_to_pil
    return image, trajectory


@pytest.mark.parametrize("size", [(64, 64), (64, 96)], ids=["square", "wide"])
@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("source", ["folder", "single"])
def test_matches_diffusers(bundles, references, source, pred, scheduler, size):
    h, w = size
    key = f"{source}-{pred}"
    latents = np.random.default_rng(7).standard_normal((1, 4, h // 8, w // 8), dtype=np.float32)
    ref_image, ref_traj = _run_diffusers(references[key], scheduler, latents, 7.5, h, w)

    trajectory = []
    result = Pipeline.load(bundles[key]).generate(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance=7.5, scheduler=scheduler, height=h, width=w,
        latents=latents, callback=lambda i, n, x: trajectory.append(x.copy()))
    image = np.asarray(result.images[0])

    assert image.shape == (h, w, 3) and ref_image.std() > 1.0  # a real picture, not a constant
    assert len(trajectory) == len(ref_traj)
    for step, (ours, theirs) in enumerate(zip(trajectory, ref_traj)):
        assert psnr(theirs, ours) >= 40, f"latents drift from diffusers at step {step}"
    assert psnr(ref_image.astype(np.float64), image.astype(np.float64), peak=255.0) >= 40


def test_guidance_one_skips_unconditional_pass(bundles, references):
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    ref_image, _ = _run_diffusers(references["folder-epsilon"], "ddim", latents, 1.0, 64, 64)
    pipe = Pipeline.load(bundles["folder-epsilon"])
    context = pipe.encode_text(PROMPT, NEGATIVE, guided=False, copies=1)
    assert context.shape[0] == 1
    result = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance=1.0, scheduler="ddim",
                           latents=latents)
    assert psnr(ref_image.astype(np.float64), np.asarray(result.images[0], np.float64), peak=255.0) >= 40
