"""Training batches: rendered scenes as image tensors, captions as CLIP token ids, and a pool of
precomputed VAE latents for the UNet stage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTokenizer

from edge.converters.default_model.config import MAX_TOKENS
from edge.eval.scenes import PALETTE, POSITIONS, Scene, caption, render, sample_scene


def sample_scenes(rng: np.random.Generator, n: int, two_object_prob: float) -> list[Scene]:
    """Training-split scenes only: held-out combinations never reach any stage."""
    return [sample_scene(rng, split="train", two_object_prob=two_object_prob) for _ in range(n)]


def images(scenes: list[Scene], size: int) -> torch.Tensor:
    """Rendered scenes as a (B, 3, size, size) float tensor in [-1, 1], as SD's VAE expects."""
    pixels = np.stack([render(s, size) for s in scenes])  # (B, H, W, 3) uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """(B, 77) ids, padded to the full context as the SD pipeline pads prompts."""
    return tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def latent_moments(vae: AutoencoderKL, scenes: list[Scene], size: int,
                   batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each scene's latent, each (N, C, h, w)."""
    means, stds = [], []
    for i in range(0, len(scenes), batch):
        dist = vae.encode(images(scenes[i:i + batch], size)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def object_masks(scenes: list[Scene], size: int, factor: int = 8) -> torch.Tensor:
    """(N, 1, size/factor, size/factor): the share of each latent pixel that objects cover (not background)."""
    masks = []
    for s in scenes:
        covered = np.abs(render(s, size).astype(np.int16) - np.array(PALETTE[s.background])).max(-1) > 8  # (H, W)
        n = size // factor
        masks.append(covered.reshape(n, factor, n, factor).mean(axis=(1, 3)))
    return torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]


def position_labels(scenes: list[Scene]) -> torch.Tensor:
    """(N,) index of a single object's position in POSITIONS; -1 for two-object scenes."""
    names = list(POSITIONS)
    return torch.tensor([names.index(s.objects[0].position) if len(s.objects) == 1 else -1 for s in scenes])


@dataclass(frozen=True)
class LatentPool:
    """Scenes with their latent posteriors, encoded once so the UNet stage never runs the encoder."""

    scenes: list[Scene]
    mean: torch.Tensor  # (N, C, h, w) unscaled
    std: torch.Tensor  # (N, C, h, w)
    scaling_factor: float  # SD's: latents * scaling_factor have unit variance
    objects: torch.Tensor  # (N, 1, h, w) object coverage of each latent pixel
    positions: torch.Tensor  # (N,) position index of single-object scenes, -1 otherwise

    def batch(self, rng: np.random.Generator, size: int, generator: torch.Generator,
              caption_dropout: float) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
        """(B, C, h, w) scaled latents sampled from their posteriors, their captions ('' for a
        `caption_dropout` share of them), object coverage (B, 1, h, w) and position labels (B,), -1 where
        the caption is empty or names two objects."""
        idx = rng.integers(len(self.scenes), size=size)
        noise = torch.randn(self.mean[idx].shape, generator=generator)  # (B, C, h, w)
        latents = (self.mean[idx] + self.std[idx] * noise) * self.scaling_factor
        captions = ["" if rng.random() < caption_dropout else caption(self.scenes[i], rng) for i in idx]
        labels = self.positions[idx].clone()
        labels[torch.tensor([c == "" for c in captions])] = -1
        return latents, captions, self.objects[idx], labels


def build_pool(vae: AutoencoderKL, scenes: list[Scene], size: int) -> LatentPool:
    mean, std = latent_moments(vae, scenes, size)
    spread = float(torch.sqrt(mean.var() + (std**2).mean()))  # std of posterior samples
    return LatentPool(scenes, mean, std, scaling_factor=1.0 / spread, objects=object_masks(scenes, size),
                      positions=position_labels(scenes))
