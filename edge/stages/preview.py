"""Previews while the image forms: latents -> a picture, far cheaper than the final decode.

Two ways, chosen by `decoder`:
- "linear": a linear map from each latent pixel's channels to RGB (3 x C weights and 3 biases), fitted per model
  at convert time against its own VAE (converters/preview_fit.py) and stored in the manifest's `preview` entry
  with its measured PSNR. Each latent pixel becomes one colour, scaled up to the image's size; no graph runs.
- "tiny": the tiny autoencoder's decoder (TAESD, converters/tiny_vae.py), where the bundle has one: a picture
  with edges and detail, in a few ms at SD's sizes.
"auto" takes the tiny decoder where the bundle has it and the memory plan leaves room for it beside the UNet.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from edge.bundle import Manifest
from edge.graphs import Graphs
from edge.plan import TINY, Plan
from edge.stages.decode import decode_tiny

DECODERS = ("auto", "linear", "tiny")


def preview(graphs: Graphs, plan: Plan | None, latents: np.ndarray, decoder: str = "auto") -> Image.Image:
    """(1, C, h, w) latents as the UNet works in -> an RGB picture of the final image's size."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown preview decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    has_tiny = TINY in graphs.manifest.components
    if decoder == "tiny" and not has_tiny:
        raise ValueError("this bundle has no tiny autoencoder for previews: re-convert it with --tiny-vae DIR, "
                         "or preview with the linear map")
    if decoder == "tiny" or (decoder == "auto" and has_tiny and (plan is None or plan.tiny_previews)):
        return decode_tiny(graphs, latents)
    return linear(graphs.manifest, latents)


def linear(manifest: Manifest, latents: np.ndarray) -> Image.Image:
    """(1, C, h, w) latents as the UNet works in -> an RGB image of the final image's size."""
    if not manifest.preview:
        raise ValueError("this bundle has no preview projection (converted before previews existed): re-convert it")
    weights = np.asarray(manifest.preview["weights"], np.float32)  # (3, C)
    bias = np.asarray(manifest.preview["bias"], np.float32)  # (3,)
    rgb = np.einsum("kc,chw->khw", weights, latents[0].astype(np.float32)) + bias[:, None, None]  # (3, h, w)
    pixels = (np.clip(rgb / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)  # (h, w, 3)
    f = manifest.vae_scale_factor
    return Image.fromarray(pixels).resize((pixels.shape[1] * f, pixels.shape[0] * f), Image.BILINEAR)
