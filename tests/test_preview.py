"""Previews while the image forms: the bundle's linear latent -> RGB projection, fitted at convert time."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from conftest import run_edge
from edge import Pipeline
from edge.converters.preview_fit import picture
from edge.metrics import psnr


def test_manifest_records_a_fitted_projection(bundles):
    m = Pipeline.load(bundles["folder-epsilon"], preload=False).manifest
    assert np.asarray(m.preview["weights"]).shape == (3, m.latent_channels) and len(m.preview["bias"]) == 3
    assert np.isfinite(m.preview["psnr_db"]) and m.preview["psnr_db"] > 5  # better than no colour at all


def test_preview_of_a_pictures_latents_shows_its_colours(models, bundles):
    """On pictures it was not fitted on, the preview of their latents is as close to their colours as the
    manifest says (the fit's held-out figure, within 3 dB)."""
    from diffusers import AutoencoderKL

    pipe = Pipeline.load(bundles["folder-epsilon"])
    h, w = pipe.manifest.default_size
    vae = AutoencoderKL.from_pretrained(models["folder-epsilon"] / "vae")
    pictures = np.stack([picture((h, w), np.random.default_rng(100 + k)) for k in range(4)])  # (4, 3, H, W)
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(pictures)).latent_dist.mean.numpy() * vae.config.scaling_factor
    got = np.stack([np.asarray(pipe.preview(z[k:k + 1]), np.float32) / 127.5 - 1 for k in range(4)])
    assert got.shape == (4, h, w, 3)
    f = pipe.manifest.vae_scale_factor
    blocks = pictures.reshape(4, 3, h // f, f, w // f, f).mean(axis=(3, 5))  # (4, 3, h, w)
    shown = got.reshape(4, h // f, f, w // f, f, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2)
    assert psnr(blocks, shown, peak=2.0) >= pipe.manifest.preview["psnr_db"] - 3.0


def test_cli_writes_previews_every_n_steps(bundles, tmp_path):
    out, previews = tmp_path / "out.png", tmp_path / "previews"
    run_edge("generate", bundles["folder-epsilon"], "a red circle", "--steps", "4", "--preview-every", "2",
             "--preview-dir", previews, "-o", out)
    written = sorted(p.name for p in previews.iterdir())
    assert written == ["step-002.png", "step-004.png"]
    assert all(Image.open(previews / n).size == Image.open(out).size for n in written)
    proc = run_edge("generate", bundles["folder-epsilon"], "x", "--preview-every", "0", "-o", tmp_path / "n.png",
                    check=False)
    assert proc.returncode == 2 and "--preview-every" in proc.stderr
