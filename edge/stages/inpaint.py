"""Inpainting and outpainting: what the denoiser needs to repaint only under a mask (white = repaint).

Two kinds of UNet, told apart by the bundle's UNet input channels (the manifest's `unet` input shape):
- any 4-channel UNet: latent blending, as diffusers does for it: after each step the latents outside the mask
  are replaced by the original image's latents noised to the next step's level (`blend`);
- a 9-channel inpainting UNet (the SD-1.5-inpainting architecture): the binarized mask at latent size and the
  latents of the image with the repaint area zeroed are concatenated to its input (`extra`).
After decoding, the pixels outside the mask are pasted back from the input (edge.images.paste_back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edge.graphs import Graphs
from edge.images import binarize, mask_latents, masked_image
from edge.stages.start import encode_image

INPAINT_CHANNELS = 9  # latents 4 + mask 1 + masked-image latents 4


@dataclass(frozen=True)
class Repaint:
    """The mask-side inputs of one inpainting run."""

    mask: np.ndarray  # (1, 1, H, W) soft mask in [0, 1]: what paste_back blends with
    latent_mask: np.ndarray  # (1, 1, h, w) binarized at latent size: 1 = repaint
    extra: np.ndarray | None  # (1, 5, h, w) for a 9-channel UNet: latent mask + masked-image latents


def unet_channels(graphs: Graphs) -> int:
    """The UNet's input channels as exported: 4, or 9 for an inpainting UNet."""
    return int(graphs.manifest.components["unet"].inputs[0].shape[1])


def prepare(graphs: Graphs, pixels: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Repaint:
    """`pixels` (1, 3, H, W) in [-1, 1] and its soft `mask` (1, 1, H, W) -> the mask-side inputs. For a
    9-channel UNet the masked image is encoded here (a draw from `rng`, after the start noise, as diffusers)."""
    hard = binarize(mask)  # (1, 1, H, W) 0/1, as diffusers' mask processor
    latent_mask = mask_latents(hard, graphs.manifest.vae_scale_factor)  # (1, 1, h, w)
    extra = None
    if unet_channels(graphs) == INPAINT_CHANNELS:
        conditioning = encode_image(graphs, masked_image(pixels, hard), rng)  # (1, 4, h, w)
        extra = np.concatenate([latent_mask, conditioning], axis=1)  # (1, 5, h, w)
    return Repaint(mask=mask, latent_mask=latent_mask, extra=extra)


def blend(sched, x0: np.ndarray, noise: np.ndarray, latent_mask: np.ndarray) -> Callable[[int, np.ndarray], np.ndarray]:
    """For a 4-channel UNet: after step i, keep the latents under the mask and put back the original's outside
    it, noised to step i + 1's level (the original itself after the last step)."""
    x0 = np.repeat(x0, noise.shape[0] // x0.shape[0], axis=0)  # (N, C, h, w)

    def apply(i: int, x: np.ndarray) -> np.ndarray:
        known = sched.add_noise(x0, noise, i + 1)  # (N, C, h, w)
        return (latent_mask * x + (1.0 - latent_mask) * known).astype(np.float32)

    return apply
