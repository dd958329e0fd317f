"""Tiny random-weight Stable Diffusion 1.x and 2.x pipelines, for tests that need the real architecture.

Same block structure as SD 1.5 (cross-attention UNet, 8x-downsampling VAE with 4 latent
channels, CLIP text encoder with the real 49,408-token vocabulary and 77 positions), with
small channel counts so building, saving and loading all take a second or two on one CPU core.
Weights are diffusers'/transformers' default init, drawn from `seed`: outputs are finite and vary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .ldm_layout import save_single_file

TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"
PREDICTION_TYPES = ("epsilon", "v_prediction")

# SD 1.5's scheduler_config.json. `clip_sample` is not a PNDM option, but SD 1.5 stores it so
# that DDIMScheduler.from_config(...) (whose default is True) does not clip.
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
}


# SD 2.1 (768-v)'s scheduler_config.json: DDIM, v-prediction.
SD21_SCHEDULER = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}
SD2_SIZE = 96  # pixels: the tiny SD 2.x's native size, 1.5x the SD 1.x one's (768 against 512)


def _unet(in_channels: int = 4, sd2: bool = False) -> UNet2DConditionModel:
    """SD 1.x's structure; `sd2`: SD 2.x's (attention heads per block, linear projections, fp32 attention)."""
    sd2_only = dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    return UNet2DConditionModel(
        sample_size=SD2_SIZE // 8 if sd2 else 8,  # latent side: 64 px images (96 for SD 2.x)
        in_channels=in_channels,  # 9: an inpainting UNet (latents, mask, masked-image latents)
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,  # = text encoder hidden size
        norm_num_groups=32,
        **(sd2_only if sd2 else dict(attention_head_dim=8)),
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 32, 32),  # 4 blocks: 3 downsamplings = 8x, as SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
    )


def _text_encoder(sd2: bool = False) -> CLIPTextModel:
    """CLIP's text transformer; `sd2`: OpenCLIP's activation (gelu), as SD 2.x's text encoder has it."""
    config = CLIPTextConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
    )
    return CLIPTextModel(config)


def tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0,
                  unet_in_channels: int = 4) -> StableDiffusionPipeline:
    """A random SD 1.x pipeline; the same `seed` always gives the same weights. `unet_in_channels=9` makes
    it an inpainting model (the SD-1.5-inpainting UNet's input layout)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; expected one of {PREDICTION_TYPES}")
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        unet, vae, text_encoder = _unet(unet_in_channels), _vae(), _text_encoder()
    scheduler = PNDMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type})
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd2_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random SD 2.x pipeline (768-v's structure: v-prediction, DDIM, gelu text encoder, linear-projection
    transformers with per-block heads and fp32 attention, a native size larger than SD 1.x's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = _unet(sd2=True), _vae(), _text_encoder(sd2=True)
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=unet.eval(), scheduler=DDIMScheduler.from_config(SD21_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def save_tiny(out_dir: Path, prediction_type: str = "epsilon", seed: int = 0, unet_in_channels: int = 4) -> Path:
    """Write a tiny pipeline as a diffusers folder (configs, tokenizer, weights)."""
    out_dir = Path(out_dir)
    tiny_pipeline(prediction_type, seed, unet_in_channels).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def save_config_folder(pipe: StableDiffusionPipeline, config_dir: Path) -> Path:
    """Write `pipe`'s configs and tokenizer without weights: the `config=` folder for from_single_file.

    Weights must stay out: where the single file lacks a component's weights, diffusers would
    otherwise load that component from this folder without a word.
    """
    config_dir = Path(config_dir)
    pipe.save_pretrained(config_dir, safe_serialization=True)
    for weights in [*config_dir.glob("*/*.safetensors"), *config_dir.glob("*/*.bin")]:
        weights.unlink()
    return config_dir


def save_tiny_single_file(
    path: Path, config_dir: Path, prediction_type: str = "epsilon", seed: int = 0
) -> StableDiffusionPipeline:
    """Write a tiny pipeline as an LDM-layout single file plus its weight-less config folder.

    Returns the pipeline that was written, to compare against what a loader reads back.
    """
    pipe = tiny_pipeline(prediction_type, seed)
    save_single_file(pipe, Path(path))
    save_config_folder(pipe, config_dir)
    return pipe


# SDXL base's scheduler_config.json: Euler, "leading" spacing.
SDXL_SCHEDULER = {**{k: v for k, v in SD15_SCHEDULER.items() if k not in ("skip_prk_steps", "set_alpha_to_one")},
                  "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False}


def _xl_unet(context: int, time_ids: int) -> UNet2DConditionModel:
    """SDXL's UNet shape, small: text-and-time added conditions (a 32-wide pooled embedding and `time_ids` ids),
    per-block heads, linear projections."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=context, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + time_ids * 8)


def _xl_vae() -> AutoencoderKL:
    vae = _vae()
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's
    return vae


def _xl_text_encoder_2():
    """OpenCLIP-bigG's shape, small: gelu, a 32-wide projection (the pooled embedding)."""
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=49408,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=32))


def tiny_sdxl_pipeline(seed: int = 0):
    """A random SDXL base pipeline: two text encoders (the second with a projection, its tokenizer padding with
    "!"), a UNet with text-and-time added conditions and per-block heads, Euler, SDXL's VAE scaling."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = _xl_unet(context=64, time_ids=6), _xl_vae()
        text_encoder = _text_encoder(sd2=True)
        text_encoder_2 = _xl_text_encoder_2()
    return StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"), unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), force_zeros_for_empty_prompt=True)


def tiny_sdxl_refiner_pipeline(seed: int = 0):
    """A random SDXL refiner: the second text encoder only (its penultimate states are the whole context), a UNet
    whose added conditions are the pooled embedding and 5 time ids (sizes, crop, aesthetic score), as SDXL's
    refiner-1.0 has; the base's scheduler and VAE scaling."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = _xl_unet(context=32, time_ids=5), _xl_vae()
        text_encoder_2 = _xl_text_encoder_2()
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae.eval(), text_encoder=None, text_encoder_2=text_encoder_2.eval(), tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"), unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False)
