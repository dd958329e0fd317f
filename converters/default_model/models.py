"""Build the default model's components with the exact Stable Diffusion classes, and save them
as a diffusers StableDiffusionPipeline folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from edge.converters.default_model.config import (MAX_TOKENS, VOCAB_SIZE, WEIGHT_BUDGET_BYTES, ModelConfig,
                                                   TextEncoderConfig, UnetConfig, VaeConfig)

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"
# SD 1.5's noise schedule; training noises with DDPM, the saved pipeline samples with PNDM.
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
TEXT_ENCODER_SAVE_DTYPE = torch.float16  # the 49,408-row embedding is a third of the weights


def load_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def build_text_encoder(cfg: TextEncoderConfig) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=cfg.hidden, intermediate_size=cfg.mlp,
                            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                            max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=cfg.hidden)
    return CLIPTextModel(config)


def build_unet(cfg: UnetConfig, cross_attention_dim: int, latent_size: int,
               latent_channels: int) -> UNet2DConditionModel:
    n = len(cfg.channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=cfg.channels, layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_attention_dim, attention_head_dim=cfg.head_dim, norm_num_groups=cfg.norm_groups)


def build_vae(cfg: VaeConfig, image_size: int) -> AutoencoderKL:
    n = len(cfg.channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels, sample_size=image_size,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.channels, layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_groups)


def build_models(cfg: ModelConfig) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    factor = 2 ** (len(cfg.vae.channels) - 1)
    if factor != 8 or cfg.image_size % factor:
        raise ValueError(f"vae channels {cfg.vae.channels} with image_size {cfg.image_size}: "
                         "expected four VAE levels (8x downsampling, as in SD) and a size divisible by 8")
    text = build_text_encoder(cfg.text)
    unet = build_unet(cfg.unet, cfg.text.hidden, cfg.image_size // factor, cfg.vae.latent_channels)
    return text, unet, build_vae(cfg.vae, cfg.image_size)


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def sampling_scheduler() -> PNDMScheduler:
    """SD 1.5's scheduler config."""
    return PNDMScheduler(**SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def weight_sizes(text: CLIPTextModel, unet: UNet2DConditionModel, vae: AutoencoderKL) -> dict[str, dict[str, float]]:
    """Parameters and saved megabytes (10^6 bytes) per component, as save_pipeline stores them."""
    itemsize = {"text_encoder": torch.finfo(TEXT_ENCODER_SAVE_DTYPE).bits // 8, "unet": 4, "vae": 4}
    sizes = {}
    for name, model in (("text_encoder", text), ("unet", unet), ("vae", vae)):
        params = sum(p.numel() for p in model.parameters())
        sizes[name] = {"params": params, "mb": params * itemsize[name] / 1e6}
    sizes["total"] = {k: sum(v[k] for v in sizes.values()) for k in ("params", "mb")}
    return sizes


def check_budget(sizes: dict[str, dict[str, float]]) -> None:
    if sizes["total"]["mb"] * 1e6 > WEIGHT_BUDGET_BYTES:
        raise ValueError(f"the model's weights take {sizes['total']['mb']:.2f} MB; the budget is "
                         f"{WEIGHT_BUDGET_BYTES / 1e6:.0f} MB. Shrink the sizes in ModelConfig.")


def save_pipeline(out: Path, text: CLIPTextModel, unet: UNet2DConditionModel, vae: AutoencoderKL) -> None:
    """A StableDiffusionPipeline folder; the text encoder's weights stored in fp16.

    Its config keeps dtype float32, so transformers loads the weights back into fp32 (the
    pipeline then runs the text encoder and UNet in one dtype); load_pipeline checks this.
    """
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_tokenizer(), unet=unet,
                                   scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    weights = out / "text_encoder" / "model.safetensors"
    save_file({k: v.to(TEXT_ENCODER_SAVE_DTYPE).contiguous() for k, v in load_file(weights).items()},
              weights, metadata={"format": "pt"})
    config_path = out / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def load_vae(folder: Path, cfg: ModelConfig) -> AutoencoderKL:
    """The autoencoder of an earlier run's folder, checked against the configured sizes."""
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    got = (tuple(vae.config.block_out_channels), vae.config.latent_channels)
    if got != (cfg.vae.channels, cfg.vae.latent_channels):
        raise ValueError(f"{folder}/vae has channels {vae.config.block_out_channels} and "
                         f"{vae.config.latent_channels} latent channels; expected {cfg.vae}")
    return vae.eval()


def load_pipeline(folder: Path) -> StableDiffusionPipeline:
    """Load a saved folder and check every component came back in fp32."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    dtypes = {name: getattr(pipe, name).dtype for name in ("text_encoder", "unet", "vae")}
    if any(d != torch.float32 for d in dtypes.values()):
        raise ValueError(f"{folder}: components loaded as {dtypes}; expected all torch.float32")
    return pipe


def saved_bytes(folder: Path) -> dict[str, int]:
    """Bytes of the weight files per component of a saved pipeline folder."""
    return {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors"))
            for d in sorted(folder.iterdir()) if d.is_dir() and any(d.glob("*.safetensors"))}
