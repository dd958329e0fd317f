"""The tiny autoencoder (diffusers' AutoencoderTiny, TAESD's architecture) as a bundle component: previews that
look like the picture, and a fast final decoder. No TAESD weights can be downloaded: a small one is built from a
config with random weights, which is enough to check the graph against torch and the pipeline against diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_edge
from edge import Pipeline
from edge.metrics import psnr

PROMPT, NEGATIVE, STEPS = "a red circle on a blue background", "blurry", 6


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("taesd") / "taesd"
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bundle(models, tiny_vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-vae-bundle") / "bundle"
    run_edge("convert", models["folder-epsilon"], "--tiny-vae", tiny_vae, "-o", out)
    return out


def test_manifest_records_the_tiny_decoder(bundle):
    record = json.loads((bundle / "manifest.json").read_text())["components"]["tiny_vae_decoder"]
    assert record["parity"]["psnr_db"] >= 40  # against torch's AutoencoderTiny.decode
    assert record["memory"]["graphs"], "measured for the planner"
    fidelity = record["fidelity"]
    assert np.isfinite(fidelity["psnr_vs_full_decoder_db"]) and fidelity["pictures"] > 0
    assert record["source"]["decoder_block_out_channels"] == [8, 8, 8, 8]


def test_tiny_decoder_matches_diffusers_with_autoencodertiny(models, tiny_vae, bundle):
    """diffusers' StableDiffusionPipeline with the AutoencoderTiny as its VAE, on the same latents."""
    from diffusers import AutoencoderTiny, EulerDiscreteScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(models["folder-epsilon"], safety_checker=None,
                                                  requires_safety_checker=False, local_files_only=True)
    ref.vae = AutoencoderTiny.from_pretrained(tiny_vae)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    with torch.no_grad():
        expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=64,
                       width=64, latents=torch.from_numpy(latents), output_type="np").images[0]
    expected = (expected * 255).round().astype(np.uint8)
    result = Pipeline.load(bundle).generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance=7.5,
                                            scheduler="euler", latents=latents, decoder="tiny")
    assert result.params["decoder"] == "tiny"
    assert psnr(expected, np.asarray(result.images[0]), peak=255.0) >= 40


def test_previews_show_the_estimate_of_the_clean_image(bundle):
    """Each preview decodes the step's estimate of the clean latents with the tiny decoder; at the last step of
    Euler (sigma 0) that estimate is the final latents, so the last preview is the tiny-decoded image itself."""
    pipe = Pipeline.load(bundle)
    previews = []
    result = pipe.generate(PROMPT, steps=STEPS, scheduler="euler", seed=1, decoder="tiny",
                           callback=lambda i, n, x: previews.append((pipe.preview(), pipe.denoised.copy())))
    assert len(previews) == STEPS
    np.testing.assert_array_equal(np.asarray(previews[-1][0]), np.asarray(result.images[0]))
    np.testing.assert_allclose(previews[-1][1], result.latents, atol=1e-5)
    linear = pipe.preview(decoder="linear")  # the bundle's latent-to-RGB map still answers when asked
    assert linear.size == result.images[0].size


def test_cli_tiny_decoder_and_tiny_previews(bundle, tmp_path):
    out, previews = tmp_path / "out.png", tmp_path / "previews"
    run_edge("generate", bundle, PROMPT, "--steps", "4", "--decoder", "tiny", "--preview-every", "2",
             "--preview-decoder", "tiny", "--preview-dir", previews, "-o", out)
    assert sorted(p.name for p in previews.iterdir()) == ["step-002.png", "step-004.png"]
    assert Image.open(previews / "step-004.png").size == Image.open(out).size == (64, 64)


def test_memory_plan_with_the_tiny_decoder(bundle):
    pipe = Pipeline.load(bundle, memory_budget="8GB", preload=False)
    plan = pipe.plan_for(64, 64, decoder="tiny")
    assert plan.decoder == "tiny" and "tiny decoder" in plan.stages[-1].detail
    assert plan.tiny_previews  # an 8 GB budget leaves room for it beside the UNet
    result = pipe.generate(PROMPT, steps=2, decoder="tiny")
    assert "tiny_vae_decoder" in pipe.sessions and "vae_decoder" not in pipe.sessions  # the full one never loads
    assert result.images[0].size == (64, 64)


def test_bad_tiny_vae_and_decoder_arguments(bundles, models, tmp_path):
    proc = run_edge("convert", models["folder-epsilon"], "--tiny-vae", models["folder-epsilon"] / "vae", "-o",
                    tmp_path / "b", check=False)
    assert proc.returncode == 2 and "AutoencoderKL, not an AutoencoderTiny" in proc.stderr
    assert not (tmp_path / "b").exists()
    proc = run_edge("convert", models["folder-epsilon"], "--tiny-vae", tmp_path / "nowhere", "-o", tmp_path / "b",
                    check=False)
    assert proc.returncode == 2 and "config.json" in proc.stderr
    proc = run_edge("generate", bundles["folder-epsilon"], PROMPT, "--decoder", "tiny", "-o", tmp_path / "x.png",
                    check=False)
    assert proc.returncode == 2 and "no tiny autoencoder" in proc.stderr and not (tmp_path / "x.png").exists()
    pipe = Pipeline.load(bundles["folder-epsilon"], preload=False)
    with pytest.raises(ValueError, match="decoder must be 'full' or 'tiny'"):
        pipe.generate(PROMPT, steps=1, decoder="fast")
    with pytest.raises(ValueError, match="no denoising step has run yet"):
        pipe.preview()


def test_mismatched_tiny_vae_is_refused(models, tmp_path):
    from diffusers import AutoencoderTiny

    from edge.converters.tiny_vae import TinyVaeError, check_fits, load_tiny_vae

    folder = tmp_path / "taesd16"
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                    latent_channels=16).save_pretrained(folder)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(models["folder-epsilon"] / "vae")
    with pytest.raises(TinyVaeError, match="16-channel latents"):
        check_fits(load_tiny_vae(folder), vae)


def test_staged_plan_decodes_with_the_tiny_decoder_alone(bundle):
    """Under a budget the resident plan misses, the tiny decoder is its own stage (never tiled), and previews
    with it are planned beside the UNet only where they fit."""
    from edge.plan import make_plan

    m = Pipeline.load(bundle, preload=False).manifest
    resident = make_plan(m, None, 64, 64, decoder="tiny")
    staged = make_plan(m, int(resident.peak / 0.9 * 0.97), 64, 64, decoder="tiny")
    assert not staged.resident and staged.vae_tile is None and staged.decoder == "tiny"
    assert staged.stages[-1].detail.startswith("the tiny decoder")
    full = make_plan(m, int(resident.peak / 0.9 * 0.97), 64, 64)
    unet = next(s for s in staged.stages if s.name == "unet")
    assert staged.tiny_previews == unet.detail.endswith("the tiny decoder for previews")
    assert full.decoder == "full" and not full.stages[-1].detail.startswith("the tiny decoder")
