"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"), at export.

Self-attention costs the square of the token count, and at a UNet's highest resolution (SD 1.5 at 512 px: 4,096
tokens) neighbouring tokens are often near copies of each other. ToMe merges the most similar ones before the
self-attention (attn1) of each transformer block there and copies the results back after it, so attention runs
on (1 - ratio) of the tokens; cross-attention and the MLP see every token. The variant is tomesd's default with
its randomness off (`use_rand=False`), so the graph is deterministic and torch and ONNX compute the same thing:

- destinations: one per 2x2 window of the latent, its top-left token (a latent side that is odd leaves its
  last row or column all sources);
- matching: each source's most similar destination by cosine similarity of the block's input tokens; the
  `r = floor(ratio * tokens)` sources most similar to theirs are merged (bipartite soft matching);
- merge: a destination becomes the mean of itself and the sources merged into it;
- unmerge: every merged source gets its destination's output.

The latent size is read from each transformer's input at run time, so the exported UNet keeps dynamic height
and width. Installed with forward hooks on diffusers' own modules (the block, its transformer, attn1), so it
composes with whichever attention processor (kernels/processor.py) computes the attention itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from edge.validate import TOKEN_MERGING_MAX, TOKEN_MERGING_RULE

STRIDE = 2  # destination windows are STRIDE x STRIDE tokens
MAX_RATIO, RATIO_RULE = TOKEN_MERGING_MAX, TOKEN_MERGING_RULE  # edge.validate's, which the CLI checks with
assert MAX_RATIO == 1 - 1 / STRIDE ** 2  # with one destination per window, at most 3 tokens of 4 can merge
_PPM = 1_000_000  # r = tokens * ratio in integer parts per million: the same r in torch and in the exported graph
METHOD = ("ToMe (Bolya & Hoffman 2023): self-attention (attn1) at the highest resolution; one fixed destination "
          "per 2x2 window; bipartite soft matching by cosine similarity; merge by mean, unmerge by copy")


@dataclass
class Matching:
    """Which tokens merge where, for one block call: index tensors shared by merge() and unmerge()."""

    kept: torch.Tensor  # (B, U) positions of the sources left as they are
    merged: torch.Tensor  # (B, r) positions of the sources merged away
    dst: torch.Tensor  # (D,) positions of the destinations (the same for every image)
    into: torch.Tensor  # (B, r) which destination (0..D-1) each merged source joins
    counts: torch.Tensor  # (B, D, 1) float64: tokens averaged into each destination, itself included
    back: torch.Tensor  # (B, N) for every original position, its row in the merged sequence


