"""Per-token weights applied to the text encoder's output, by A1111's rule and by compel's, in numpy.

- A1111 (modules/sd_emphasis.py, "Original"): per window, multiply each token's hidden state by its weight,
  then rescale the window so the mean over all its (tokens, dim) values is what it was before.
- compel (embeddings_provider.py, Compel's defaults for SD 1.x): per window, move each weighted token's hidden
  state away from the empty prompt's (empty + (z - empty) * w). A fragment weighted below 1 is also faded out:
  the prompt is re-encoded without it (its tokens masked out of attention, or, with downweight="remove", deleted)
  and the two are lerped with weight tan((1 - w) * pi / 2), so w = 0.5 lands half way and w -> 0 removes it.
  `.and()` scales each part away from the empty prompt by its weight and concatenates; `.blend()` sums the
  parts' conditionings with the (normalised) weights.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..tokenizer import ClipTokenizer
from .parsed import Blend, Fragment, Fragments, ParsedPrompt
from .windows import Windows

TextEncoder = Callable[[np.ndarray], np.ndarray]  # (1, 77) int64 ids -> (1, 77, D) float32
MaskedTextEncoder = Callable[[np.ndarray, np.ndarray], np.ndarray]  # ids, mask (1, 77) int64, 1 = attend
DOWNWEIGHTS = ("mask", "remove")
LERP_EPSILON = 1e-5  # compel's floor on a down-weight, so tan() stays finite


class Encoder:
    """The caller's text encoder, checked and memoised per window: compel encodes the empty window and the same
    windows again under masks, and a negative prompt often shares windows with the positive."""

    def __init__(self, encode: TextEncoder, encode_masked: MaskedTextEncoder | None, tokenizer: ClipTokenizer):
        self._encode, self._masked, self._tok = encode, encode_masked, tokenizer
        self._memo: dict[tuple[bytes, bytes | None], np.ndarray] = {}

    @property
    def can_mask(self) -> bool:
        return self._masked is not None

    def __call__(self, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """ids (77,) int64, mask (77,) or None -> hidden states (77, D) float32."""
        mask = None if mask is None or mask.all() else mask.astype(np.int64)
        key = (ids.tobytes(), None if mask is None else mask.tobytes())
        if key not in self._memo:
            if mask is None:
                out = self._encode(ids[None])  # (1, 77, D)
            elif self._masked is None:
                raise ValueError("compel's masked down-weighting needs encode_masked; pass downweight='remove'")
            else:
                out = self._masked(ids[None], mask[None])  # (1, 77, D)
            out = np.asarray(out)
            if out.ndim != 3 or out.shape[:2] != (1, ids.shape[0]):
                raise ValueError(f"the text encoder returned shape {out.shape} for ids of shape (1, {ids.shape[0]}); "
                                 "expected (1, 77, D), the last hidden state")
            self._memo[key] = out[0].astype(np.float32, copy=False)  # (77, D)
        return self._memo[key]

    def empty(self) -> np.ndarray:
        """The empty prompt, [BOS, EOS, PAD...]: the padding window and compel's reference point. (77, D)"""
        size = self._tok.max_length
        ids = np.full(size, self._tok.pad_id, dtype=np.int64)  # (77,)
        ids[:2] = self._tok.bos_id, self._tok.eos_id
        return self(ids)


def plain_conditioning(win: Windows, enc: Encoder) -> np.ndarray:
    """Unweighted windows, concatenated. (1, 77k, D)"""
    return np.concatenate([enc(ids) for ids in win.ids])[None]


def a1111_conditioning(win: Windows, enc: Encoder) -> np.ndarray:
    """A1111's rule, window by window. (1, 77k, D)

    Where the weighted window's mean is ~0 next to its values (a text encoder whose final layer norm has no bias
    makes every token's mean 0), A1111's rescale divides 0 by 0 and its picture is NaN, black: such a window is
    kept weighted but not rescaled, and a window of weights 1 is the plain encoding, exactly."""
    out = []
    for ids, weights in zip(win.ids, win.weights):
        z = enc(ids)  # (77, D)
        weighted = z * weights[:, None]  # (77, D)
        new = weighted.mean()
        if np.all(weights == 1) or abs(new) <= 1e-6 * np.abs(weighted).mean():
            out.append(weighted)
        else:
            out.append(weighted * (z.mean() / new))  # (77, D)
    return np.concatenate(out)[None]


def _compel_weighted(win: Windows, enc: Encoder, mask: np.ndarray | None = None) -> np.ndarray:
    """compel's build_weighted_embedding_tensor: tokens of weight exactly 1 keep their state. (77k, D)"""
    empty = enc.empty()  # (77, D)
    out = []
    for w, ids in enumerate(win.ids):
        z = enc(ids, None if mask is None else mask[w])  # (77, D)
        weights = win.weights[w][:, None]  # (77, 1)
        out.append(z if np.all(weights == 1) else np.where(weights == 1, z, empty + (z - empty) * weights))
    return np.concatenate(out)  # (77k, D)


