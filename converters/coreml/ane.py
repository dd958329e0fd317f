"""The Neural-Engine module family: a Stable Diffusion UNet's layers rewritten in (B, C, 1, S) layout.

Apple's Neural Engine runs 4-D channel-first tensors and 1x1 convolutions well, and 3-D matmuls over a
(B, S, C) sequence poorly. So, as in Apple's ml-stable-diffusion, inside every transformer block:

- a linear layer is a 1x1 convolution (weight (out, in) -> (out, in, 1, 1)),
- the token sequence lies along the last axis, (B, C, 1, S), never transposed to (B, S, C),
- layer norm normalises over the channel axis 1,
- attention is split per head into einsums (the `split_einsum` kernel, in this layout natively).

Every module is built from the matching diffusers module by explicit construction: it takes that module's
weight tensors (shared, not copied: a linear weight becomes a 1x1 convolution's as a view, so a full-size
UNet rewrite costs no extra memory) and nothing in diffusers is patched or replaced. Convolutional parts
(ResNet blocks, samplers) keep (B, C, H, W) and use diffusers' own layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def conv_from_linear(linear: nn.Linear) -> nn.Conv2d:
    """A 1x1 convolution computing `linear` on (B, C, 1, S) tensors, its weight a view of the linear's."""
    conv = torch.nn.utils.skip_init(nn.Conv2d, linear.in_features, linear.out_features, 1,
                                    bias=linear.bias is not None)
    conv.weight = nn.Parameter(linear.weight.detach()[:, :, None, None], requires_grad=False)  # (out, in, 1, 1)
    if linear.bias is not None:
        conv.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return conv


def same(module: nn.Module) -> nn.Module:
    """A diffusers layer used as it is (GroupNorm, Conv2d, a VAE block): its arithmetic is already ANE-friendly."""
    return module


class LayerNormANE(nn.Module):
    """Layer norm over the channel axis of a (B, C, 1, S) tensor."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    @classmethod
    def from_diffusers(cls, norm: nn.LayerNorm) -> "LayerNormANE":
        out = cls(norm.normalized_shape[0], norm.eps)
        out.weight, out.bias = norm.weight, norm.bias  # shared
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)  # (B, 1, 1, S)
        centred = x - mean  # (B, C, 1, S)
        var = (centred * centred).mean(dim=1, keepdim=True)  # (B, 1, 1, S)
        x = centred * torch.rsqrt(var + self.eps)  # (B, C, 1, S)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)  # (B, C, 1, S)


def split_einsum_bc1s(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v per head, all in (B, C, 1, S): kernels/attention.py's `split_einsum`
    without its transposes in and out (the (B, S, C) signature's price, which this layout does not pay)."""
    d = q.shape[1] // heads
    q = q * d ** -0.5  # (B, C, 1, Sq)
    qs = q.split(d, dim=1)  # heads x (B, d, 1, Sq)
    ks = k.transpose(1, 3).split(d, dim=3)  # heads x (B, Sk, 1, d)
    vs = v.split(d, dim=1)  # heads x (B, d, 1, Sk)
    weights = [torch.einsum("bchq,bkhc->bkhq", qh, kh).softmax(dim=1) for qh, kh in zip(qs, ks)]  # (B, Sk, 1, Sq)
    outs = [torch.einsum("bkhq,bchk->bchq", w, vh) for w, vh in zip(weights, vs)]  # heads x (B, d, 1, Sq)
    return torch.cat(outs, dim=1)  # (B, C, 1, Sq)


