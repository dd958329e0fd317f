"""A VAE decoder for tiled decoding whose GroupNorm statistics can be shared between tiles.

Decoded alone, a tile normalises with its own GroupNorm statistics, and a tile of plain background comes
out in other colours than the same pixels decoded whole. This graph takes the statistics from outside:

    inputs   latent_sample (1, C, h, w), gn_stats (L, 2, G) per GroupNorm: mean and mean of squares,
             gn_mix (1,): 0 = the tile's own statistics (exactly the plain decoder), 1 = gn_stats
    outputs  sample (1, 3, 8h, 8w), gn_local (L, 2, G): the statistics this input produced

The runtime (edge/vae_tiling.py) decodes every tile once with its own statistics, averages them over
the image, and decodes again with the averages (and again, if asked), so every tile normalises as the
whole image would. The modules are built explicitly around the diffusers decoder's own GroupNorms; the
decoder itself is not modified (its GroupNorms are swapped only inside `forward`).
"""

from __future__ import annotations

import torch


class _SharedStatsNorm(torch.nn.Module):
    """One GroupNorm that blends its own statistics with given ones and reports its own."""

    def __init__(self, norm: torch.nn.GroupNorm, index: int, context: dict):
        super().__init__()
        self.norm, self.index, self.context = norm, index, context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        g = self.norm.num_groups
        grouped = x.reshape(b, g, -1)  # (B, G, C/G * H * W)
        mean = grouped.mean(dim=2)  # (B, G)
        msq = (grouped * grouped).mean(dim=2)  # (B, G)
        self.context["local"][self.index] = torch.stack([mean[0], msq[0]])  # (2, G)
        mix = self.context["mix"]
        given = self.context["given"][self.index]  # (2, G)
        mean_used = mix * given[0] + (1 - mix) * mean  # (B, G)
        var_used = mix * given[1] + (1 - mix) * msq - mean_used * mean_used
        out = (grouped - mean_used[..., None]) / torch.sqrt(var_used[..., None] + self.norm.eps)
        out = out.reshape(x.shape)  # (B, C, H, W), or (B, C, S) in the mid-block attention
        if self.norm.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            out = out * self.norm.weight.reshape(shape) + self.norm.bias.reshape(shape)
        return out


class SharedStatsVaeDecoder(torch.nn.Module):
    """`vae.decode` with every decoder GroupNorm replaced by `_SharedStatsNorm` for the call."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.names = [n for n, m in vae.decoder.named_modules() if isinstance(m, torch.nn.GroupNorm)]
        groups = {dict(vae.decoder.named_modules())[n].num_groups for n in self.names}
        if len(groups) != 1:
            raise ValueError(f"the VAE decoder's GroupNorms use {sorted(groups)} groups; shared statistics "
                             "need one group count")
        self.groups = groups.pop()

    @property
    def layers(self) -> int:
        return len(self.names)

    def forward(self, latent_sample: torch.Tensor, gn_stats: torch.Tensor,
                gn_mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = {"given": gn_stats, "mix": gn_mix, "local": {}}
        modules = dict(self.vae.decoder.named_modules())
        originals = {n: modules[n] for n in self.names}
        try:
            for k, n in enumerate(self.names):
                _set(self.vae.decoder, n, _SharedStatsNorm(originals[n], k, context))
            image = self.vae.decode(latent_sample, return_dict=False)[0]  # (1, 3, 8h, 8w)
        finally:
            for n, m in originals.items():
                _set(self.vae.decoder, n, m)
        if len(context["local"]) != self.layers:
            raise RuntimeError(f"expected {self.layers} GroupNorm calls, saw {len(context['local'])}")
        return image, torch.stack([context["local"][k] for k in range(self.layers)])  # (L, 2, G)


def _set(root: torch.nn.Module, dotted: str, module: torch.nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
