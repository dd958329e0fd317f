"""The edge runtime on a converted bundle draws what diffusers draws from the same model and latents."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edge import Pipeline
from edge.metrics import psnr
from edge.schedulers import DIFFUSERS_EQUIVALENT

PROMPT, NEGATIVE, STEPS = "a red circle on a blue background", "blurry", 8
# Stable Diffusion 1.5's scheduler/scheduler_config.json as published: it names no timestep_spacing and no
# prediction_type, so each diffusers sampler loaded from it uses its own defaults for those.
SD15_SCHEDULER_JSON = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}


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


def _run_diffusers(pipe, scheduler: str, latents: np.ndarray, guidance: float, h: int, w: int, steps: int = STEPS):
    pipe.scheduler = _diffusers_scheduler(scheduler, pipe.scheduler.config)
    trajectory = []

    def keep(_pipe, i, t, kwargs):
        trajectory.append(kwargs["latents"].numpy().copy())
        return kwargs

    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
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


@pytest.fixture(scope="module")
def sd15_style(models, tmp_path_factory):
    """The tiny epsilon model with SD 1.5's own scheduler json, its bundle, and diffusers' pipeline of it."""
    from diffusers import StableDiffusionPipeline

    from edge.converters.convert import Options, convert

    root = tmp_path_factory.mktemp("sd15-style")
    shutil.copytree(models["folder-epsilon"], root / "model")
    (root / "model" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_JSON))
    convert(str(root / "model"), root / "bundle", options=Options(profile_memory=False, tiled_vae=False),
            log=lambda s: None)
    pipe = StableDiffusionPipeline.from_pretrained(root / "model", safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return root / "bundle", pipe


def test_manifest_keeps_only_the_scheduler_keys_the_model_states(sd15_style):
    """diffusers filled timestep_spacing and prediction_type from PNDM's defaults; the bundle must not record
    them as the model's choice (nor diffusers' underscore metadata)."""
    from edge.bundle import read_manifest

    bundle, pipe = sd15_style
    assert {"timestep_spacing", "prediction_type"} <= set(pipe.scheduler.config["_use_default_values"])
    m = read_manifest(bundle)
    assert m.scheduler == {k: v for k, v in SD15_SCHEDULER_JSON.items() if not k.startswith("_")}
    assert m.source["scheduler_class"] == "PNDMScheduler" and m.prediction_type == "epsilon"


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "dpmpp_2m", "dpmpp_2m_karras"])
def test_unstated_scheduler_keys_match_diffusers(sd15_style, scheduler):
    """With the spacing unstated, Euler and DPM++ start at t = 999 in diffusers ("linspace"), DDIM and PNDM at
    t = 1 + 980 ("leading"); taking PNDM's default for all of them drifted to ~25 dB at 6 steps."""
    bundle, pipe = sd15_style
    source_scheduler = pipe.scheduler
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)
    try:
        ref_image, ref_traj = _run_diffusers(pipe, scheduler, latents, 7.5, 64, 64, steps=6)
    finally:
        pipe.scheduler = source_scheduler  # each case loads its sampler from the model's own config
    trajectory = []
    result = Pipeline.load(bundle).generate(PROMPT, negative_prompt=NEGATIVE, steps=6, guidance=7.5,
                                            scheduler=scheduler, latents=latents,
                                            callback=lambda i, n, x: trajectory.append(x.copy()))
    assert len(trajectory) == len(ref_traj)
    for step, (ours, theirs) in enumerate(zip(trajectory, ref_traj)):
        assert psnr(theirs, ours) >= 60, f"latents drift from diffusers at step {step}"
    assert psnr(ref_image.astype(np.float64), np.asarray(result.images[0], np.float64), peak=255.0) >= 60
