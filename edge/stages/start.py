"""The start latents: seeded noise for text-to-image (or the caller's own latents, to compare runs exactly);
for img2img, an image encoded by the VAE encoder and noised to the strength's first step.

The seed's generator draws, in this order: the encoder's sample (img2img), the start noise, then whatever the
scheduler's steps need (euler_a). A caller passing `latents` replaces only the start noise."""

from __future__ import annotations

import numpy as np

from edge.bundle import Manifest
from edge.graphs import Graphs


def noise_latents(manifest: Manifest, latents: np.ndarray | None, n: int, height: int, width: int,
                  rng: np.random.Generator) -> np.ndarray:
    """(N, C, h, w) unit noise for an N-image batch, or `latents` checked against the size; the scheduler's
    init_noise_sigma is applied by the caller."""
    f, c = manifest.vae_scale_factor, manifest.latent_channels
    if latents is None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_images must be a whole number >= 1, got {n!r}")
        return rng.standard_normal((n, c, height // f, width // f), dtype=np.float32)
    latents = np.asarray(latents, dtype=np.float32)
    expected = (c, height // f, width // f)
    if latents.ndim != 4 or latents.shape[1:] != expected:
        raise ValueError(f"latents must have shape (N, {c}, {height // f}, {width // f}) for a "
                         f"{height}x{width} image, got {latents.shape}")
    return latents


def encode_image(graphs: Graphs, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (1, C, h, w) latents as the UNet works in: a sample of the VAE encoder's
    distribution (mean + std x unit noise drawn from `rng`, as diffusers samples it), times the scaling factor."""
    session = graphs.open("vae_encoder")[0]
    mean, std = graphs.run("vae_encoder", session, {"sample": image.astype(np.float32)})  # (1, C, h, w) each
    eps = rng.standard_normal(mean.shape, dtype=np.float32)
    return ((mean + std * eps) * np.float32(graphs.manifest.vae_scaling_factor)).astype(np.float32)


def image_latents(x0: np.ndarray, noise: np.ndarray, sched) -> np.ndarray:
    """img2img: the encoded image noised to the level of the scheduler's first step (set_timesteps(n, strength)
    put it at `sched.start`); no init_noise_sigma here, add_noise gives the level itself, as in diffusers."""
    return sched.add_noise(np.repeat(x0, noise.shape[0] // x0.shape[0], axis=0), noise, sched.start)
