"""Sizes and training settings of the default model, as frozen dataclasses.

The sizes keep every weight under 20 MB (the text encoder's 49,408-token embedding, stored in
fp16, is a third of it) and the training within 45 minutes on two CPU cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

VOCAB_SIZE = 49408  # the CLIP BPE vocabulary in converters/assets/clip_tokenizer
MAX_TOKENS = 77  # CLIP context length; prompts are always padded to it, as SD does
WEIGHT_BUDGET_BYTES = 20_000_000  # all saved weights together


@dataclass(frozen=True)
class TextEncoderConfig:
    hidden: int = 64  # width; also the UNet's cross_attention_dim
    layers: int = 2  # transformer layers
    heads: int = 4  # attention heads
    mlp: int = 256  # MLP inner width


@dataclass(frozen=True)
class UnetConfig:
    channels: tuple[int, ...] = (48, 96)  # block_out_channels; one downsample per extra level (8x8 -> 4x4)
    layers_per_block: int = 1  # resnets per down block (up blocks get one more, as in SD)
    head_dim: int = 8  # attention_head_dim
    norm_groups: int = 16  # GroupNorm groups; must divide every channel count


@dataclass(frozen=True)
class VaeConfig:
    channels: tuple[int, ...] = (16, 32, 48, 48)  # four levels = 8x downsampling, as in SD
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 8


@dataclass(frozen=True)
class ModelConfig:
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UnetConfig = field(default_factory=UnetConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    image_size: int = 64  # pixels; latents are image_size // 8


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # seeds torch, the scene sampler and the caption sampler
    threads: int = 1  # torch intra-op threads
    vae_batch: int = 8  # small batches: more updates per second, which this stage is short of
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4  # on the mean per-element KL; small, only to keep latents tame
    object_weight: float = 4.0  # extra loss weight on pixels unlike the background (objects are ~8% of pixels)
    init_logvar: float = -6.0  # initial posterior log-variance: start with informative latent samples
    unet_batch: int = 32
    unet_lr: float = 5e-4  # the text encoder trains with the UNet, at the same rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr_floor * lr
    lr_floor: float = 0.1
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    unet_object_weight: float = 4.0  # extra diffusion-loss weight on latent pixels an object covers
    aux_position_weight: float = 0.2  # training-only head: the text encoder's pooled output -> the position
    min_snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023); 0 turns it off
    ema_decay: float = 0.999  # of the UNet and text encoder weights; 0 turns it off
    two_object_prob: float = 0.25  # share of two-object scenes in training
    pool_max: int = 20000  # most scenes whose latents are precomputed for the UNet stage
    pool_reuse: int = 8  # UNet samples per pooled scene (captions and latent samples still vary)
    # Share of the time budget for each stage; the latent pool and saving take the rest.
    vae_share: float = 0.30
    unet_share: float = 0.64

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={self.caption_dropout}; expected a value in [0, 1)")
        if self.vae_share + self.unet_share >= 1.0 or min(self.vae_share, self.unet_share) <= 0:
            raise ValueError(f"vae_share={self.vae_share}, unet_share={self.unet_share}; "
                             "expected positive shares summing to less than 1")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads}; expected at least 1")


def to_json(config: object) -> dict:
    """A config (nested dataclasses) as plain JSON-ready values."""
    return asdict(config)
