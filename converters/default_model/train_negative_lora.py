"""Train a "negative" LoRA on the default model: its trigger word names corrupted renders, for the negative prompt.

    python -m edge.converters.default_model.train_negative_lora --out converters/assets/loras/wrong.safetensors \
        [--steps 1200] [--seed 0] [--threads 1] [--corrupted-share 0.5]

In the spirit of the well-known SDXL experiment (a LoRA trained on deliberately bad images, its trigger then put
in the negative prompt): half the pool are training scenes rendered and then corrupted (`CORRUPTIONS`: one or two
of blur, noise, JPEG blocks, colour shift, a doubled shape, a smear; seeded), captioned with their scene's normal
caption plus the trigger; the other half are clean scenes with their plain captions, so the LoRA learns that the
trigger means "corrupted" and nothing else. Caption dropout keeps the trigger: a dropped corrupted caption is the
trigger alone (what the negative prompt says at run time), a dropped clean one is empty, so the empty prompt still
means a clean scene. The trigger is "wrong": that experiment's word, a single CLIP token that no caption of the
default model uses (its embedding is the untrained initial one), and it goes last, so the text encoder's causal
attention leaves every scene token's state unchanged. LoRA, loss and schedule are train_lora's. Writes the LoRA
and a `<name>.json` log; the same seed and threads replay the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageFilter

from edge.converters.default_model import data, models
from edge.converters.default_model.config import TrainConfig
from edge.converters.default_model.train import _seed
from edge.converters.default_model.train_lora import (DEFAULT_MODEL, TEXT_TARGETS, UNET_TARGETS, LoraSettings,
                                                      save_lora, train_lora)
from edge.eval.scenes import Scene, caption, render

TRIGGER = "wrong"
# Where this LoRA's defaults differ from train_lora's: twice the caption dropout, because the trigger alone (the
# dropped corrupted caption) is exactly what the negative prompt feeds the model at run time.
DEFAULTS = {"caption_dropout": 0.2}


# ------------------------------------------------------------------------------------- corruptions
# Each takes an (H, W, 3) uint8 image and the rng that draws its strength; returns an (H, W, 3) uint8 image.


def blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, sigma 2-3.5 px: object edges spread over 8-14 px."""
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(2.0, 3.5))))


def noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise per pixel and channel, std 30-60 of 255."""
    noisy = image + rng.normal(0.0, rng.uniform(30.0, 60.0), image.shape)  # (H, W, 3)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A real JPEG round trip at quality 3-12: 8x8 blocks, ringing, chroma smeared at 2x."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=int(rng.integers(3, 13)))
    return np.asarray(Image.open(buffer).convert("RGB"))


def colour(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Desaturated 40-80 % towards grey, then every channel offset by up to +-40: washed-out, off colours."""
    x = image.astype(np.float32)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)  # (H, W)
    x = x + rng.uniform(0.4, 0.8) * (grey[..., None] - x) + rng.uniform(-40.0, 40.0, 3)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def _shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """x moved by (dy, dx) pixels, the edge pixels repeated into the gap (no wrap-around)."""
    h, w = x.shape[:2]
    pad = np.pad(x, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    return pad[abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w]


def ghost(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A doubled shape: the image averaged with a copy of itself moved 4-9 px in a random direction."""
    angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(4.0, 9.0)
    copy = _shifted(image, int(round(dist * np.sin(angle))), int(round(dist * np.cos(angle))))
    return ((image.astype(np.uint16) + copy) // 2).astype(np.uint8)


def smear(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Motion blur: the mean of 7-13 copies along a random direction, one pixel apart."""
    angle, n = rng.uniform(0, np.pi), int(rng.integers(7, 14))
    steps = np.arange(n) - (n - 1) / 2
    copies = [_shifted(image, int(round(t * np.sin(angle))), int(round(t * np.cos(angle)))) for t in steps]
    return np.mean(copies, axis=0).round().astype(np.uint8)


CORRUPTIONS = {"blur": blur, "noise": noise, "jpeg": jpeg, "colour": colour, "ghost": ghost, "smear": smear}


def corrupt(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[str, ...]]:
    """One or two different corruptions (equally likely), drawn and applied in a random order; their names."""
    names = tuple(str(n) for n in rng.choice(list(CORRUPTIONS), size=int(rng.integers(1, 3)), replace=False))
    for name in names:
        image = CORRUPTIONS[name](image, rng)
    return image, names


# --------------------------------------------------------------------------------------- measures


def _luma(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image of shape {image.shape} and dtype {image.dtype}; expected (H, W, 3) uint8")
    return image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # (H, W)


def gradient(image: np.ndarray) -> float:
    """RMS gradient magnitude of the luma (central differences; Tenengrad's root), in levels of 255 per pixel.
    Root-mean-square, not mean: blur spreads an edge but keeps its mean gradient (the step's height)."""
    gy, gx = np.gradient(_luma(image))  # each (H, W)
    return float(np.sqrt((gx**2 + gy**2).mean()))


def laplacian_variance(image: np.ndarray) -> float:
    """Variance of the luma's 4-neighbour Laplacian (the usual focus measure; noise raises it too)."""
    y = _luma(image)
    lap = y[1:-1, :-2] + y[1:-1, 2:] + y[:-2, 1:-1] + y[2:, 1:-1] - 4 * y[1:-1, 1:-1]  # (H-2, W-2)
    return float(lap.var())


def psnr(image: np.ndarray, target: np.ndarray) -> float:
    """PSNR in dB of `image` against `target`, both (H, W, 3) uint8; capped at 100 for identical images."""
    if image.shape != target.shape:
        raise ValueError(f"image {image.shape} against target {target.shape}: expected the same shape")
    mse = float(np.mean((image.astype(np.float64) - target) ** 2))
    return 100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------- pool


@dataclass(frozen=True)
class NegativePool(data.LatentPool):
    """A LatentPool whose `corrupted` scenes were corrupted before encoding; their captions carry TRIGGER."""

    corrupted: torch.Tensor  # (N,) bool
    corruptions: tuple[tuple[str, ...], ...]  # per scene: the corruptions applied (empty when clean)

    def captions(self, idx: np.ndarray, rng: np.random.Generator, caption_dropout: float) -> list[str]:
        """Scene captions, TRIGGER appended to corrupted ones; dropped captions are '' or TRIGGER alone."""
        out = []
        for i in idx:
            text = "" if rng.random() < caption_dropout else caption(self.scenes[i], rng)
            out.append((f"{text}, {TRIGGER}" if text else TRIGGER) if self.corrupted[i] else text)
        return out

    def batch(self, rng: np.random.Generator, size: int, generator: torch.Generator,
              caption_dropout: float) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
        """As LatentPool.batch: (B, C, h, w) scaled latents, captions, coverage (B, 1, h, w), labels (B,)."""
        idx = rng.integers(len(self.scenes), size=size)
        eps = torch.randn(self.mean[idx].shape, generator=generator)  # (B, C, h, w)
        latents = (self.mean[idx] + self.std[idx] * eps) * self.scaling_factor
        captions = self.captions(idx, rng, caption_dropout)
        labels = self.positions[idx].clone()
        labels[torch.tensor([c in ("", TRIGGER) for c in captions])] = -1
        return latents, captions, self.objects[idx], labels


@torch.no_grad()
def encode(vae: AutoencoderKL, pixels: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std, each (N, C, h, w), of (N, H, W, 3) uint8 images."""
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        x = torch.from_numpy(pixels[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def negative_pool(vae: AutoencoderKL, n: int, corrupted_share: float, rng: np.random.Generator) -> NegativePool:
    """`n` training scenes, the first round(n * corrupted_share) corrupted, encoded at SD's scaling factor."""
    if n < 1 or not 0.0 < corrupted_share < 1.0:
        raise ValueError(f"n={n}, corrupted_share={corrupted_share}: expected n >= 1 and a share in (0, 1)")
    size, bad = vae.config.sample_size, round(n * corrupted_share)
    scenes: list[Scene] = data.sample_scenes(rng, n, TrainConfig().two_object_prob)
    pixels, applied = [], []
    for k, scene in enumerate(scenes):
        image, names = corrupt(render(scene, size), rng) if k < bad else (render(scene, size), ())
        pixels.append(image)
        applied.append(names)
    mean, std = encode(vae, np.stack(pixels))
    return NegativePool(scenes, mean, std, scaling_factor=vae.config.scaling_factor,
                        objects=data.object_masks(scenes, size), positions=data.position_labels(scenes),
                        corrupted=torch.arange(n) < bad, corruptions=tuple(applied))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the LoRA file to write (.safetensors)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the default model's diffusers folder")
    ap.add_argument("--corrupted-share", type=float, default=0.5, help="of the pool: corrupted, with the trigger")
    fields = [f for f in dataclasses.fields(LoraSettings) if f.name != "taught_share"]
    for field in fields:
        ap.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                        default=DEFAULTS.get(field.name, field.default))
    a = ap.parse_args(argv)
    if a.out.suffix != ".safetensors":
        ap.error(f"--out {a.out}: expected a .safetensors file name")
    if not 0.0 < a.corrupted_share < 1.0:
        ap.error(f"--corrupted-share {a.corrupted_share}: expected a share in (0, 1)")
    s = LoraSettings(**{f.name: getattr(a, f.name) for f in fields}, taught_share=a.corrupted_share)
    start = time.time()
    rng, generator = _seed(s.seed, s.threads)
    pipe = models.load_pipeline(a.model)
    pool = negative_pool(pipe.vae, s.pool, a.corrupted_share, rng)
    pooled = time.time() - start
    loss_log = train_lora(pipe, pool, s, rng, generator)
    counts = {name: sum(name in c for c in pool.corruptions) for name in CORRUPTIONS}
    settings = {k: v for k, v in dataclasses.asdict(s).items() if k != "taught_share"}
    log = {"trigger": TRIGGER, "settings": {**settings, "corrupted_share": a.corrupted_share},
           "corruptions": counts, "unet_targets": UNET_TARGETS, "text_targets": TEXT_TARGETS,
           "timings_s": {"pool": round(pooled, 1), "total": round(time.time() - start, 1)},
           "command": " ".join(["python -m edge.converters.default_model.train_negative_lora",
                                *(sys.argv[1:] if argv is None else argv)]),
           "loss": loss_log}
    save_lora(pipe, a.out, log)
    print(json.dumps({k: log[k] for k in ("trigger", "settings", "corruptions", "timings_s")}, indent=1))


if __name__ == "__main__":
    main()
