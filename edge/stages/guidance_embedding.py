"""Guidance as a UNet input: LCM-distilled UNets (diffusers' `time_cond_proj_dim`) take the guidance scale as a
sinusoidal embedding added to the timestep's, and run once per step, with no unconditional pass.

The embedding is diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding of w = guidance - 1
(scaled by 1000), computed here in numpy and fed as the graph's `timestep_cond` input.
"""

from __future__ import annotations

import numpy as np

from edge.bundle import Manifest

INPUT = "timestep_cond"


def embedding_width(manifest: Manifest) -> int | None:
    """The width of the UNet's guidance embedding, or None for a UNet that is guided the usual way."""
    spec = next((t for t in manifest.components["unet"].inputs if t.name == INPUT), None)
    return None if spec is None else int(spec.shape[-1])


def guided_by_cfg(manifest: Manifest, guidance: float) -> bool:
    """Whether a generation at `guidance` runs the unconditional pass (classifier-free guidance)."""
    return guidance > 1 and embedding_width(manifest) is None


def guidance_embedding(guidance: float, width: int, batch: int) -> np.ndarray:
    """(batch, width) float32: sin and cos of 1000 (guidance - 1) at `width / 2` geometric frequencies."""
    half = width // 2
    step = np.log(np.float32(10000.0)) / np.float32(half - 1)  # float32 throughout, as diffusers: the angles reach
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)  # thousands of radians, where float64 would differ
    angles = np.float32(guidance - 1.0) * np.float32(1000.0) * freqs  # (half,)
    row = np.concatenate([np.sin(angles), np.cos(angles)] + ([np.zeros(1, np.float32)] if width % 2 else []))
    return np.repeat(row[None].astype(np.float32), batch, axis=0)
