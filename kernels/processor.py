"""A diffusers attention processor that runs one of our kernels, and `use_attention` to install it.

Processors are diffusers' public extension point (`Attention.set_processor`, `set_attn_processor` on
models): the module keeps its own projections and norms, the processor only decides how the attention
itself is computed. Nothing in diffusers is patched.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from .attention import KERNELS, get_kernel


def _unsupported(attn: Attention) -> str | None:
    """Why `attn` needs more than KernelAttnProcessor does, or None. None of these occur in SD 1.x / 2.x."""
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
        return "q/k normalisation (qk_norm)"
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return "added key/value projections"
    if getattr(attn, "inner_kv_dim", attn.inner_dim) != attn.inner_dim:
        return "grouped key/value heads (kv_heads)"
    if getattr(attn, "is_causal", False):
        return "causal masking"
    return None


class KernelAttnProcessor:
    """diffusers' `AttnProcessor`, step for step, with the attention itself done by the named kernel."""

    def __init__(self, kernel: str, chunk: int | None = None):
        self.kernel_name = kernel
        self.kernel = get_kernel(kernel)
        if kernel == "sliced" and (chunk is None or isinstance(chunk, bool) or not isinstance(chunk, int)
                                   or chunk < 1):
            raise ValueError(f"attention kernel 'sliced' needs chunk = query rows per slice, a positive int; "
                             f"got {chunk!r}")
        if kernel != "sliced" and chunk is not None:
            raise ValueError(f"chunk={chunk!r} applies only to the 'sliced' attention kernel, not {kernel!r}")
        self.chunk = chunk

    def __repr__(self) -> str:
        return f"KernelAttnProcessor({self.kernel_name!r}, chunk={self.chunk!r})"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError(f"{self!r}: attention masks are not supported (Stable Diffusion UNets and VAEs pass none)")
        reason = _unsupported(attn)
        if reason is not None:
            raise ValueError(f"{self!r}: this attention layer uses {reason}, which the kernels do not implement")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, S, C)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)  # (B, S, C)

        query = attn.to_q(hidden_states)  # (B, Sq, C)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states  # (B, Sk = Sq, C)
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)  # (B, Sk, Cx)
        key = attn.to_k(encoder_hidden_states)  # (B, Sk, C)
        value = attn.to_v(encoder_hidden_states)  # (B, Sk, C)

        dtype = query.dtype
        if (attn.upcast_attention or attn.upcast_softmax) and dtype != torch.float32:  # fp16 SD 2.x: scores in fp32
            query, key, value = query.float(), key.float(), value.float()
        hidden_states = self.kernel(query, key, value, attn.heads, self.chunk, attn.scale)  # (B, Sq, C)
        if hidden_states.dtype != dtype:
            hidden_states = hidden_states.to(dtype)  # (B, Sq, C)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection, (B, Sq, C_out)
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)  # (B, C, H, W)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_attention(model: torch.nn.Module, kernel: str, chunk: int | None = None) -> None:
    """Make every attention layer of a diffusers model (UNet or VAE; self- and cross-attention) use `kernel`.

    Checks every layer first, so a model the kernels cannot run is refused before anything changes.
    """
    processor = KernelAttnProcessor(kernel, chunk)
    if not hasattr(model, "set_attn_processor"):
        raise ValueError(f"use_attention: {type(model).__name__} is not a diffusers model with attention processors "
                         f"(expected e.g. UNet2DConditionModel or AutoencoderKL)")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"use_attention: {type(model).__name__} has no attention layers")
    for name, layer in layers:
        reason = _unsupported(layer)
        if reason is not None:
            raise ValueError(f"use_attention: layer {name} uses {reason}, which the kernels "
                             f"({', '.join(KERNELS)}) do not implement")
    model.set_attn_processor(processor)
