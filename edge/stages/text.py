"""Text conditioning: (prompt, negative prompt) -> the UNet's context, (B, 77, D)."""

from __future__ import annotations

import numpy as np

from edge.graphs import Graphs
from edge.tokenizer import ClipTokenizer


def encode_text(graphs: Graphs, tokenizer: ClipTokenizer, prompt: str, negative_prompt: str, guided: bool,
                copies: int) -> np.ndarray:
    """(2N, 77, D) as [unconditional x N, conditional x N] when guided, else (N, 77, D)."""
    texts = [(negative_prompt, "negative prompt"), (prompt, "prompt")] if guided else [(prompt, "prompt")]
    session = graphs.open("text_encoder")[0]
    states = [graphs.run("text_encoder", session, {"input_ids": tokenizer.encode_prompt(s, what)})[0]
              for s, what in texts]  # each (1, 77, D)
    return np.concatenate([np.repeat(h, copies, axis=0) for h in states])  # (B, 77, D)
