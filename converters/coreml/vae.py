"""The VAE for Core ML: diffusers' convolutional blocks as they are, the mid-block attention in ANE layout.

The VAE is a ConvNet apart from one single-head attention in its mid block. diffusers computes that attention
on (B, H*W, C) with shapes read as Python ints, which coremltools cannot convert from a trace; the rewrite
here works on (B, C, 1, H*W) like the UNet's (weights taken explicitly (shared), nothing patched).
"""

from __future__ import annotations

import torch
from torch import nn

from edge.converters.coreml.ane import ATTENTION, conv_from_linear, same


class VAEAttentionANE(nn.Module):
    """diffusers' VAE `Attention` (GroupNorm, q/k/v with bias, residual) on (B, C, 1, H*W)."""

    def __init__(self, attn):
        super().__init__()
        if attn.group_norm is None or attn.spatial_norm is not None or not attn.residual_connection:
            raise ValueError("only the SD VAE's attention (group norm, residual) has an ANE rewrite")
        if attn.scale != (attn.inner_dim // attn.heads) ** -0.5:
            raise ValueError(f"VAE attention scale {attn.scale} is not 1/sqrt(head dim); no ANE rewrite")
        self.norm = same(attn.group_norm)
        self.to_q, self.to_k, self.to_v = (conv_from_linear(m) for m in (attn.to_q, attn.to_k, attn.to_v))
        self.to_out, self.heads = conv_from_linear(attn.to_out[0]), attn.heads
        self.rescale = float(attn.rescale_output_factor)
        self.attention_kernel = "split_einsum"  # or "original": see ane.use_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x).flatten(2).unsqueeze(2)  # (B, C, 1, S)
        attend = ATTENTION[self.attention_kernel]
        y = self.to_out(attend(self.to_q(y), self.to_k(y), self.to_v(y), self.heads))  # (B, C, 1, S)
        return (y.reshape(x.shape) + x) / self.rescale  # (B, C, H, W)


class VAEMidBlockANE(nn.Module):
    """resnet, (attention, resnet)...: diffusers' UNetMidBlock2D with its attentions rewritten."""

    def __init__(self, mid):
        super().__init__()
        self.resnets = nn.ModuleList(same(r) for r in mid.resnets)
        self.attentions = nn.ModuleList(VAEAttentionANE(a) if a is not None else nn.Identity() for a in mid.attentions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, None)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x), None)
        return x  # (B, C, H, W)


class DecoderANE(nn.Module):
    """post_quant_conv + diffusers' Decoder: z (1, 4, h, w) -> image (1, 3, 8h, 8w)."""

    def __init__(self, vae):
        super().__init__()
        d = vae.decoder
        self.post_quant_conv = same(vae.post_quant_conv) if vae.post_quant_conv is not None else nn.Identity()
        self.conv_in, self.mid = same(d.conv_in), VAEMidBlockANE(d.mid_block)
        self.up_blocks = nn.ModuleList(same(b) for b in d.up_blocks)
        self.norm, self.act, self.conv_out = same(d.conv_norm_out), same(d.conv_act), same(d.conv_out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(self.post_quant_conv(z)))  # (1, C, h, w)
        for block in self.up_blocks:
            x = block(x, None)  # upsampled x2 but the last
        return self.conv_out(self.act(self.norm(x)))  # (1, 3, 8h, 8w)


class EncoderANE(nn.Module):
    """diffusers' Encoder + quant_conv: image (1, 3, 8h, 8w) -> moments (1, 2*4, h, w) (mean, log-variance)."""

    def __init__(self, vae):
        super().__init__()
        e = vae.encoder
        if e.conv_out.out_channels != 2 * vae.config.latent_channels:
            raise ValueError("only a VAE encoder with a double (mean, log-variance) output has a Core ML graph")
        self.conv_in, self.mid = same(e.conv_in), VAEMidBlockANE(e.mid_block)
        self.down_blocks = nn.ModuleList(same(b) for b in e.down_blocks)
        self.norm, self.act, self.conv_out = same(e.conv_norm_out), same(e.conv_act), same(e.conv_out)
        self.quant_conv = same(vae.quant_conv) if vae.quant_conv is not None else nn.Identity()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(image)  # (1, C, 8h, 8w)
        for block in self.down_blocks:
            x = block(x)  # downsampled x2 but the last
        x = self.conv_out(self.act(self.norm(self.mid(x))))  # (1, 8, h, w)
        return self.quant_conv(x)  # (1, 8, h, w)
