"""Tiled VAE decoding: decode a large latent in overlapping tiles and cross-fade the overlaps.

The VAE decoder's activations grow with the image; decoding in tiles caps the peak at one tile's worth.
Neighbouring tiles overlap, and in each overlap the two are blended with weights that ramp linearly
from one tile to the other, so no seam shows. Pure numpy; `decode` is any callable, e.g. an
onnxruntime session wrapped in a lambda.

The blend alone is exact only for a decoder without global operations. An SD VAE's GroupNorms and its
mid-block attention see only the tile, so with `decode_tiled` each tile's colours drift from the full
decode. `decode_tiled_shared` runs the decoder cut in two (edge.converters.tiled_vae): the mid block on the
whole latent, and the rest per tile with the whole image's GroupNorm statistics, pooled from the tiles.
Measured on the default model: benchmarks/RESULTS.md ("Tiled VAE decoding").
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

Decode = Callable[[np.ndarray], np.ndarray]  # (1, C, th, tw) latent tile -> (1, 3, th*scale, tw*scale) image


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest `tile`-long tiles covering [0, size), neighbours sharing >= `overlap` pixels.

    The tiles are spread evenly, so the first starts at 0 and the last ends exactly at `size`.
    """
    for name, value, low in (("size", size, 1), ("tile", tile, 1), ("overlap", overlap, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    if overlap >= tile:
        raise ValueError(f"overlap must be smaller than tile, got overlap={overlap} with tile={tile}")
    if tile >= size:
        return [0]
    n = 1 + math.ceil((size - tile) / (tile - overlap))  # stride (size - tile) / (n - 1) <= tile - overlap
    return [i * (size - tile) // (n - 1) for i in range(n)]


def tiled_peak_tile(h: int, w: int, tile: int) -> tuple[int, int]:
    """The largest latent tile `decode_tiled` passes to `decode`, for the memory planner."""
    if not isinstance(tile, (int, np.integer)) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tile must be a whole number >= 1, got {tile!r}")
    return min(tile, h), min(tile, w)


def _ramp(starts: list[int], tile: int, size: int, scale: int) -> list[np.ndarray]:
    """Per tile along one axis, its blend weight for each image pixel: (tile*scale,) in (0, 1].

    The weight rises linearly across the overlap with the previous tile and falls across the overlap
    with the next, so two overlapping ramps sum to 1; a side on the image border stays at 1.
    """
    length = min(tile, size) * scale
    x = np.arange(length, dtype=np.float32) + 0.5  # pixel centres
    weights = []
    for i, start in enumerate(starts):
        w = np.ones(length, dtype=np.float32)
        if i > 0:  # overlap with the previous tile: [start, end of previous)
            rise = (starts[i - 1] + tile - start) * scale
            w = np.minimum(w, x / rise) if rise > 0 else w
        if i < len(starts) - 1:  # overlap with the next tile: [start of next, end of this)
            fall = (start + tile - starts[i + 1]) * scale
            w = np.minimum(w, (length - x) / fall) if fall > 0 else w
        weights.append(w)
    return weights


def decode_tiled(decode: Decode, latents: np.ndarray, tile: int, overlap: int, scale: int) -> np.ndarray:
    """Decode (1, C, h, w) latents, already divided by the VAE scaling factor, tile by tile.

    Each tile's image is weighted by the outer product of its row and column ramps, and the sum of
    weighted images is divided by the sum of weights, so every pixel is a convex blend of the tiles over it.
    """
    latents = np.asarray(latents, dtype=np.float32)
    if latents.ndim != 4 or latents.shape[0] != 1:
        raise ValueError(f"latents must have shape (1, C, h, w), got {latents.shape}")
    if not isinstance(scale, (int, np.integer)) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a whole number >= 1 (image pixels per latent pixel), got {scale!r}")
    _, _, h, w = latents.shape
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:  # one tile: nothing to blend
        return _decode_checked(decode, latents, scale)

    row_w, col_w = _ramp(rows, tile, h, scale), _ramp(cols, tile, w, scale)
    th, tw = tiled_peak_tile(h, w, tile)
    image = np.zeros((1, 3, h * scale, w * scale), dtype=np.float32)  # (1, 3, H, W) sum of weight * tile
    total = np.zeros((h * scale, w * scale), dtype=np.float32)  # (H, W) sum of weights
    for r, wr in zip(rows, row_w):
        for c, wc in zip(cols, col_w):
            part = _decode_checked(decode, latents[:, :, r : r + th, c : c + tw], scale)  # (1, 3, th*s, tw*s)
            weight = np.outer(wr, wc)  # (th*s, tw*s)
            ys, xs = slice(r * scale, (r + th) * scale), slice(c * scale, (c + tw) * scale)
            image[:, :, ys, xs] += part * weight
            total[ys, xs] += weight
    return image / total  # (1, 3, H, W); every pixel has weight > 0


# (tile, gn_stats, gn_mix, gn_weight) -> (image tile, the tile's statistics weighted by gn_weight)
# (tile, gn_stats (L, 2, G), gn_mix: one float for every layer or (L,), gn_weight) -> (image, statistics)
StatsDecode = Callable[[np.ndarray, np.ndarray, "float | np.ndarray", np.ndarray], tuple[np.ndarray, np.ndarray]]


def decode_tiled_shared(decode: StatsDecode, latents: np.ndarray, tile: int, overlap: int, scale: int,
                        stats_shape: tuple[int, int, int], passes: int = 2, layerwise: bool = False) -> np.ndarray:
    """`decode_tiled` with the GroupNorm statistics of the whole image shared by every tile.

    `decode(tile, gn_stats, gn_mix, gn_weight)` -> (image tile, the tile's statistics (L, 2, G) weighted by
    gn_weight (1, 1, th, tw)) is the tail of a decoder cut by edge.converters.tiled_vae (`latents` are then
    the head's output). Each tile's weight map is its share of every pixel in the blend (the shares of all
    tiles sum to 1 at every pixel), so the tiles' statistics, summed by share, are the whole image's.
    Pass 1 decodes every tile with its own statistics; each later pass decodes with the previous pooled
    statistics and pools again, which corrects deeper layers, whose inputs depend on the normalisation of
    earlier ones; the last pass's tiles are blended. `passes` passes cost `passes` tiled decodes.

    `layerwise` fixes the statistics one GroupNorm at a time instead: pass k normalises layers < k with the
    pooled statistics found so far and pools layer k's, whose input is then exactly the whole image's, so
    after L passes every layer's statistics are the whole decode's (L + 1 tiled decodes; `passes` is not
    used). Two passes are enough on latents the size the model was trained at (36-43 dB on the default
    model); on larger ones an early layer's error grows through the later ones (14-24 dB at 1.5x), and
    only this schedule holds (40-54 dB); benchmarks/RESULTS.md, "Tiled VAE decoding".
    """
    if passes < 2 and not layerwise:
        raise ValueError(f"passes must be >= 2 (one to gather statistics, one to apply them), got {passes}")
    latents = np.asarray(latents, dtype=np.float32)
    _, _, h, w = latents.shape
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = tiled_peak_tile(h, w, tile)
    row_s, col_s = _ramp(rows, tile, h, 1), _ramp(cols, tile, w, 1)  # blend weights at latent resolution
    cover = np.zeros((h, w), np.float32)
    for r, wr in zip(rows, row_s):
        for c, wc in zip(cols, col_s):
            cover[r : r + th, c : c + tw] += np.outer(wr, wc)
    weights = {(r, c): (np.outer(wr, wc) / cover[r : r + th, c : c + tw])[None, None].astype(np.float32)
               for r, wr in zip(rows, row_s) for c, wc in zip(cols, col_s)}  # (1, 1, th, tw), sum to 1 per pixel
    if layerwise:  # exact statistics want each pixel once, from the tile it is most inside of
        weights = _owned(weights, h, w)
    share = {rc: float(wt.sum()) / (h * w) for rc, wt in weights.items()}  # sums to 1

    given = np.zeros(stats_shape, np.float32)
    if layerwise:  # pass k: layers < k normalised with what was pooled so far, layer k pooled exactly
        schedule = [(np.arange(stats_shape[0]) < k).astype(np.float32) for k in range(stats_shape[0])]
    else:  # pass 1: each tile its own statistics; later passes: the previous pass's pooled ones
        schedule = [0.0] + [1.0] * (passes - 2)
    for mix in schedule:
        pooled = np.zeros(stats_shape, np.float64)
        for (r, c), part in share.items():
            _, local = decode(np.ascontiguousarray(latents[:, :, r : r + th, c : c + tw]), given, mix, weights[r, c])
            pooled += part * local
        given = pooled.astype(np.float32)

    ones = np.ones((1, 1, th, tw), np.float32)

    def with_shared_stats(z: np.ndarray) -> np.ndarray:
        return decode(z, given, 1.0, ones)[0]

    return decode_tiled(with_shared_stats, latents, tile, overlap, scale)


def _owned(weights: dict[tuple[int, int], np.ndarray], h: int, w: int) -> dict[tuple[int, int], np.ndarray]:
    """0/1 maps, one per tile, that give every pixel to the first tile weighing it most in the blend: the
    one it is deepest inside, where the tail's result is least touched by the tile's borders. Pooled with
    these, the layer-by-layer statistics match the whole decode's (16x24 latents, tiles 12/8/6: 53.9/46.0/
    40.5 dB; with the blend shares themselves 39.2/29.6/22.9)."""
    best = np.full((h, w), -1.0, np.float32)
    for (r, c), wt in weights.items():
        view = best[r : r + wt.shape[2], c : c + wt.shape[3]]
        np.maximum(view, wt[0, 0], out=view)
    taken = np.zeros((h, w), bool)
    owned = {}
    for (r, c), wt in weights.items():
        free = taken[r : r + wt.shape[2], c : c + wt.shape[3]]
        mine = (wt[0, 0] >= best[r : r + wt.shape[2], c : c + wt.shape[3]]) & ~free
        free |= mine
        owned[r, c] = mine[None, None].astype(np.float32)  # (1, 1, th, tw)
    return owned


def _decode_checked(decode: Decode, latents: np.ndarray, scale: int) -> np.ndarray:
    """`decode` one tile and check it returned (1, 3, th*scale, tw*scale)."""
    _, _, th, tw = latents.shape
    out = np.asarray(decode(np.ascontiguousarray(latents)), dtype=np.float32)  # (1, 3, th*scale, tw*scale)
    if out.shape != (1, 3, th * scale, tw * scale):
        raise ValueError(f"decode returned shape {out.shape} for a latent tile {latents.shape}; "
                         f"expected (1, 3, {th * scale}, {tw * scale}) with scale={scale}")
    return out