def compel_sequence(fragments: Fragments, layout: Callable[[Fragments], Windows], enc: Encoder,
                    downweight: str) -> np.ndarray:
    """One token sequence by compel's get_embeddings_for_weighted_prompt_fragments. (1, 77k, D)"""
    win = layout(fragments)
    size = win.ids.shape[1]
    base = _compel_weighted(win, enc)  # (77k, D)
    embeddings, lerps = [base], [1.0]
    for f, fragment in enumerate(fragments):
        assert isinstance(fragment, Fragment)
        if fragment.weight >= 1 or win.spans[f] is None:
            continue
        if downweight == "mask":
            mask = np.ones(win.ids.size, dtype=np.int64)  # (77k,)
            first, last = win.spans[f]
            mask[first:last + 1] = 0
            mask[0::size] = mask[size - 1::size] = 1  # compel keeps every window's BOS and last slot
            without = _compel_weighted(win, enc, mask.reshape(win.ids.shape))  # (77k, D)
        else:
            other = layout(fragments[:f] + fragments[f + 1:])
            without = _fit(_compel_weighted(other, enc), len(base), enc.empty())  # (77k, D)
        embeddings.append(without)
        lerps.append(math.tan((1.0 - max(LERP_EPSILON, fragment.weight)) * math.pi / 2))
    shares = np.asarray(lerps, dtype=np.float32)
    shares = shares / shares.sum()
    return np.einsum("e,etd->td", shares, np.stack(embeddings))[None]  # (1, 77k, D)


def _fit(z: np.ndarray, length: int, empty: np.ndarray) -> np.ndarray:
    """Removing a fragment can change how many windows a long prompt takes (compel then fails on the shape):
    pad with empty windows, or cut, to the prompt's own length. (length, D)"""
    while len(z) < length:
        z = np.concatenate([z, empty])
    return z[:length]


def compel_conditioning(parsed: ParsedPrompt, sequence: Callable[[Fragments], np.ndarray],
                        empty: np.ndarray) -> np.ndarray:
    """Compel.build_conditioning_tensor_for_conjunction: each part (a sequence or a Blend) scaled away from the
    empty prompt by its weight, then concatenated. (1, L, D)"""
    parts = []
    for part, weight in zip(parsed.parts, parsed.weights):
        c = _blend(part, sequence, empty) if isinstance(part, Blend) else sequence(part)  # (1, 77k, D)
        if weight != 1:
            e = np.tile(empty, (c.shape[1] // len(empty), 1))[None]  # (1, 77k, D)
            c = e + (c - e) * np.float32(weight)
        parts.append(c)
    return np.concatenate(parts, axis=1)


def _blend(blend: Blend, sequence: Callable[[Fragments], np.ndarray], empty: np.ndarray) -> np.ndarray:
    """The weighted sum of the blended prompts, padded to one length. (1, 77k, D)"""
    conds = pad_to_same_length([sequence(p) for p in blend.prompts], empty[None])
    weights = np.asarray(blend.weights, dtype=np.float32)
    if blend.normalize:
        if weights.sum() == 0:
            raise ValueError(f".blend() weights {list(blend.weights)} sum to 0 and cannot be normalised; change "
                             "them or add no_normalize")
        weights = weights / weights.sum()
    return np.einsum("p,ptd->td", weights, np.concatenate(conds))[None]


def pad_to_same_length(conditionings: Sequence[np.ndarray], empty: np.ndarray) -> list[np.ndarray]:
    """Conditionings (B, 77k, D) of different k brought to the longest by appending empty-prompt windows
    `empty` (1, 77, D), as compel's pad_conditioning_tensors_to_same_length and A1111's pad_cond do, so a
    positive and a negative prompt can share one UNet batch."""
    empty = np.asarray(empty, dtype=np.float32)
    if empty.ndim != 3 or empty.shape[0] != 1:
        raise ValueError(f"empty conditioning has shape {empty.shape}; expected (1, 77, D), from encode_empty()")
    size, dim = empty.shape[1:]
    for c in conditionings:
        if c.ndim != 3 or c.shape[1] % size or c.shape[2] != dim:
            raise ValueError(f"conditioning of shape {c.shape}; expected (B, {size}*k, {dim})")
    longest = max(c.shape[1] for c in conditionings)
    out = []
    for c in conditionings:
        missing = (longest - c.shape[1]) // size  # windows to add
        out.append(np.concatenate([c, np.tile(empty, (c.shape[0], missing, 1))], axis=1) if missing else c)
    return out
