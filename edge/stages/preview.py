"""Previews while the image forms: latents -> a rough RGB picture with no decoder run (microseconds).

A linear map from each latent pixel's channels to RGB (3 x C weights and 3 biases), fitted per model at
convert time against its own VAE (converters/preview_fit.py) and stored in the manifest's `preview` entry
with its measured PSNR. Each latent pixel becomes one colour, scaled up to the image's size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from edge.bundle import Manifest


def preview(manifest: Manifest, latents: np.ndarray) -> Image.Image:
    """(1, C, h, w) latents as the UNet works in -> an RGB image of the final image's size."""
    if not manifest.preview:
        raise ValueError("this bundle has no preview projection (converted before previews existed): re-convert it")
    weights = np.asarray(manifest.preview["weights"], np.float32)  # (3, C)
    bias = np.asarray(manifest.preview["bias"], np.float32)  # (3,)
    rgb = np.einsum("kc,chw->khw", weights, latents[0].astype(np.float32)) + bias[:, None, None]  # (3, h, w)
    pixels = (np.clip(rgb / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)  # (h, w, 3)
    f = manifest.vae_scale_factor
    return Image.fromarray(pixels).resize((pixels.shape[1] * f, pixels.shape[0] * f), Image.BILINEAR)
