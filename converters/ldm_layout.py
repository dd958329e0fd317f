"""Diffusers -> original CompVis/LDM key layout, for SD 1.x single-file checkpoints.

diffusers can read a single-file checkpoint (`from_single_file`) but ships the reverse mapping
only as a script outside the package. We need the reverse to write tiny random-weight
checkpoints that exercise the real loader, so it lives here.

The mapping is a list of module prefixes, (diffusers prefix, LDM prefix, leaf renames), built
from the model configs, so it fits any block and layer count, not only SD 1.5's. Every key of
every model must be matched by exactly one prefix; an unmatched key is an error, never dropped.

Shapes are kept as they are, with one exception. The UNet's transformer `proj_in`/`proj_out`
are 1x1 convs (4-D) when `use_linear_projection` is False (SD 1.x) and linears (2-D) when True
(SD 2.x), in diffusers and LDM alike, so they pass through. The VAE mid-block attention is
linear in diffusers but 1x1 conv in LDM: its q/k/v/proj_out weights become (C, C, 1, 1).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

# Leaf renames inside one module: diffusers name -> LDM name.
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

Reshape = Callable[[torch.Tensor], torch.Tensor]


def _linear_to_conv1x1(t: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention uses 1x1 convs where diffusers uses linears."""
    return t[:, :, None, None] if t.ndim == 2 else t  # (C_out, C_in) -> (C_out, C_in, 1, 1)


# One rule: keys under `src` move under `dst`, with `leaves` renaming the first name after it.
Rule = tuple[str, str, dict[str, str], Reshape | None]


def _layers_per_block(config: Any, model: str) -> int:
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError(
            f"{model}: layers_per_block={layers!r}; the LDM layout (and diffusers' single-file loader) "
            "needs one int for all blocks"
        )
    return layers


def unet_rules(config: Any) -> list[Rule]:
    """Prefix rules for a UNet2DConditionModel with the SD 1.x/2.x block structure."""
    n_blocks = len(config.down_block_types)
    per_block = _layers_per_block(config, "UNet")
    stride = per_block + 1  # LDM counts the down/upsampler as one more layer of each block
    rules: list[Rule] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}, None),
        ("time_embedding.linear_2.", "time_embed.2.", {}, None),
        ("conv_in.", "input_blocks.0.0.", {}, None),
        ("conv_norm_out.", "out.0.", {}, None),
        ("conv_out.", "out.2.", {}, None),
        ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET, None),
        ("mid_block.attentions.0.", "middle_block.1.", {}, None),
        ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET, None),
    ]
    for b in range(n_blocks):
        for layer in range(per_block):
            i = 1 + b * stride + layer
            rules.append((f"down_blocks.{b}.resnets.{layer}.", f"input_blocks.{i}.0.", UNET_RESNET, None))
            rules.append((f"down_blocks.{b}.attentions.{layer}.", f"input_blocks.{i}.1.", {}, None))
        down = f"input_blocks.{1 + b * stride + per_block}.0.op."
        rules.append((f"down_blocks.{b}.downsamplers.0.conv.", down, {}, None))

        has_attention = "CrossAttn" in config.up_block_types[b]
        for layer in range(per_block + 1):
            i = b * stride + layer
            rules.append((f"up_blocks.{b}.resnets.{layer}.", f"output_blocks.{i}.0.", UNET_RESNET, None))
            rules.append((f"up_blocks.{b}.attentions.{layer}.", f"output_blocks.{i}.1.", {}, None))
        up = f"output_blocks.{b * stride + per_block}.{2 if has_attention else 1}.conv."
        rules.append((f"up_blocks.{b}.upsamplers.0.conv.", up, {}, None))
    return rules


def vae_rules(config: Any) -> list[Rule]:
    """Prefix rules for an AutoencoderKL; LDM numbers the decoder's up blocks in reverse."""
    n_blocks = len(config.block_out_channels)
    per_block = _layers_per_block(config, "VAE")
    rules: list[Rule] = [
        ("quant_conv.", "quant_conv.", {}, None),
        ("post_quant_conv.", "post_quant_conv.", {}, None),
    ]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}, None),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}, None),
            (f"{part}.conv_out.", f"{part}.conv_out.", {}, None),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET, None),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION, _linear_to_conv1x1),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET, None),
        ]
    for b in range(n_blocks):
        down, up = f"encoder.down_blocks.{b}.", f"decoder.up_blocks.{b}."
        ldm_down, ldm_up = f"encoder.down.{b}.", f"decoder.up.{n_blocks - 1 - b}."
        for layer in range(per_block):
            rules.append((f"{down}resnets.{layer}.", f"{ldm_down}block.{layer}.", VAE_RESNET, None))
        rules.append((f"{down}downsamplers.0.conv.", f"{ldm_down}downsample.conv.", {}, None))
        for layer in range(per_block + 1):  # the decoder has one more resnet per block
            rules.append((f"{up}resnets.{layer}.", f"{ldm_up}block.{layer}.", VAE_RESNET, None))
        rules.append((f"{up}upsamplers.0.conv.", f"{ldm_up}upsample.conv.", {}, None))
    return rules


def _rename_leaf(rest: str, leaves: dict[str, str]) -> str:
    for src, dst in leaves.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src) :]
    return rest


def apply_rules(state: dict[str, torch.Tensor], rules: list[Rule], prefix: str, model: str) -> dict[str, torch.Tensor]:
    """Rename every key of `state` by the longest matching rule; refuse keys no rule covers."""
    by_length = sorted(rules, key=lambda rule: len(rule[0]), reverse=True)
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, tensor in state.items():
        rule = next((r for r in by_length if key.startswith(r[0])), None)
        if rule is None:
            unmatched.append(key)
            continue
        src, dst, leaves, reshape = rule
        new_key = prefix + dst + _rename_leaf(key[len(src) :], leaves)
        if new_key in out:
            raise ValueError(f"{model}: two weights map to LDM key {new_key!r}; the rules overlap")
        out[new_key] = (reshape(tensor) if reshape is not None else tensor).detach().contiguous()
    if unmatched:
        raise ValueError(
            f"{model}: {len(unmatched)} weights have no place in the SD 1.x LDM layout, e.g. {unmatched[:5]}; "
            "is this an SD 1.x/2.x-architecture model (no class/addition embeddings)?"
        )
    return out


def clip_state_dict(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIP keeps its transformers names under `cond_stage_model.transformer.text_model.`.

    transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); older versions have
    it. Both end up as the original checkpoints spell them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in text_encoder.state_dict().items():
        out[CLIP_PREFIX + key.removeprefix("text_model.")] = tensor.detach().contiguous()
    return out


def to_ldm_state_dict(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """All weights of an SD 1.x pipeline, keyed as in the original `v1-5-pruned.safetensors`.

    Only the three models: no EMA copy, no DDPM schedule buffers (`betas`, `alphas_cumprod`, ...),
    which diffusers' loader ignores anyway.
    """
    state = apply_rules(unet.state_dict(), unet_rules(unet.config), UNET_PREFIX, "UNet")
    state |= apply_rules(vae.state_dict(), vae_rules(vae.config), VAE_PREFIX, "VAE")
    state |= clip_state_dict(text_encoder)
    return state


def save_single_file(pipe: StableDiffusionPipeline, path: Path) -> None:
    """Write `pipe`'s UNet, VAE and text encoder as one LDM-layout `.safetensors` file.

    Written to a temporary file beside `path`, then renamed, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        # diffusers picks the reader by extension: anything else goes to torch.load.
        raise ValueError(f"single-file checkpoint path {str(path)!r} must end in .safetensors")
    state = to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
