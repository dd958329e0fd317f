"""Published Stable Diffusion architectures, built from their configs with random weights.

`converters/assets/configs/<arch>/` holds each architecture's published diffusers configs (model_index.json,
unet/, vae/, text_encoder/, scheduler/, tokenizer/) and no weights: a valid `config=` folder for diffusers'
`from_single_file`, and the recipe `build_random` follows (SDXL's folders: text_encoder_2/ too, and the
tokenizers are SD 1.5's files, the second padding with "!"). Random weights give every figure a benchmark
needs (size, latency, memory) but no picture: they stand in when no trained weights are at hand.

    python -m edge.converters.arch sd15 --save DIR     # a diffusers folder with random weights, fp32
    python -m edge.converters.arch sdxl --save DIR     # 13.9 GB; `edge convert` exports its UNet in pieces

torch and diffusers are imported where a model is built, so the names and configs can be checked by
torch-free code (`edge bench --arch` validates its argument without loading torch into the process
whose memory it measures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

CONFIGS = Path(__file__).parent / "assets" / "configs"
ARCHS = {  # name -> what it is
    "sd15": "Stable Diffusion 1.5: CLIP ViT-L text encoder, 512x512, epsilon prediction",
    "sd21": "Stable Diffusion 2.1 (768-v): OpenCLIP ViT-H text encoder, 768x768, v-prediction",
    "sd21-base": "Stable Diffusion 2.1-base: OpenCLIP ViT-H text encoder, 512x512, epsilon prediction",
    "sdxl": "SDXL base 1.0: CLIP ViT-L + OpenCLIP ViT-bigG text encoders, 1024x1024, size conditioning",
    "sdxl-refiner": "SDXL refiner 1.0: OpenCLIP ViT-bigG text encoder, aesthetic-score conditioning",
}
NOT_YET: dict[str, str] = {}
SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler")  # what the config folders name


class ArchError(ValueError):
    """An architecture name we have no configs for."""


def check_arch(arch: str) -> str:
    """`arch` if it is one we can build; otherwise one error that lists the names that work."""
    if arch in NOT_YET:
        raise ArchError(f"arch {arch!r}: {NOT_YET[arch]}; available: {', '.join(ARCHS)}")
    if arch not in ARCHS:
        later = f" (not yet: {', '.join(NOT_YET)})" if NOT_YET else ""
        raise ArchError(f"unknown arch {arch!r}; available: {', '.join(ARCHS)}{later}")
    return arch


def config_dir(arch: str) -> Path:
    """The architecture's weight-less diffusers folder (configs + tokenizer)."""
    return CONFIGS / check_arch(arch)


def build_random(arch: str, seed: int = 0, *, device: str = "cpu") -> StableDiffusionPipeline:
    """The published architecture `arch` with random fp32 weights; the same seed gives the same weights.

    `device="meta"` builds the modules without allocating their weights (to count parameters, say).
    Full size on CPU: SD 1.5 is ~1.07 B parameters, ~4.3 GB.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = config_dir(arch)
    if arch.startswith("sdxl"):
        return _build_xl(folder, seed, device)
    with torch.random.fork_rng(devices=[]), torch.device(device):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(_read(folder / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(_read(folder / "vae" / "config.json"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet.eval(),
        scheduler=_scheduler(folder),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_xl(folder: Path, seed: int, device: str):
    """SDXL base (two text encoders) or refiner (the second only), as its model_index.json says; the tokenizers are
    CLIP's (SD 1.5's files), the second padding with "!" as SDXL's does."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = _read(folder / "model_index.json")
    refiner = index["text_encoder"][0] is None
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        parts = {"unet": UNet2DConditionModel.from_config(_read(folder / "unet" / "config.json")).eval(),
                 "vae": AutoencoderKL.from_config(_read(folder / "vae" / "config.json")).eval(),
                 "text_encoder_2": CLIPTextModelWithProjection(
                     CLIPTextConfig.from_pretrained(folder / "text_encoder_2")).eval()}
        if not refiner:
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")).eval()
    vocab = CONFIGS / "sd15" / "tokenizer"
    tokenizers = {"tokenizer_2": CLIPTokenizer.from_pretrained(vocab, pad_token="!")}
    if not refiner:
        tokenizers["tokenizer"] = CLIPTokenizer.from_pretrained(vocab)
    flags = {k: index[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score") if k in index}
    cls = getattr(diffusers, index["_class_name"])
    empty = {} if not refiner else {"text_encoder": None, "tokenizer": None}
    return cls(**parts, **tokenizers, **empty, scheduler=_scheduler(folder), **flags)


def save_random(arch: str, out: Path, seed: int = 0) -> Path:
    """`build_random` written as a diffusers folder (safetensors, sharded so saving does not double memory)."""
    pipe = build_random(arch, seed)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="1GB")
    return Path(out)


def parameter_counts(pipe: StableDiffusionPipeline) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "text_encoder", "text_encoder_2", "vae") if getattr(pipe, name, None) is not None}


def _scheduler(folder: Path):
    import diffusers

    config = _read(folder / "scheduler" / "scheduler_config.json")
    name = config["_class_name"]
    if name not in SCHEDULERS:
        raise ArchError(f"{folder}: scheduler {name!r} is not one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, name).from_config(config)


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge.converters.arch", description=__doc__.split("\n\n")[0])
    p.add_argument("arch", help=", ".join(ARCHS))
    p.add_argument("--save", type=Path, required=True, help="diffusers folder to write")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        save_random(a.arch, a.save, a.seed)
    except ArchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
