"""Tiled VAE decoding: tile layout, the cross-fade, and what tiling costs on the default model's real VAE.

The real decoder has global operations (GroupNorm statistics over the whole image, attention in its mid
block), so a tile decoded alone is not a crop of the full decode. The blend itself is therefore checked
on a decoder with no global operations, where tiling with overlap must reproduce the full decode.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edge.metrics import psnr
from edge.vae_tiling import decode_tiled, tile_starts, tiled_peak_tile

SCALE = 8  # image pixels per latent pixel in the default model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edge.converters.convert import convert

    out = tmp_path_factory.mktemp("b") / "bundle"
    convert("default", out, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def vae(bundle):
    session = ort.InferenceSession(str(bundle / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    return lambda z: session.run(["sample"], {"latent_sample": z})[0]  # (1, 4, h, w) -> (1, 3, 8h, 8w)


@pytest.fixture(scope="module")
def latents(bundle) -> dict[str, np.ndarray]:
    """Latents divided by the VAE scaling factor: a real 16x24 generation, it repeated to 24x32, and noise."""
    from edge.pipeline import Pipeline

    pipe = Pipeline.load(bundle)
    r = pipe.generate("a red circle on the left, blue background", steps=10, guidance=5, scheduler="euler",
                      height=128, width=192)
    real = (r.latents / np.float32(pipe.manifest.vae_scaling_factor)).astype(np.float32)  # (1, 4, 16, 24)
    noise = np.random.default_rng(0).standard_normal((1, 4, 24, 32), dtype=np.float32)
    return {"real16x24": real, "repeated24x32": np.tile(real, (1, 1, 2, 2))[:, :, :24, :32].copy(),
            "noise24x32": noise}


def local_decode(z: np.ndarray) -> np.ndarray:
    """A decoder with no global operations: nearest upsampling, then a 3x3 box blur (edge-padded)."""
    up = z[:, :3].repeat(SCALE, axis=2).repeat(SCALE, axis=3)  # (1, 3, H, W)
    _, _, h, w = up.shape
    padded = np.pad(up, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    return sum(padded[:, :, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / np.float32(9)


def tile_edges(size: int, tile: int, overlap: int) -> list[int]:
    """Image rows (or columns) where a tile begins or ends inside the image."""
    starts = tile_starts(size, tile, overlap)
    edges = {s for s in starts if s > 0} | {s + tile for s in starts if s + tile < size}
    return sorted(e * SCALE for e in edges)


def seam_gradient(image: np.ndarray, rows: list[int], cols: list[int]) -> tuple[float, float]:
    """Mean |pixel - neighbour| across the given columns (horizontal) and rows (vertical)."""
    gx = np.abs(np.diff(image, axis=3))[..., [c - 1 for c in cols]]  # (1, 3, H, len(cols))
    gy = np.abs(np.diff(image, axis=2))[:, :, [r - 1 for r in rows], :]  # (1, 3, len(rows), W)
    return float(gx.mean()), float(gy.mean())


# --- layout -------------------------------------------------------------------------------------------

def test_tile_starts_examples():
    assert tile_starts(32, 8, 4) == [0, 4, 8, 12, 16, 20, 24]
    assert tile_starts(32, 8, 0) == [0, 8, 16, 24]
    assert tile_starts(24, 12, 4) == [0, 6, 12]
    assert tile_starts(32, 12, 4) == [0, 6, 13, 20]
    assert tile_starts(16, 16, 4) == [0]
    assert tile_starts(10, 64, 8) == [0]


def test_tile_starts_cover_with_the_overlap_asked():
    for size in range(1, 41):
        for tile in range(1, 20):
            for overlap in range(tile):
                starts = tile_starts(size, tile, overlap)
                ends = [s + min(tile, size) for s in starts]
                assert starts[0] == 0 and ends[-1] == size, (size, tile, overlap, starts)
                assert all(e - s >= overlap for s, e in zip(starts[1:], ends)), (size, tile, overlap, starts)
                assert starts == sorted(set(starts))
                # the fewest tiles: one fewer could not cover [0, size) with that overlap
                assert len(starts) == 1 or (len(starts) - 2) * (tile - overlap) + tile < size


@pytest.mark.parametrize("args, name", [
    ((32, 0, 0), "tile"), ((32, 8, -1), "overlap"), ((32, 8, 8), "overlap"), ((32, 8, 9), "overlap"),
    ((0, 8, 4), "size"), ((32, 8.0, 4), "tile"), ((32, True, 0), "tile"),
])
def test_tile_starts_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        tile_starts(*args)


def test_decode_tiled_bad_arguments(vae):
    z = np.zeros((1, 4, 16, 16), np.float32)
    with pytest.raises(ValueError, match="latents"):
        decode_tiled(vae, z[0], 8, 4, SCALE)
    with pytest.raises(ValueError, match="scale"):
        decode_tiled(vae, z, 8, 4, 0)
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(vae, z, 8, 8, SCALE)
    with pytest.raises(ValueError, match="decode returned"):
        decode_tiled(vae, z, 8, 4, 4)  # the real VAE upsamples by 8, not 4
    with pytest.raises(ValueError, match="tile"):
        tiled_peak_tile(16, 16, 0)


# --- the blend, where tiling can be exact ---------------------------------------------------------------

@pytest.mark.parametrize("tile, overlap", [(8, 4), (12, 4), (8, 2)])
def test_blend_reproduces_a_local_decoder(latents, tile, overlap):
    """Overlapping tiles fade across the seams; hard tiles (overlap 0) keep the blur's edge error."""
    z = latents["noise24x32"]
    full = local_decode(z)
    blended = psnr(full, decode_tiled(local_decode, z, tile, overlap, SCALE))
    hard = psnr(full, decode_tiled(local_decode, z, tile, 0, SCALE))
    assert blended >= 35, f"tile {tile} overlap {overlap}: {blended:.1f} dB"
    assert blended > hard + 3, f"blended {blended:.1f} dB vs hard tiles {hard:.1f} dB"


