"""The tiny autoencoder (diffusers' AutoencoderTiny: TAESD's architecture) as an optional bundle component.

Its decoder is exported as `tiny_vae_decoder`: previews that look like the picture (a few ms each) and a final
decoder where speed matters more than detail (`edge generate --decoder tiny`). It reads latents as the UNet works
in: TAESD's latent space is SD's *scaled* latents (its scaling_factor is 1), so the graph divides by the tiny
model's own factor and the runtime feeds it the UNet's latents unchanged.

Besides the parity against torch every graph gets, the manifest records how close it comes to the bundle's full
VAE decoder on pictures that full VAE encoded: the price of its speed, in dB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge.converters.onnx_export import Spec
from edge.metrics import psnr

NAME = "tiny_vae_decoder"


class TinyVaeError(ValueError):
    """The tiny autoencoder cannot be loaded, or does not fit the model it is meant for."""


class TinyDecoder(torch.nn.Module):
    def __init__(self, tiny: torch.nn.Module):
        super().__init__()
        self.tiny = tiny

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        z = latent_sample / self.tiny.config.scaling_factor  # (B, C, h, w): the UNet's latents for TAESD's 1.0
        return self.tiny.decode(z, return_dict=False)[0]  # (B, 3, 8h, 8w) in ~[-1, 1]


def load_tiny_vae(folder: Path | str):
    """A local diffusers AutoencoderTiny folder (config.json + weights), fp32, eval mode."""
    from diffusers import AutoencoderTiny

    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise TinyVaeError(f"--tiny-vae {folder}: expected a diffusers AutoencoderTiny folder with config.json "
                           "(e.g. a local copy of madebyollin/taesd)")
    import json

    kind = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    if kind != "AutoencoderTiny":
        raise TinyVaeError(f"--tiny-vae {folder}: its config.json is a {kind}, not an AutoencoderTiny")
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # AutoencoderTiny saves a block_out_channels it then warns about on loading
    try:
        tiny = AutoencoderTiny.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TinyVaeError(f"--tiny-vae {folder}: cannot load it: {str(e).splitlines()[0]}") from None
    finally:
        logging.set_verbosity(level)
    return tiny.eval()


def check_fits(tiny, vae) -> None:
    """The tiny decoder must read the model's latents and draw pictures of the same size."""
    cfg = tiny.config
    factor = cfg.upsampling_scaling_factor ** (len(cfg.decoder_block_out_channels) - 1)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.latent_channels != vae.config.latent_channels or factor != vae_factor:
        raise TinyVaeError(f"the tiny autoencoder takes {cfg.latent_channels}-channel latents and scales by "
                           f"{factor}; this model's VAE has {vae.config.latent_channels} channels and scales by "
                           f"{vae_factor} (SD 1.x/2.x use TAESD, SDXL TAESDXL)")


def tiny_vae_spec(tiny) -> Spec:
    c = tiny.config.latent_channels
    return Spec(NAME, TinyDecoder(tiny),
                [{"name": "latent_sample", "dtype": "float32", "shape": ["batch", c, "height", "width"]}],
                [{"name": "sample", "dtype": "float32", "shape": ["batch", 3, "image_height", "image_width"]}],
                lambda g, h, w: (torch.randn(1, c, h, w, generator=g),))


@torch.no_grad()
def versus_full_decoder(tiny, vae, image_size: tuple[int, int], pictures: int = 16, seed: int = 0) -> dict[str, Any]:
    """PSNR of the tiny decoder against the full VAE decoder on latents of flat-shape pictures the VAE encoded."""
    from edge.converters.preview_fit import picture

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.stack([picture(image_size, rng) for _ in range(pictures)]))  # (S, 3, H, W)
    sf, full, fast = vae.config.scaling_factor, [], []
    for part in x.split(2):  # two pictures at a time: a batch of 16 at 512x512 would hold GBs of activations
        z = vae.encode(part).latent_dist.mean * sf  # (2, C, h, w) as the UNet works in
        full.append(vae.decode(z / sf).sample.clamp(-1, 1).numpy())
        fast.append(TinyDecoder(tiny)(z).clamp(-1, 1).numpy())
    full, fast = np.concatenate(full), np.concatenate(fast)
    return {"psnr_vs_full_decoder_db": round(psnr(full, fast, peak=2.0), 2), "pictures": pictures,
            "size": list(image_size), "on": "flat shapes encoded by the model's VAE encoder"}


def source_info(folder: Path | str, tiny) -> dict[str, Any]:
    cfg = tiny.config
    return {"folder": Path(folder).name, "decoder_block_out_channels": list(cfg.decoder_block_out_channels),
            "num_decoder_blocks": list(cfg.num_decoder_blocks), "scaling_factor": float(cfg.scaling_factor)}
