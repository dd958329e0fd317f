"""SD 2.x through the same converter and runtime: a tiny model with 768-v's structure (v-prediction, DDIM, gelu
text encoder, linear-projection transformers with per-block heads, fp32 attention, a larger native size) converts,
says what it is, and draws what diffusers draws from the same latents with every deterministic sampler."""

from __future__ import annotations

import numpy as np
import pytest

from edge import Pipeline
from edge.metrics import psnr
from test_parity_diffusers import NEGATIVE, PROMPT, STEPS, _run_diffusers


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """(bundle, diffusers' pipeline loaded from the folder the bundle was converted from)."""
    from diffusers import StableDiffusionPipeline

    from edge.converters.convert import Options, convert
    from edge.converters.tiny import tiny_sd2_pipeline

    root = tmp_path_factory.mktemp("sd2")
    tiny_sd2_pipeline(seed=2).save_pretrained(root / "model", safe_serialization=True)
    convert(str(root / "model"), root / "bundle", options=Options(profile_memory=False, tiled_vae=False),
            log=lambda s: None)
    pipe = StableDiffusionPipeline.from_pretrained(root / "model", safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return root / "bundle", pipe


def test_the_bundle_says_it_is_sd2(sd2):
    from edge.bundle import read_manifest

    m = read_manifest(sd2[0])
    assert m.family == "sd2" and m.prediction_type == "v_prediction"
    assert m.default_size == (96, 96) and m.source["scheduler_class"] == "DDIMScheduler"
    assert sd2[1].unet.config.upcast_attention and sd2[1].unet.config.use_linear_projection


@pytest.mark.parametrize("size", [(96, 96), (64, 96)], ids=["native", "wide"])
@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "dpmpp_2m", "dpmpp_2m_karras"])
def test_sd2_matches_diffusers(sd2, scheduler, size):
    bundle, reference = sd2
    h, w = size
    latents = np.random.default_rng(11).standard_normal((1, 4, h // 8, w // 8), dtype=np.float32)
    source_scheduler = reference.scheduler
    try:
        ref_image, ref_traj = _run_diffusers(reference, scheduler, latents, 7.5, h, w)
    finally:
        reference.scheduler = source_scheduler
    trajectory = []
    result = Pipeline.load(bundle).generate(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance=7.5, scheduler=scheduler, height=h, width=w,
        latents=latents, callback=lambda i, n, x: trajectory.append(x.copy()))
    image = np.asarray(result.images[0])
    assert image.shape == (h, w, 3) and ref_image.std() > 1.0
    for step, (ours, theirs) in enumerate(zip(trajectory, ref_traj)):
        assert psnr(theirs, ours) >= 40, f"latents drift from diffusers at step {step}"
    assert psnr(ref_image.astype(np.float64), image.astype(np.float64), peak=255.0) >= 40


def test_sd2_default_size_is_the_native_one(sd2):
    result = Pipeline.load(sd2[0]).generate(PROMPT, steps=2, seed=0)
    assert result.images[0].size == (96, 96)
