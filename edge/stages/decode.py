"""Latents -> image: the whole latent at once, or, when the memory plan tiles, in overlapping tiles that share
the whole image's GroupNorm statistics (edge.vae_tiling); or by the tiny autoencoder (TAESD), fast and rougher."""

from __future__ import annotations

import numpy as np
from PIL import Image

from edge.graphs import Graphs
from edge.memprobe import release_memory
from edge.plan import TINY, Plan
from edge.vae_tiling import decode_tiled, decode_tiled_shared


def to_pil(image: np.ndarray) -> Image.Image:
    """(3, H, W) in ~[-1, 1] -> an 8-bit RGB image."""
    image = np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)  # (H, W, 3)
    return Image.fromarray((image * 255).round().astype(np.uint8))


def decode(graphs: Graphs, plan: Plan | None, latents: np.ndarray) -> Image.Image:
    """One image from (1, C, h, w) latents (as the UNet works in: scaled by the VAE's scaling factor)."""
    manifest = graphs.manifest
    if plan is not None and plan.decoder == "tiny":
        return decode_tiny(graphs, latents)
    z = (latents / np.float32(manifest.vae_scaling_factor)).astype(np.float32)  # (1, C, h, w)
    tile = None if plan is None else plan.vae_tile
    if tile is not None and "vae_decoder_tiled" in manifest.components:
        return to_pil(_decode_shared(graphs, plan, z, tile, latents.shape))
    session = graphs.open("vae_decoder")[0]

    def run(part: np.ndarray) -> np.ndarray:
        return graphs.run("vae_decoder", session, {"latent_sample": part})[0]  # (1, 3, H, W)

    if tile is None:
        return to_pil(run(z)[0])  # (3, H, W) in ~[-1, 1]
    return to_pil(decode_tiled(run, z, tile, plan.vae_overlap, manifest.vae_scale_factor)[0])  # older bundles


def decode_tiny(graphs: Graphs, latents: np.ndarray) -> Image.Image:
    """The tiny autoencoder's decoder (converters/tiny_vae.py): it reads the UNet's latents unchanged."""
    session = graphs.open(TINY)[0]
    return to_pil(graphs.run(TINY, session, {"latent_sample": latents.astype(np.float32)})[0][0])  # (3, H, W)


def _decode_shared(graphs: Graphs, plan: Plan, z: np.ndarray, tile: int, shape: tuple[int, ...]) -> np.ndarray:
    """Tiles through the cut decoder: its head on the whole latent, its tail per tile with pooled statistics."""
    manifest = graphs.manifest
    tiled = manifest.components["vae_decoder_tiled"]
    first = tiled.inputs[0].name  # "hidden": the tail of a cut decoder; "latent_sample": older bundles
    up, overlap, scale = 1, plan.vae_overlap, manifest.vae_scale_factor
    if first == "hidden":  # the head (mid block, first up block) runs on the whole latent, the tail per tile
        head = graphs.open("vae_decoder_head")[0]
        hidden = graphs.run("vae_decoder", head, {"latent_sample": z})[0]  # (1, M, 2^k h, 2^k w)
        del head
        if not plan.resident:
            graphs.free("vae_decoder_head")  # its weights leave before the tail's come in, as the plan counts
        up = hidden.shape[2] // z.shape[2]
        z, tile, overlap, scale = hidden, tile * up, overlap * up, scale // up
    shared = graphs.open("vae_decoder_tiled")[0]

    def run_shared(part: np.ndarray, stats: np.ndarray, mix: float | np.ndarray,
                   weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gn_mix = np.broadcast_to(np.asarray(mix, np.float32), tiled.inputs[2].shape)  # (L,), or (1,): older
        feeds = {first: part, "gn_stats": stats, "gn_mix": gn_mix}
        if first == "hidden":  # older tiled graphs report plain per-tile means
            feeds["gn_weight"] = weight
        image, local = graphs.run("vae_decoder", shared, feeds)
        release_memory()  # the tile's freed buffers back to the OS before the next: full-size SDXL at 1024x1024 in
        # 32x32-latent tiles peaked at 846-998 MiB without (~130 MiB of freed heap kept between tiles), 846-923 with
        return image, local  # (1, 3, th*s, tw*s), (L, 2, G)

    stats_shape = tuple(tiled.inputs[1].shape)
    trained = [d // manifest.vae_scale_factor for d in manifest.default_size]
    # larger than the model was trained at: GroupNorm statistics fixed one layer per pass (L + 1 passes)
    layerwise = first == "hidden" and (shape[2] > trained[0] or shape[3] > trained[1])
    return decode_tiled_shared(run_shared, z, tile, overlap, scale, stats_shape, layerwise=layerwise)[0]
