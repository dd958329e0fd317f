"""Fit the linear latent -> RGB projection that edge.stages.preview draws previews with, per model.

Pictures whose colours are known (random flat shapes on flat backgrounds) are encoded by the model's own VAE
encoder; each latent pixel's channels are regressed on the mean colour of the 8x8 block it stands for (least
squares, with a bias). Real images' latents, so the map suits what denoising converges to, for any model.
The fit's PSNR on held-out pictures is recorded: how far a preview can be trusted (the default model's
tiny VAE: ~12 dB, a rough colour sketch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from edge.metrics import psnr

BATCH = 2  # pictures per VAE call


def picture(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(3, H, W) in [-1, 1]: a flat background with 1-3 flat discs or boxes."""
    h, w = size
    image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(min(h, w) // 8, min(h, w) // 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return (np.asarray(image, np.float32) / 127.5 - 1).transpose(2, 0, 1)


def _pairs(vae, pictures: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) latent pixels and (N, 3) block colours of (S, 3, H, W) pictures."""
    with torch.no_grad():  # a few pictures at a time: 32 at SD 1.5's 512x512 would hold ~18 GB of activations
        z = np.concatenate([vae.encode(torch.from_numpy(pictures[k:k + BATCH])).latent_dist.mean.numpy()
                            for k in range(0, len(pictures), BATCH)]) * vae.config.scaling_factor
    s, _, h, w = z.shape  # (S, C, h, w)
    blocks = pictures.reshape(s, 3, h, f, w, f).mean(axis=(3, 5))  # (S, 3, h, w)
    return z.transpose(0, 2, 3, 1).reshape(-1, z.shape[1]), blocks.transpose(0, 2, 3, 1).reshape(-1, 3)


def fit_preview(vae, image_size: tuple[int, int], f: int, pictures: int = 32, seed: int = 0) -> dict[str, Any]:
    """The manifest's `preview` entry: {"weights": (3, C), "bias": (3,), "psnr_db" (held-out), ...}."""
    rng = np.random.default_rng(seed)
    drawn = np.stack([picture(image_size, rng) for _ in range(pictures + pictures // 4)])  # (S, 3, H, W)
    X, Y = _pairs(vae, drawn[:pictures], f)
    A = np.concatenate([X, np.ones((len(X), 1))], axis=1)  # (N, C + 1)
    coef, *_ = np.linalg.lstsq(A.astype(np.float64), Y.astype(np.float64), rcond=None)  # (C + 1, 3)
    Xh, Yh = _pairs(vae, drawn[pictures:], f)
    held_out = psnr(Yh, np.concatenate([Xh, np.ones((len(Xh), 1))], axis=1) @ coef, peak=2.0)
    return {"weights": coef[:-1].T.round(6).tolist(), "bias": coef[-1].round(6).tolist(),
            "psnr_db": round(float(held_out), 2), "pictures": pictures,
            "fitted_on": "flat shapes encoded by the model's VAE encoder, 8x8 block mean colours"}
