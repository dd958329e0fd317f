"""Text conditioning: (prompt, negative prompt) -> the UNet's context, (B, 77k, D).

Prompts are weighted in either syntax people use (A1111's `(word:1.3)`, compel's `word++`; edge.prompts) and
encoded in 75-token windows, concatenated along the sequence, where the UNet graph's context length is not
fixed; a bundle whose UNet takes exactly 77 positions (older ONNX exports, every Core ML graph) gets one
window, and a warning says how many tokens were dropped.
"""

from __future__ import annotations

import numpy as np

from edge.graphs import Graphs
from edge.prompts import encode_pair, encode_weighted
from edge.tokenizer import ClipTokenizer



def can_mask(graphs: Graphs) -> bool:
    """Whether the text encoder graph takes an attention mask (bundles converted from now on): compel's default
    down-weighting masks a fragment's tokens out of attention; older graphs re-encode without them instead."""
    return any(t.name == "attention_mask" for t in graphs.manifest.components["text_encoder"].inputs)


def windows_allowed(graphs: Graphs) -> int | None:
    """None (any number of 77-token windows) when the UNet's context axis is dynamic, else 1."""
    context = next(t for t in graphs.manifest.components["unet"].inputs if t.name == "encoder_hidden_states")
    return None if isinstance(context.shape[1], str) else 1


def encode_text(graphs: Graphs, tokenizer: ClipTokenizer, prompt: str, negative_prompt: str, guided: bool,
                copies: int, syntax: str = "auto", size: tuple[int, int] | None = None,
                one_at_a_time: bool = False) -> np.ndarray:
    """(2N, L, D) as [unconditional x N, conditional x N] when guided, else (N, L, D); L = 77 x windows.
    SDXL bundles: edge.stages.text_xl (both encoders, the first freed before the second loads when
    `one_at_a_time`, and the added conditions for an image of `size`)."""
    if graphs.manifest.conditioning.get("kind") == "sdxl":
        from edge.stages.text_xl import encode_text_xl

        return encode_text_xl(graphs, tokenizer, prompt, negative_prompt, guided, copies, syntax,
                              size or graphs.manifest.default_size, one_at_a_time)
    session = graphs.open("text_encoder")[0]
    masking = can_mask(graphs)

    def encode_masked(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:  # (1, 77) int64 each -> (1, 77, D)
        return graphs.run("text_encoder", session, {"input_ids": ids, "attention_mask": mask})[0]

    def encode(ids: np.ndarray) -> np.ndarray:  # (1, 77) int64 -> (1, 77, D)
        if masking:
            return encode_masked(ids, np.ones_like(ids))
        return graphs.run("text_encoder", session, {"input_ids": ids})[0]

    windows = windows_allowed(graphs)
    how = {"encode_masked": encode_masked, "downweight": "mask"} if masking else {"downweight": "remove"}
    if guided:
        cond, uncond = encode_pair(prompt, negative_prompt, tokenizer, encode, syntax, windows, **how)
        states = [uncond, cond]  # (1, L, D) each, the same L
    else:
        states = [encode_weighted(prompt, tokenizer, encode, syntax, windows, **how)]
    return np.concatenate([np.repeat(h, copies, axis=0) for h in states]).astype(np.float32)  # (B, L, D)
