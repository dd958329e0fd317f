"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): adjacent denoising steps change
the UNet's deep features little, so every N steps the whole UNet runs, and in between only its outermost level:
conv_in and the first down block (the skip connections), then the last up block fed the deep feature the last
full step left, then the output convolution.

The cut is the project's UNet split at two scopes, in graph order: chunk 0 = time embedding, conv_in, first down
block; chunk 1 = the deep part (the other down blocks, the mid block, every up block but the last); chunk 2 = the
last up block and the output. A cached step skips chunk 1 and feeds chunk 2 chunk 1's outputs from the last full
step (the hidden state entering the last up block). Chunk 0 still runs the first down block's downsampler, whose
output only chunk 1 reads: one strided convolution, kept so the cut stays a plain graph split.
"""

from __future__ import annotations

from typing import Any

DEEP_CHUNK = 1  # the chunk a cached step skips


def deep_cache_scopes(unet_config: Any) -> list[str]:
    """Node-name scopes (torch.onnx's module paths under the export wrapper's `unet`) the cut falls before."""
    last = len(unet_config.up_block_types) - 1
    if len(unet_config.down_block_types) < 2 or last < 1:
        raise ValueError("--deep-cache needs a UNet with at least two down and two up blocks")
    return ["/unet/down_blocks.1/", f"/unet/up_blocks.{last}/"]


def deep_cache_record(chunks: list[dict], scopes: list[str]) -> dict[str, Any]:
    """The manifest's `deep_cache` entry: which chunk a cached step skips, and which of its outputs it reuses."""
    later = {t["name"] for c in chunks[DEEP_CHUNK + 1:] for t in c["inputs"]}
    cached = [t["name"] for t in chunks[DEEP_CHUNK]["outputs"] if t["name"] in later]
    return {"skip_chunk": DEEP_CHUNK, "cached": cached, "cut_before": scopes,
            "method": "DeepCache (Ma et al. 2023), outermost level"}
