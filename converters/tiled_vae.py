"""The VAE decoder cut in two for tiled decoding: a head run whole, and a tail run tile by tile whose
GroupNorm statistics are shared between tiles.

A tile decoded alone differs from the same pixels decoded whole in two ways: every GroupNorm normalises
with the tile's statistics instead of the image's, and the mid-block attention attends only within the
tile. So the decoder is split where its resolution starts to grow:

    vae_decoder_head   latent_sample (1, C, h, w) -> hidden (1, M, 2h, 2w)
                       post_quant_conv, conv_in, the mid block (resnets + attention) and the first up
                       block (HEAD_UP_BLOCKS), at up to twice the latent resolution: small activations,
                       so it always runs on the whole latent, and is exact.
    vae_decoder_tiled  hidden (1, M, th, tw), gn_stats (L, 2, G), gn_mix (L,), gn_weight (1, 1, th, tw)
                         -> sample (1, 3, 4th, 4tw), gn_local (L, 2, G)
                       the up blocks and output layers, where the activations (and the memory) are;
                       every GroupNorm blends its own statistics (mean, mean of squares per group) with
                       the given ones, per layer: gn_mix 0 = the tile's own (exactly the plain decoder), 1 = given.
                       gn_local reports each GroupNorm's input statistics weighted by gn_weight (the
                       tile's share of each pixel in the blend), so that their sum over tiles is exactly
                       the whole image's; a plain mean over each tile would count overlaps twice.

The runtime (edge/vae_tiling.py) runs the head once, then the tail over tiles of `hidden` once to pool
their statistics and again with them, so every tile normalises as the whole image would. What is left
between tiled and whole decoding is the convolutions' zero padding at tile borders, which the overlap
and the blend absorb. The modules are built explicitly around the diffusers decoder's own layers; the
decoder itself is not modified (its GroupNorms are swapped only inside the tail's `forward`).
"""

from __future__ import annotations

import torch


class _SharedStatsNorm(torch.nn.Module):
    """One GroupNorm that blends its own statistics with given ones, and reports its own weighted by the
    tile's blend weights (so that the runtime's pooled statistics are exactly the whole image's)."""

    def __init__(self, norm: torch.nn.GroupNorm, index: int, context: dict):
        super().__init__()
        self.norm, self.index, self.context = norm, index, context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.norm.num_groups
        grouped = x.reshape(b, g, -1)  # (B, G, C/G * H * W)
        mean = grouped.mean(dim=2)  # (B, G)
        msq = (grouped * grouped).mean(dim=2)  # (B, G)
        weight = torch.nn.functional.interpolate(self.context["weight"], size=(h, w), mode="nearest")  # (1, 1, H, W)
        weight = weight.reshape(1, 1, 1, h * w)
        per_channel = x.reshape(b, g, c // g, h * w)  # (B, G, C/G, H * W)
        total = weight.sum() * (c // g)
        reported = torch.stack([(per_channel * weight).sum(dim=(2, 3))[0] / total,
                                (per_channel * per_channel * weight).sum(dim=(2, 3))[0] / total])  # (2, G)
        self.context["local"][self.index] = reported
        mix = self.context["mix"][self.index]  # ()
        given = self.context["given"][self.index]  # (2, G)
        mean_used = mix * given[0] + (1 - mix) * mean  # (B, G)
        var_used = mix * given[1] + (1 - mix) * msq - mean_used * mean_used
        out = (grouped - mean_used[..., None]) / torch.sqrt(var_used[..., None] + self.norm.eps)
        out = out.reshape(x.shape)  # (B, C, H, W)
        if self.norm.affine:
            out = out * self.norm.weight.reshape(1, c, 1, 1) + self.norm.bias.reshape(1, c, 1, 1)
        return out


HEAD_UP_BLOCKS = 1  # up blocks run whole, in the head: SD at 512 px, a (1, 512, 128, 128) output, 32 MB


class VaeDecoderHead(torch.nn.Module):
    """The decoder up to its first `up_blocks` up blocks: (1, C, h, w) -> (1, M, 2^k h, 2^k w)."""

    def __init__(self, vae: torch.nn.Module, up_blocks: int = HEAD_UP_BLOCKS):
        super().__init__()
        if not 0 <= up_blocks < len(vae.decoder.up_blocks):
            raise ValueError(f"the head can take 0 to {len(vae.decoder.up_blocks) - 1} up blocks, not {up_blocks}")
        self.vae, self.up_blocks = vae, up_blocks

    @property
    def channels(self) -> int:
        decoder = self.vae.decoder
        if self.up_blocks == 0:
            return decoder.conv_in.out_channels
        return decoder.up_blocks[self.up_blocks - 1].resnets[-1].out_channels

    @property
    def upscale(self) -> int:
        """Head output pixels per latent pixel."""
        return 2 ** self.up_blocks

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        z = latent_sample
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)  # (1, C, h, w)
        decoder = self.vae.decoder
        x = decoder.mid_block(decoder.conv_in(z), None)  # (1, M, h, w)
        for block in decoder.up_blocks[: self.up_blocks]:
            x = block(x)  # each doubles the resolution (all but the last up block upsample)
        return x  # (1, M, 2^k h, 2^k w)


class SharedStatsVaeDecoderTail(torch.nn.Module):
    """The decoder after its mid block, every GroupNorm replaced by `_SharedStatsNorm` for the call."""

    def __init__(self, vae: torch.nn.Module, up_blocks: int = HEAD_UP_BLOCKS):
        super().__init__()
        self.vae, self.first = vae, up_blocks  # the first up block that runs here
        decoder = vae.decoder
        mine = tuple(f"up_blocks.{k}." for k in range(up_blocks, len(decoder.up_blocks))) + ("conv_norm_out",)
        self.names = [n for n, m in decoder.named_modules() if isinstance(m, torch.nn.GroupNorm) and n.startswith(mine)]
        groups = {decoder.get_submodule(n).num_groups for n in self.names}
        if len(groups) != 1:
            raise ValueError(f"the VAE decoder's GroupNorms use {sorted(groups)} groups; shared statistics "
                             "need one group count")
        self.groups = groups.pop()

    @property
    def layers(self) -> int:
        return len(self.names)

    def forward(self, hidden: torch.Tensor, gn_stats: torch.Tensor, gn_mix: torch.Tensor,
                gn_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = {"given": gn_stats, "mix": gn_mix, "weight": gn_weight, "local": {}}
        decoder = self.vae.decoder
        originals = {n: decoder.get_submodule(n) for n in self.names}
        try:
            for k, n in enumerate(self.names):
                _set(decoder, n, _SharedStatsNorm(originals[n], k, context))
            x = hidden  # (1, M, 2^k h, 2^k w)
            for block in decoder.up_blocks[self.first :]:
                x = block(x)  # resolution doubles per block but the last
            image = decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x)))  # (1, 3, 8h, 8w)
        finally:
            for n, m in originals.items():
                _set(decoder, n, m)
        if len(context["local"]) != self.layers:
            raise RuntimeError(f"expected {self.layers} GroupNorm calls, saw {len(context['local'])}")
        return image, torch.stack([context["local"][k] for k in range(self.layers)])  # (L, 2, G)


def _set(root: torch.nn.Module, dotted: str, module: torch.nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