# --- the real VAE ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tile", [24, 40])
def test_one_tile_is_the_full_decode(vae, latents, tile):
    z = latents["real16x24"]  # (1, 4, 16, 24): a tile of 24 or more covers it
    np.testing.assert_array_equal(decode_tiled(vae, z, tile, 4, SCALE), vae(z))


def test_decoder_never_sees_more_than_the_peak_tile(vae, latents):
    z = latents["real16x24"]
    seen = []
    image = decode_tiled(lambda t: seen.append(t.shape[2:]) or vae(t), z, 12, 4, SCALE)
    assert image.shape == (1, 3, 16 * SCALE, 24 * SCALE) and image.dtype == np.float32
    assert max(seen) == tiled_peak_tile(16, 24, 12) == (12, 12)
    assert tiled_peak_tile(16, 24, 20) == (16, 20)


@pytest.mark.parametrize("which", ["repeated24x32", "noise24x32"])
@pytest.mark.parametrize("tile, overlap", [(8, 4), (12, 4)])
def test_no_seams_on_the_real_vae(vae, latents, which, tile, overlap):
    z = latents[which]
    full = vae(z)
    rows, cols = tile_edges(z.shape[2], tile, overlap), tile_edges(z.shape[3], tile, overlap)
    fx, fy = seam_gradient(full, rows, cols)
    tx, ty = seam_gradient(decode_tiled(vae, z, tile, overlap, SCALE), rows, cols)
    assert tx <= 1.5 * fx and ty <= 1.5 * fy, f"across tile edges: tiled {tx:.4f}/{ty:.4f}, full {fx:.4f}/{fy:.4f}"
    # the same measure sees the seams of hard tiles (in at least one direction: a seam that runs through
    # plain background has nothing to show)
    rows, cols = tile_edges(z.shape[2], 8, 0), tile_edges(z.shape[3], 8, 0)
    hx, hy = seam_gradient(decode_tiled(vae, z, 8, 0, SCALE), rows, cols)
    fx, fy = seam_gradient(full, rows, cols)
    assert hx > 2 * fx or hy > 2 * fy, f"hard tiles: {hx:.4f}/{hy:.4f}, full {fx:.4f}/{fy:.4f}"


def test_overlap_brings_the_real_vae_closer_to_the_full_decode(vae, latents):
    z = latents["noise24x32"]
    full = vae(z)
    hard, blended = (psnr(full, decode_tiled(vae, z, 8, overlap, SCALE)) for overlap in (0, 4))
    assert blended > hard + 2, f"overlap 4: {blended:.1f} dB, overlap 0: {hard:.1f} dB"


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "the default VAE normalises each tile with its own GroupNorm statistics (and attends within the tile), "
    "so per-tile content differs from the full decode: measured 4-19 dB; 35 dB needs GroupNorm statistics "
    "shared across tiles, which a black-box decode cannot do"))
@pytest.mark.parametrize("which", ["real16x24", "repeated24x32", "noise24x32"])
@pytest.mark.parametrize("tile, overlap", [(8, 4), (12, 4)])
def test_tiled_matches_full_decode_on_the_real_vae(vae, latents, which, tile, overlap):
    z = latents[which]
    value = psnr(vae(z), decode_tiled(vae, z, tile, overlap, SCALE))
    assert value >= 35, f"{which} tile {tile} overlap {overlap}: {value:.1f} dB"
