"""Distil a tiny autoencoder (diffusers' AutoencoderTiny, the TAESD architecture) from the default model's VAE.

No TAESD weights can be downloaded here, so the default model's own one is trained: its decoder learns to
reproduce the full VAE decoder's output (not the pictures: the full decoder is the reference a preview or a
fast final decode stands in for), its encoder to reproduce the full encoder's posterior mean. Inputs are the
latents of the scenes the default model was trained on, some with Gaussian noise added, so the decoder also
sees the off-manifold estimates of the clean latents that previews show early in denoising.

    python -m edge.converters.default_model.train_tiny_vae --minutes 8 --out converters/assets/default_model/tiny_vae

The latents are in the UNet's space (the full VAE's latents times its scaling factor), as TAESD's are for SD:
the tiny model's scaling_factor is 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from edge.converters.default_model.data import images, sample_scenes
from edge.metrics import psnr

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "default_model"
SIZE = 64  # the default model's picture side
CHANNELS = (32, 32, 32, 32)  # decoder widths; 3 upsamplings by 2: the full VAE's factor 8
DECODER_BLOCKS = (2, 2, 2, 1)
ENCODER_BLOCKS = (1, 1, 1, 1)
NOISY_SHARE = 0.3  # of each batch: latents with noise added (previews decode early, rough estimates)


def build(latent_channels: int) -> AutoencoderTiny:
    return AutoencoderTiny(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=CHANNELS,
                           num_encoder_blocks=ENCODER_BLOCKS, num_decoder_blocks=DECODER_BLOCKS,
                           latent_channels=latent_channels, scaling_factor=1.0)


@torch.no_grad()
def teacher_batch(vae: AutoencoderKL, rng: np.random.Generator, n: int, g: torch.Generator):
    """(pictures, UNet-space latents to decode, the full decoder's output for them, the encoder's target)."""
    x = images(sample_scenes(rng, n, two_object_prob=0.25), SIZE)  # (n, 3, 64, 64) in [-1, 1]
    dist = vae.encode(x).latent_dist
    sf = vae.config.scaling_factor
    z = dist.sample(generator=g) * sf  # (n, C, 8, 8) as the UNet works in
    noisy = torch.rand(n, generator=g) < NOISY_SHARE
    level = torch.rand(n, 1, 1, 1, generator=g) * 0.6
    z = torch.where(noisy[:, None, None, None], z + level * torch.randn(z.shape, generator=g), z)
    target = vae.decode(z / sf).sample  # (n, 3, 64, 64): what the tiny decoder stands in for
    return x, z, target, dist.mean * sf


def train(minutes: float, batch: int, seed: int, lr: float = 2e-3, resume: Path | None = None,
          log=print) -> tuple[AutoencoderTiny, dict]:
    torch.manual_seed(seed)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(ASSETS / "vae").eval()
    tiny = build(vae.config.latent_channels) if resume is None else AutoencoderTiny.from_pretrained(resume).train()
    earlier = [] if resume is None else [json.loads((resume / "train_log.json").read_text())]
    params = list(tiny.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    deadline, t0, step, losses = time.monotonic() + minutes * 60, time.monotonic(), 0, []
    while time.monotonic() < deadline:
        frac = (time.monotonic() - t0) / (minutes * 60)
        for group in opt.param_groups:  # cosine to 5% of the rate over the time budget
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0))))
        x, z, target, mean = teacher_batch(vae, rng, batch, g)
        out = tiny.decode(z).sample  # (n, 3, 64, 64)
        enc = tiny.encode(x).latents  # (n, C, 8, 8)
        loss = (out - target).abs().mean() + ((out - target) ** 2).mean() + ((enc - mean) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 200 == 0:
            log(f"step {step}  loss {np.mean(losses[-200:]):.4f}  {time.monotonic() - t0:.0f}s")
    return tiny.eval(), {"steps": step, "batch": batch, "minutes": minutes, "seed": seed, "lr": lr,
                         "final_loss": round(float(np.mean(losses[-100:])), 5), **held_out(vae, tiny),
                         **({"resumed_from": earlier} if earlier else {})}


@torch.no_grad()
def held_out(vae: AutoencoderKL, tiny: AutoencoderTiny, n: int = 256) -> dict:
    """PSNR of the tiny decoder against the full decoder on unseen scenes' latents (no noise added)."""
    rng = np.random.default_rng(10_000)
    x = images(sample_scenes(rng, n, two_object_prob=0.25), SIZE)
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    full = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    fast = tiny.decode(z).sample.clamp(-1, 1)
    enc = tiny.encode(x).latents
    return {"held_out_psnr_vs_full_decoder_db": round(psnr(full.numpy(), fast.numpy(), peak=2.0), 2),
            "held_out_psnr_full_decoder_vs_pictures_db": round(psnr(x.numpy(), full.numpy(), peak=2.0), 2),
            "held_out_encoder_psnr_vs_full_db": round(psnr(z.numpy(), enc.numpy()), 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--resume", type=Path, help="continue from an earlier run's folder (its train_log.json is kept)")
    p.add_argument("--out", type=Path, default=ASSETS / "tiny_vae")
    a = p.parse_args(argv)
    tiny, report = train(a.minutes, a.batch, a.seed, a.lr, a.resume)
    tmp = a.out.with_name(a.out.name + ".partial")
    tiny.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps(report, indent=2) + "\n")
    if a.out.exists():
        import shutil

        shutil.rmtree(a.out)
    tmp.rename(a.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
