"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): adjacent denoising steps change
the UNet's deep features little, so every N steps the whole UNet runs, and in between only its outermost level:
conv_in and the first down block (the skip connections), then the last up block fed the deep feature the last
full step left, then the output convolution.

The cut is the project's UNet split at two scopes, in graph order: chunk 0 = time embedding, conv_in, first down
block; chunk 1 = the deep part (the other down blocks, the mid block, every up block but the last); chunk 2 = the
last up block and the output. A cached step skips chunk 1 and feeds chunk 2 chunk 1's outputs from the last full
step (the hidden state entering the last up block). With --split-unet / --max-chunk-mb each part is cut further
and a cached step skips every chunk of the deep part. Chunk 0 still runs the first down block's downsampler, whose
output only chunk 1 reads: one strided convolution, kept so the cut stays a plain graph split.
"""

from __future__ import annotations

from typing import Any

DEEP_PART = 1  # the part (between the two cuts) a cached step skips


def deep_cache_scopes(unet_config: Any) -> list[str]:
    """Node-name scopes (torch.onnx's module paths under the export wrapper's `unet`) the cut falls before."""
    last = len(unet_config.up_block_types) - 1
    if len(unet_config.down_block_types) < 2 or last < 1:
        raise ValueError("--deep-cache needs a UNet with at least two down and two up blocks")
    return ["/unet/down_blocks.1/", f"/unet/up_blocks.{last}/"]


def deep_cache_record(chunks: list[dict], parts: list[int], scopes: list[str]) -> dict[str, Any]:
    """The manifest's `deep_cache` entry: the chunks a cached step skips (the deep part: one chunk, or several
    with --split-unet / --max-chunk-mb), and which of their outputs later chunks read, which it reuses."""
    skip = [k for k, part in enumerate(parts) if part == DEEP_PART]
    later = {t["name"] for c in chunks[skip[-1] + 1:] for t in c["inputs"]}
    cached = [t["name"] for k in skip for t in chunks[k]["outputs"] if t["name"] in later]
    return {"skip_chunks": skip, **({"skip_chunk": skip[0]} if len(skip) == 1 else {}),  # skip_chunk: older runtimes
            "cached": cached, "cut_before": scopes, "method": "DeepCache (Ma et al. 2023), outermost level"}