def original_bc1s(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The same in batched matmuls, heads along a batch axis: the form the GPU runs best (Apple's
    "ORIGINAL" attention); the Neural Engine prefers `split_einsum_bc1s`."""
    d = q.shape[1] // heads
    qs = (q * d ** -0.5).split(d, dim=1)  # heads x (B, d, 1, Sq): split, not reshape, as coremltools wants
    q = torch.stack(qs, dim=1).squeeze(3).transpose(2, 3)  # (B, H, Sq, d)
    k = torch.stack(k.split(d, dim=1), dim=1).squeeze(3)  # (B, H, d, Sk)
    v = torch.stack(v.split(d, dim=1), dim=1).squeeze(3).transpose(2, 3)  # (B, H, Sk, d)
    out = torch.matmul(torch.matmul(q, k).softmax(dim=-1), v)  # (B, H, Sq, d)
    return torch.cat(out.transpose(2, 3).unbind(1), dim=1).unsqueeze(2)  # (B, C, 1, Sq)


# Core ML attention kernels, chosen by `--attention` for the Core ML target (edge.converters.coreml.convert).
ATTENTION = {"split_einsum": split_einsum_bc1s, "original": original_bc1s}


def use_attention(module: nn.Module, kernel: str) -> nn.Module:
    """Set the attention kernel of every rewritten attention layer in `module`; returns `module`."""
    if kernel not in ATTENTION:
        raise ValueError(f"Core ML attention {kernel!r}: choose one of {', '.join(ATTENTION)}")
    for m in module.modules():
        if hasattr(m, "attention_kernel"):
            m.attention_kernel = kernel
    return module


class AttentionANE(nn.Module):
    """diffusers `Attention` (self or cross) on (B, C, 1, S); the context for cross-attention is (B, D, 1, 77)."""

    def __init__(self, to_q: nn.Conv2d, to_k: nn.Conv2d, to_v: nn.Conv2d, to_out: nn.Conv2d, heads: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out, self.heads = to_q, to_k, to_v, to_out, heads
        self.attention_kernel = "split_einsum"  # or "original": see use_attention

    @classmethod
    def from_diffusers(cls, attn) -> "AttentionANE":
        if attn.scale != (attn.inner_dim // attn.heads) ** -0.5 or attn.norm_cross is not None:
            raise ValueError("only plain diffusers attention (default scale, no cross norm) has an ANE rewrite")
        return cls(conv_from_linear(attn.to_q), conv_from_linear(attn.to_k), conv_from_linear(attn.to_v),
                   conv_from_linear(attn.to_out[0]), attn.heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context  # (B, D, 1, Sk)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, C, 1, Sq), (B, C, 1, Sk) x2
        return self.to_out(ATTENTION[self.attention_kernel](q, k, v, self.heads))  # (B, C, 1, Sq)


class FeedForwardANE(nn.Module):
    """diffusers `FeedForward` with a GEGLU input projection, as 1x1 convolutions."""

    def __init__(self, proj_in: nn.Conv2d, proj_out: nn.Conv2d):
        super().__init__()
        self.proj_in, self.proj_out = proj_in, proj_out

    @classmethod
    def from_diffusers(cls, ff) -> "FeedForwardANE":
        from diffusers.models.activations import GEGLU

        if not isinstance(ff.net[0], GEGLU):
            raise ValueError(f"feed-forward activation {type(ff.net[0]).__name__}: only GEGLU has an ANE rewrite")
        return cls(conv_from_linear(ff.net[0].proj), conv_from_linear(ff.net[2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=1)  # (B, F, 1, S) each
        return self.proj_out(h * F.gelu(gate))  # (B, C, 1, S)


class TransformerBlockANE(nn.Module):
    """diffusers `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, pre-norm."""

    def __init__(self, block):
        super().__init__()
        if block.norm_type != "layer_norm" or block.only_cross_attention or block.attn2 is None:
            raise ValueError(f"transformer block type {block.norm_type!r} (only_cross_attention="
                             f"{block.only_cross_attention}) has no ANE rewrite; SD 1.x/2.x blocks do")
        self.norm1, self.attn1 = LayerNormANE.from_diffusers(block.norm1), AttentionANE.from_diffusers(block.attn1)
        self.norm2, self.attn2 = LayerNormANE.from_diffusers(block.norm2), AttentionANE.from_diffusers(block.attn2)
        self.norm3, self.ff = LayerNormANE.from_diffusers(block.norm3), FeedForwardANE.from_diffusers(block.ff)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, C, 1, S)
        x = x + self.attn2(self.norm2(x), context)  # (B, C, 1, S)
        return x + self.ff(self.norm3(x))  # (B, C, 1, S)


class SpatialTransformerANE(nn.Module):
    """diffusers `Transformer2DModel` (continuous input): GroupNorm, project in, blocks on (B, C, 1, H*W), out."""

    def __init__(self, t2d):
        super().__init__()
        self.norm = same(t2d.norm)
        linear = t2d.use_linear_projection  # SD 2.x: nn.Linear projections; SD 1.x: 1x1 convolutions
        self.proj_in = conv_from_linear(t2d.proj_in) if linear else same(t2d.proj_in)
        self.proj_out = conv_from_linear(t2d.proj_out) if linear else same(t2d.proj_out)
        self.blocks = nn.ModuleList(TransformerBlockANE(b) for b in t2d.transformer_blocks)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # Shapes taken from tensors, not as Python ints: traced ints become ops coremltools mis-converts.
        y = self.proj_in(self.norm(x)).flatten(2).unsqueeze(2)  # (B, C, 1, S)
        for block in self.blocks:
            y = block(y, context)  # (B, C, 1, S)
        return self.proj_out(y.reshape(x.shape)) + x  # (B, C, H, W)


class ResnetBlockANE(nn.Module):
    """diffusers `ResnetBlock2D` (default time-embedding norm); the time embedding arrives as (B, T, 1, 1)."""

    def __init__(self, resnet):
        super().__init__()
        if resnet.time_embedding_norm != "default" or resnet.up or resnet.down:
            raise ValueError(f"ResNet block with time_embedding_norm={resnet.time_embedding_norm!r} or a built-in "
                             "resampler has no ANE rewrite")
        self.norm1, self.conv1 = same(resnet.norm1), same(resnet.conv1)
        self.time_emb_proj = conv_from_linear(resnet.time_emb_proj)
        self.norm2, self.conv2 = same(resnet.norm2), same(resnet.conv2)
        self.shortcut = same(resnet.conv_shortcut) if resnet.conv_shortcut is not None else None
        self.output_scale_factor = float(resnet.output_scale_factor)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C, H, W)
        h = h + self.time_emb_proj(F.silu(temb))  # (B, C, H, W) + (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C, H, W)
        skip = x if self.shortcut is None else self.shortcut(x)  # (B, C, H, W)
        return (skip + h) / self.output_scale_factor


class TimeEmbeddingANE(nn.Module):
    """Sinusoidal timestep features, then diffusers' two-layer MLP as 1x1 convolutions: (B,) -> (B, T, 1, 1)."""

    def __init__(self, time_proj, time_embedding):
        super().__init__()
        half = time_proj.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - time_proj.downscale_freq_shift)
        self.register_buffer("freqs", torch.exp(exponent), persistent=False)  # (half,)
        self.flip, self.scale = bool(time_proj.flip_sin_to_cos), float(time_proj.scale)
        if time_embedding.cond_proj is not None or time_embedding.post_act is not None:
            raise ValueError("time embeddings with a condition projection or post-activation have no ANE rewrite")
        self.linear_1 = conv_from_linear(time_embedding.linear_1)
        self.linear_2 = conv_from_linear(time_embedding.linear_2)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        args = timestep[:, None] * self.freqs[None, :] * self.scale  # (B, half)
        sin, cos = torch.sin(args), torch.cos(args)
        feats = torch.cat([cos, sin] if self.flip else [sin, cos], dim=1)[:, :, None, None]  # (B, 2*half, 1, 1)
        return self.linear_2(F.silu(self.linear_1(feats)))  # (B, T, 1, 1)


class Downsample(nn.Module):
    def __init__(self, sampler):
        super().__init__()
        if not sampler.use_conv or sampler.norm is not None or sampler.padding == 0:
            raise ValueError("only padded convolutional downsamplers without a norm have an ANE rewrite")
        self.conv = same(sampler.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, sampler):
        super().__init__()
        if not sampler.use_conv or sampler.use_conv_transpose or sampler.norm is not None:
            raise ValueError("only nearest-neighbour + convolution upsamplers have an ANE rewrite")
        self.conv = same(sampler.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
