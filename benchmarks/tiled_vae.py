"""Tiled against whole VAE decoding on a bundle (default: the embedded default model), as PSNR.

    python benchmarks/tiled_vae.py                      # converts the default model into a temporary folder
    python benchmarks/tiled_vae.py --bundle BUNDLE      # a bundle with vae_decoder_head / vae_decoder_tiled

Per prompt and tile/overlap: every tile decoded alone by the plain decoder ("local"); the runtime's way
(edge.vae_tiling.decode_tiled_shared: head on the whole latent, tail per tile with pooled GroupNorm
statistics, 2 passes); and, with --reference, GroupNorm statistics fixed one layer per pass and pooled over
a partition of the image (L + 1 passes: what a lockstep, layer-by-layer tiled decoder would give).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.metrics import psnr
from edge.pipeline import Pipeline
from edge.vae_tiling import _ramp, decode_tiled, decode_tiled_shared, tile_starts, tiled_peak_tile

CASES = [("a small green square at the top, white background", 128, 128),
         ("a large red circle on the left, blue background", 128, 192)]
TILES = [(12, 4), (8, 4), (6, 2)]


def one_layer_per_pass(tail, hidden: np.ndarray, tile: int, overlap: int, scale: int, shape) -> np.ndarray:
    """Statistics fixed layer by layer: pass k normalises layers < k with pooled statistics, the rest locally."""
    _, _, h, w = hidden.shape
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = tiled_peak_tile(h, w, tile)
    ramps = [(r, c, np.outer(wr, wc)) for r, wr in zip(rows, _ramp(rows, tile, h, 1))
             for c, wc in zip(cols, _ramp(cols, tile, w, 1))]
    canvas = np.full((len(ramps), h, w), -1.0, np.float32)
    for i, (r, c, ramp) in enumerate(ramps):
        canvas[i, r : r + th, c : c + tw] = ramp
    owner = canvas.argmax(axis=0)  # each latent pixel counted once, by the tile weighing it most
    parts = [((owner == i)[r : r + th, c : c + tw])[None, None].astype(np.float32) for i, (r, c, _) in enumerate(ramps)]

    def run(x, stats, mix, weight):
        return tail.run(None, {"hidden": x, "gn_stats": stats, "gn_mix": mix, "gn_weight": weight})

    layers = shape[0]
    given = np.zeros(shape, np.float32)
    for k in range(layers):
        mix = (np.arange(layers) < k).astype(np.float32)
        pooled = np.zeros(shape, np.float64)
        for (r, c, _), part in zip(ramps, parts):
            pooled += part.sum() / (h * w) * run(np.ascontiguousarray(hidden[:, :, r : r + th, c : c + tw]),
                                                 given, mix, part)[1]
        given = pooled.astype(np.float32)
    ones, weight = np.ones(layers, np.float32), np.ones((1, 1, th, tw), np.float32)
    return decode_tiled(lambda x: run(x, given, ones, weight)[0], hidden, tile, overlap, scale)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, help="default: convert the default model into a temporary folder")
    parser.add_argument("--reference", action="store_true", help="also the one-layer-per-pass reference")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        bundle = args.bundle
        if bundle is None:
            from edge.converters.convert import Options, convert

            bundle = Path(scratch) / "bundle"
            convert("default", bundle, options=Options(profile_memory=False), log=lambda s: None)
        pipe = Pipeline.load(bundle)
        graph = lambda name: ort.InferenceSession(str(bundle / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        whole, head, tail = graph("vae_decoder"), graph("vae_decoder_head"), graph("vae_decoder_tiled")
        shape = tuple(pipe.manifest.components["vae_decoder_tiled"].inputs[1].shape)  # (L, 2, G)
        scale = pipe.manifest.vae_scale_factor

        def shared(x, stats, mix, weight):
            feeds = {"hidden": x, "gn_stats": stats, "gn_mix": np.full(shape[0], mix, np.float32), "gn_weight": weight}
            return tuple(tail.run(None, feeds))

        print("| latents | tile/overlap | local | cut + shared, 2 passes |" + (" one layer per pass |" if args.reference else ""))
        for prompt, height, width in CASES:
            z = pipe.generate(prompt, steps=10, guidance=5.0, height=height, width=width).latents
            z = (z / np.float32(pipe.manifest.vae_scaling_factor)).astype(np.float32)
            full = whole.run(None, {"latent_sample": z})[0]
            hidden = head.run(None, {"latent_sample": z})[0]
            up = hidden.shape[2] // z.shape[2]  # head output pixels per latent pixel
            for tile, overlap in TILES:
                local = psnr(full, decode_tiled(lambda x: whole.run(None, {"latent_sample": x})[0], z, tile, overlap, scale))
                cut = psnr(full, decode_tiled_shared(shared, hidden, tile * up, overlap * up, scale // up, shape))
                row = f"| {z.shape[2]}x{z.shape[3]} \"{prompt}\" | {tile}/{overlap} | {local:.1f} dB | {cut:.1f} dB |"
                if args.reference:
                    exact = one_layer_per_pass(tail, hidden, tile * up, overlap * up, scale // up, shape)
                    row += f" {psnr(full, exact):.1f} dB |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
