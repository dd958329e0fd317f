"""Textual-inversion embeddings: new words for the text encoder, one or several vectors each, read in numpy.

Layouts (a .safetensors file; pickles such as A1111's .pt are refused, convert them first):
- diffusers (`learned_embeds.safetensors`): {TOKEN: (D,) or (n, D)}; the token is the key;
- A1111 (`NAME.safetensors`): {"emb_params": (n, D)}, or {"string_to_param.*": (n, D)}; the token is the file's
  name, as the web UI uses it (write NAME in the prompt or the negative prompt).
A token of n vectors becomes n tokens (TOKEN, TOKEN_1, ... TOKEN_{n-1}) appended to the vocabulary, and the text
encoder's token table grows by those rows (edge.adapters hands onnxruntime the grown table): as diffusers'
load_textual_inversion does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.weights_io import WeightsError, read_safetensors

SDXL_KEYS = ("clip_l", "clip_g")


class EmbeddingError(ValueError):
    """An embedding file that cannot be used with this bundle: which file, and why."""


@dataclass(frozen=True)
class Embedding:
    token: str  # what the prompt says
    vectors: np.ndarray  # (n, D) float32
    path: Path

    @property
    def tokens(self) -> list[str]:
        """The vocabulary entries this embedding adds, one per vector."""
        return [self.token] + [f"{self.token}_{k}" for k in range(1, len(self.vectors))]


def read_embedding(path: Path | str, token: str | None = None) -> Embedding:
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embedding file not found: {path}")
    try:
        tensors, _ = read_safetensors(path)
    except WeightsError as e:
        raise EmbeddingError(str(e)) from None
    if any(k in tensors for k in SDXL_KEYS):
        raise EmbeddingError(f"{path} is an SDXL embedding ({', '.join(k for k in SDXL_KEYS if k in tensors)}: one "
                             "per text encoder); this bundle has one text encoder")
    a1111 = [k for k in tensors if k == "emb_params" or k.startswith("string_to_param")]
    if a1111:
        name, vectors = token or path.stem, tensors[a1111[0]]
    elif len(tensors) == 1:
        (key, vectors), = tensors.items()
        name = token or key
    else:
        raise EmbeddingError(f"{path} holds {len(tensors)} tensors ({', '.join(list(tensors)[:4])}…); expected one "
                             "embedding (diffusers: {TOKEN: vectors}; A1111: emb_params)")
    vectors = np.asarray(vectors, np.float32)
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or not len(vectors):
        raise EmbeddingError(f"{path}: the embedding has shape {list(vectors.shape)}; expected (vectors, width)")
    if not name.strip() or any(c.isspace() for c in name):
        raise EmbeddingError(f"{path}: token {name!r} must be one word without spaces")
    return Embedding(name, vectors, path)


def grown_table(table: np.ndarray, embeddings: list[Embedding]) -> np.ndarray:
    """The token table with each embedding's vectors appended as new rows, in order."""
    for e in embeddings:
        if e.vectors.shape[1] != table.shape[1]:
            raise EmbeddingError(f"{e.path.name}: vectors of width {e.vectors.shape[1]}, but this text encoder's "
                                 f"tokens are {table.shape[1]} wide; is the embedding for another model (SD 1.x: "
                                 "768, SD 2.x: 1024)?")
    return np.concatenate([table] + [e.vectors.astype(table.dtype) for e in embeddings])
