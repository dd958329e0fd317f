"""Textual-inversion embeddings: new words for the text encoder, one or several vectors each, read in numpy.

Layouts (a .safetensors file; pickles such as A1111's .pt are refused, convert them first):
- diffusers (`learned_embeds.safetensors`): {TOKEN: (D,) or (n, D)}; the token is the key;
- A1111 (`NAME.safetensors`): {"emb_params": (n, D)}, or {"string_to_param.*": (n, D)}; the token is the file's
  name, as the web UI uses it (write NAME in the prompt or the negative prompt);
- SDXL (`NAME.safetensors`): {"clip_l": (n, 768), "clip_g": (n, 1280)}, the vectors for each text encoder; the
  token is the file's name. The SDXL refiner, with the second encoder only, takes clip_g.
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
    vectors: np.ndarray  # (n, D) float32; SDXL's: the first text encoder's (clip_l)
    path: Path
    vectors_2: np.ndarray | None = None  # SDXL's: (n, D2), the second text encoder's (clip_g)

    def for_encoder(self, component: str) -> np.ndarray | None:
        """The vectors for "text_encoder" or "text_encoder_2" (None: this embedding has none for it)."""
        return self.vectors_2 if component == "text_encoder_2" else self.vectors

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
        if not all(k in tensors for k in SDXL_KEYS):
            raise EmbeddingError(f"{path} has {', '.join(k for k in SDXL_KEYS if k in tensors)} but not both of "
                                 f"{', '.join(SDXL_KEYS)}: an SDXL embedding holds vectors for each text encoder")
        first, second = (_matrix(path, tensors[k]) for k in SDXL_KEYS)
        if len(first) != len(second):
            raise EmbeddingError(f"{path}: {len(first)} clip_l vectors but {len(second)} clip_g ones; expected as "
                                 "many for each text encoder")
        return Embedding(_token(path, token or path.stem), first, path, second)
    a1111 = [k for k in tensors if k == "emb_params" or k.startswith("string_to_param")]
    if a1111:
        name, vectors = token or path.stem, tensors[a1111[0]]
    elif len(tensors) == 1:
        (key, vectors), = tensors.items()
        name = token or key
    else:
        raise EmbeddingError(f"{path} holds {len(tensors)} tensors ({', '.join(list(tensors)[:4])}…); expected one "
                             "embedding (diffusers: {TOKEN: vectors}; A1111: emb_params)")
    return Embedding(_token(path, name), _matrix(path, vectors), path)


def _matrix(path: Path, vectors) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or not len(vectors):
        raise EmbeddingError(f"{path}: the embedding has shape {list(vectors.shape)}; expected (vectors, width)")
    return vectors


def _token(path: Path, name: str) -> str:
    if not name.strip() or any(c.isspace() for c in name):
        raise EmbeddingError(f"{path}: token {name!r} must be one word without spaces")
    return name


def grown_table(table: np.ndarray, embeddings: list[Embedding], component: str = "text_encoder") -> np.ndarray:
    """The token table of `component` with each embedding's vectors for it appended as new rows, in order."""
    rows = [e.for_encoder(component) for e in embeddings]
    for e, vectors in zip(embeddings, rows):
        if vectors is None:
            raise EmbeddingError(f"{e.path.name}: no vectors for {component}")
        if vectors.shape[1] != table.shape[1]:
            raise EmbeddingError(f"{e.path.name}: vectors of width {vectors.shape[1]}, but this text encoder's "
                                 f"tokens are {table.shape[1]} wide; is the embedding for another model (SD 1.x: "
                                 "768, SD 2.x: 1024, SDXL: clip_l 768 and clip_g 1280)?")
    return np.concatenate([table] + [v.astype(table.dtype) for v in rows])
