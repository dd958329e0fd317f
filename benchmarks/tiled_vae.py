"""Tiled against whole VAE decoding on a bundle (default: the embedded default model), as PSNR.

    python benchmarks/tiled_vae.py                      # converts the default model into a temporary folder
    python benchmarks/tiled_vae.py --bundle BUNDLE      # a bundle with vae_decoder_head / vae_decoder_tiled

Per prompt and tile/overlap: every tile decoded alone by the plain decoder ("local"); the runtime's way on
latents of the trained size (edge.vae_tiling.decode_tiled_shared: head on the whole latent, tail per tile
with pooled GroupNorm statistics, 2 passes); and, with --reference, its way on larger latents: GroupNorm
statistics fixed one layer per pass, each pixel pooled from the tile it is deepest inside (L + 1 passes).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.metrics import psnr
from edge.pipeline import Pipeline
from edge.vae_tiling import decode_tiled, decode_tiled_shared

CASES = [("a small green square at the top, white background", 128, 128),
         ("a large red circle on the left, blue background", 128, 192)]
TILES = [(12, 4), (8, 4), (6, 2)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, help="default: convert the default model into a temporary folder")
    parser.add_argument("--reference", action="store_true", help="also the one-layer-per-pass schedule")
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
                    exact = decode_tiled_shared(shared, hidden, tile * up, overlap * up, scale // up, shape,
                                                layerwise=True)
                    row += f" {psnr(full, exact):.1f} dB |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