def match(metric: torch.Tensor, h: Any, w: Any, ratio: float) -> Matching:
    """Bipartite soft matching of `metric` (B, N = h*w, C) tokens; `h`, `w` ints, or shape tensors when traced."""
    assert 0 <= ratio <= MAX_RATIO, f"token merging ratio {ratio} outside [0, {MAX_RATIO}]"
    b, n, _ = metric.shape
    pos = torch.arange(n, device=metric.device)  # (N,)
    row, col = pos // w, pos % w
    rows, cols = (h // STRIDE) * STRIDE, (w // STRIDE) * STRIDE  # the part of the latent that whole windows cover
    is_dst = (row % STRIDE == 0) & (col % STRIDE == 0) & (row < rows) & (col < cols)  # (N,)
    order = torch.argsort(is_dst.to(torch.int64) * n + pos)  # (N,) sources, then destinations; keys unique
    d = (h // STRIDE) * (w // STRIDE)
    s = n - d
    src, dst = order[:s], order[s:]  # (S,), (D,)

    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)  # (B, N, C)
        scores = unit[:, src] @ unit[:, dst].transpose(1, 2)  # (B, S, D) cosine similarities
        best, best_dst = scores.max(dim=-1)  # (B, S) each source's most similar destination
        rank = best.argsort(dim=-1, descending=True)  # (B, S)
    r = n * round(ratio * _PPM) // _PPM  # <= S, as ratio <= MAX_RATIO
    u = s - r
    merged_src, kept_src = rank[:, :r], rank[:, r:]  # (B, r), (B, U) indices into src
    src_b = src.unsqueeze(0).expand(b, s)  # (B, S)
    merged, kept = src_b.gather(1, merged_src), src_b.gather(1, kept_src)  # (B, r), (B, U) positions
    into = best_dst.gather(1, merged_src)  # (B, r)
    counts = torch.ones(b, d, 1, dtype=torch.float64, device=metric.device)  # (B, D, 1); float64: see merge()
    counts = counts.scatter_add(1, into.unsqueeze(-1), torch.ones_like(into, dtype=torch.float64).unsqueeze(-1))
    # Rows of the merged sequence [kept sources (U) | destinations (D)] each original position reads back.
    back = torch.zeros(b, n, dtype=torch.int64, device=metric.device)  # (B, N)
    back = back.scatter(1, kept, torch.arange(u, device=metric.device).unsqueeze(0).expand(b, u))
    back = back.scatter(1, merged, u + into)
    back = back.scatter(1, dst.unsqueeze(0).expand(b, d), u + torch.arange(d, device=metric.device).expand(b, d))
    return Matching(kept=kept, merged=merged, dst=dst, into=into, counts=counts, back=back)


def merge(x: torch.Tensor, m: Matching) -> torch.Tensor:
    """(B, N, C) tokens -> (B, N - r, C): the kept sources, then each destination averaged with its merged sources."""
    c = x.shape[-1]
    kept = x.gather(1, m.kept.unsqueeze(-1).expand(-1, -1, c))  # (B, U, C)
    moved = x.gather(1, m.merged.unsqueeze(-1).expand(-1, -1, c))  # (B, r, C)
    dst = x[:, m.dst]  # (B, D, C)
    # Summed in float64: onnxruntime's CPU ScatterElements cannot add fp16, and the fp16 bundle conversion
    # (converters/quantize.py) lowers float32 tensors only, so this sum stays one it can run.
    sums = dst.double().scatter_add(1, m.into.unsqueeze(-1).expand(-1, -1, c), moved.double())  # (B, D, C)
    dst = (sums / m.counts).to(x.dtype)  # (B, D, C) means
    return torch.cat([kept, dst], dim=1)  # (B, N - r, C)


def unmerge(y: torch.Tensor, m: Matching) -> torch.Tensor:
    """(B, N - r, C) -> (B, N, C): every token takes its row of the merged sequence (a merged source: its
    destination's)."""
    return y.gather(1, m.back.unsqueeze(-1).expand(-1, -1, y.shape[-1]))  # (B, N, C)


@dataclass
class _State:
    """One transformer's ToMe state during a call: its latent size, then the current block's matching."""

    ratio: float
    hw: tuple[Any, Any] | None = None
    matching: Matching | None = None


@dataclass
class TokenMerging:
    """ToMe as installed on a UNet: the ratio, the blocks it merges in, and the hooks (remove() takes them out)."""

    ratio: float
    blocks: list[str]
    handles: list[Any] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def highest_resolution_transformers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The Transformer2DModels that run at the latent's own size: the first down block's and the last up block's
    (tomesd's max_downsample=1; in SD 1.5 down_blocks.0 and up_blocks.3, 4,096 tokens at 512 px)."""
    levels = [("down_blocks.0", unet.down_blocks[0]), (f"up_blocks.{len(unet.up_blocks) - 1}", unet.up_blocks[-1])]
    return [(f"{name}.attentions.{k}", t) for name, block in levels
            for k, t in enumerate(getattr(block, "attentions", None) or [])]


def install_token_merging(unet: torch.nn.Module, ratio: float) -> TokenMerging:
    """Merge tokens before attn1 of every transformer block at the UNet's highest resolution; undone by remove()."""
    from diffusers.models.attention import BasicTransformerBlock

    if not 0 < ratio <= MAX_RATIO:
        raise ValueError(f"token merging ratio {ratio}: expected {RATIO_RULE}")
    transformers = highest_resolution_transformers(unet)
    blocks = [(f"{name}.transformer_blocks.{k}", t, b) for name, t in transformers
              for k, b in enumerate(getattr(t, "transformer_blocks", []))]
    if not blocks or not all(isinstance(b, BasicTransformerBlock) for _, _, b in blocks):
        raise ValueError(f"token merging: {type(unet).__name__} has no diffusers BasicTransformerBlock at its highest "
                         "resolution (its first down block and last up block); there is nothing to merge")
    if not all(getattr(t, "is_input_continuous", True) for _, t, _ in blocks):
        raise ValueError("token merging: a transformer at the highest resolution does not take (B, C, H, W) features")
    tome = TokenMerging(ratio=ratio, blocks=[name for name, _, _ in blocks])
    states: dict[int, _State] = {}  # one per transformer: its blocks run one after another and share its size
    for _, transformer, block in blocks:
        first = id(transformer) not in states
        state = states.setdefault(id(transformer), _State(ratio))
        tome.handles += _hook(transformer, block, state, first)
    return tome


def _positional(module: torch.nn.Module, args: tuple) -> torch.Tensor:
    if not args:
        raise RuntimeError(f"token merging: {type(module).__name__} was called with hidden_states by keyword; the "
                           "hooks expect it first and positional, as diffusers' UNet blocks pass it")
    return args[0]


def _hook(transformer: torch.nn.Module, block: torch.nn.Module, state: _State, first: bool) -> list[Any]:
    """Hooks for one block (and, for the first block of a transformer, the one that reads its latent size)."""
    handles = []
    if first:
        def size(module, args):
            x = _positional(module, args)  # (B, C, H, W)
            state.hw = (x.shape[-2], x.shape[-1])

        handles.append(transformer.register_forward_pre_hook(size))

    def matching(module, args):
        state.matching = match(_positional(module, args), *state.hw, state.ratio)  # the block's input (B, N, C)

    def merged(module, args):
        return (merge(_positional(module, args), state.matching), *args[1:])  # (B, N - r, C)

    def unmerged(module, args, out):
        return unmerge(out, state.matching)  # (B, N, C)

    handles.append(block.register_forward_pre_hook(matching))
    handles.append(block.attn1.register_forward_pre_hook(merged))
    handles.append(block.attn1.register_forward_hook(unmerged))
    return handles


def versus_unmerged(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], tome: TokenMerging) -> dict[str, Any]:
    """The manifest's record of the merging; removes it from the UNet `module` wraps, after measuring how far its
    output moved from the unmerged UNet's on `inputs` (the approximation ToMe makes, as PSNR)."""
    from edge.metrics import psnr

    with torch.no_grad():
        merged = module(*inputs)  # (B, C, h, w)
        tome.remove()
        plain = module(*inputs)
    return {"ratio": tome.ratio, "blocks": tome.blocks, "method": METHOD,
            "psnr_vs_unmerged_db": round(psnr(plain.numpy(), merged.numpy()), 2),
            "psnr_inputs": {"what": "the parity inputs (random latents, timesteps and context)",
                            "shapes": [list(x.shape) for x in inputs]}}
