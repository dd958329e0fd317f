"""LoRA at run time: the changed weights computed in numpy and handed to onnxruntime in place of the graph's
initializers (`SessionOptions.add_initializer`), so the bundle on disk is never modified and no re-conversion is
needed. Switching LoRAs between generations reloads only the graphs (UNet chunks, text encoder) whose weights
change.

The bundle's `weights.json` (converters/weight_map.py) says where each Linear and Conv weight is stored: graph
file, initializer, transposed (ONNX MatMul keeps a Linear weight as (in, out)), and how: float, or int8 with a
scale and zero point, which is then re-quantised with the same scheme (per tensor or per channel, symmetric int8
or asymmetric uint8) from the dequantised weight plus the change.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge.bundle import Manifest, verify_paths
from edge.embeddings import Embedding, EmbeddingError, grown_table
from edge.lora import LoraError, LoraFile, apply_changes, parse_scale, read_lora, resolve
from edge.weights_io import read_initializers

GraphKey = tuple[str, int]  # (component, graph index in run order)
TOKEN_TABLE = "embeddings.token_embedding.weight"  # the text encoder's, as weights.json names it


@dataclass
class Adapters:
    bundle: Path
    manifest: Manifest
    verify: bool = True
    applied: dict[GraphKey, tuple] = field(default_factory=dict)  # what each graph's overrides were made from
    overrides: dict[GraphKey, dict[str, np.ndarray]] = field(default_factory=dict)  # initializer -> new value
    alive: dict[GraphKey, list] = field(default_factory=dict)  # the OrtValues over them, held with the sessions
    _map: dict[str, dict[str, dict]] | None = None
    _files: dict[tuple, LoraFile] = field(default_factory=dict)  # read once per (path, size, mtime)
    embeddings: list[Embedding] = field(default_factory=list)  # textual inversion, in the order loaded
    _token_ids: list[list[int]] = field(default_factory=list)

    def read(self, path: Path | str) -> LoraFile:
        path = Path(path)
        try:
            st = path.stat()
        except OSError:
            raise LoraError(f"LoRA file not found: {path}") from None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._files:
            self._files[key] = read_lora(path)
        return self._files[key]

    def weight_map(self) -> dict[str, dict[str, dict]]:
        if self._map is None:
            rel = self.manifest.weight_map
            if not rel:
                raise LoraError(f"{self.bundle} was converted before bundles recorded where their weights are "
                                "(weights.json): re-convert it to apply LoRAs at run time, or fuse them with "
                                "`edge convert MODEL --lora FILE:SCALE`")
            if self.verify:
                verify_paths(self.bundle, self.manifest, [rel], "LoRA weight map")
            self._map = json.loads((self.bundle / rel).read_text(encoding="utf-8"))
        return self._map

    def use(self, loras: list[tuple[LoraFile, float]], warn: Callable[[str], None] | None = None) -> list[GraphKey]:
        """Make `loras` the active set (empty: none); returns the graphs whose weights changed, which the caller
        reloads. Graphs not touched by the old or the new set keep their sessions."""
        by_graph: dict[GraphKey, list] = {}
        resolved = resolve(loras, {c: set(w) for c, w in self.weight_map().items()}, warn=warn) if loras else None
        if resolved is not None:
            where = self.weight_map()
            sha = {id(layer): lora.sha256 for lora, _ in loras for layer in lora.layers}
            for (component, weight), changes in resolved.changes.items():
                if where[component][weight].get("unused"):  # a weight the graphs never read (SDXL's last TE layer)
                    continue
                key = (component, where[component][weight]["graph"])
                by_graph.setdefault(key, []).extend((weight, sha[id(layer)], layer.module, scale)
                                                    for layer, scale in changes)
        for encoder in self._encoders() if self.embeddings else ():  # token tables, grown by every embedding loaded
            name, table = self._table(encoder)
            by_graph.setdefault((encoder, table["graph"]), []).append(
                (name, "", " ".join(e.token for e in self.embeddings), 1.0))
        wanted = {k: tuple(sorted(v)) for k, v in by_graph.items()}
        changed = [k for k in set(self.applied) | set(wanted) if self.applied.get(k) != wanted.get(k)]
        new = {key: self._weights(key, resolved) for key in changed if key in wanted}  # may raise: nothing changed yet
        for key in changed:
            self.alive.pop(key, None)
            if key in new:
                self.overrides[key], self.applied[key] = new[key], wanted[key]
            else:
                self.overrides.pop(key, None)
                self.applied.pop(key, None)
        self._files = {k: f for k, f in self._files.items() if any(f is lora for lora, _ in loras)}  # the active
        return sorted(changed)

    def extra_bytes(self, component: str | None = None) -> int:
        """Memory the changed weights hold for a component (None: all), with the LoRA files read for them: they
        stay resident while the LoRAs are active, whether or not their graphs are loaded (the planner counts
        them in the base)."""
        weights = sum(a.nbytes for (c, _), values in self.overrides.items() if component in (None, c)
                      for a in values.values())
        files = sum(x.nbytes for f in self._files.values() for layer in f.layers for x in (layer.up, layer.down))
        return weights + (files if component is None else 0)

    def add_embedding(self, embedding: Embedding, tokenizer) -> Embedding:
        """A textual-inversion embedding's tokens into the vocabulary, its vectors into the token table at the
        next use(); its rows must follow the table's (the tokenizer numbers new words after the vocabulary)."""
        xl = bool(self.manifest.conditioning)
        if xl != (embedding.vectors_2 is not None):
            raise EmbeddingError(
                f"{embedding.path.name}: an SDXL embedding (clip_l, clip_g), but this {self.manifest.family} bundle "
                "has one text encoder" if not xl else f"{embedding.path.name}: one set of vectors, but this "
                f"{self.manifest.family} bundle's text encoders need an SDXL embedding (clip_l and clip_g)")
        for encoder in self._encoders():
            name, entry = self._table(encoder)
            if entry is None or entry["stored"] != "float":
                raise EmbeddingError(f"{self.bundle} does not record {encoder}'s token table as a float weight; "
                                     "re-convert it to use textual-inversion embeddings")
            width = self.manifest.components[encoder].outputs[0].shape[-1]
            grown_table(np.zeros((0, width), np.float32), [embedding], encoder)  # checked before the vocabulary grows
        ids = tokenizer.add_words(embedding.tokens)
        self.embeddings.append(embedding)
        self._token_ids.append(ids)
        return embedding

    def _weights(self, key: GraphKey, resolved) -> dict[str, np.ndarray]:
        component, k = key
        where = self.weight_map()[component]
        changes = {} if resolved is None else {
            w: ch for (c, w), ch in resolved.changes.items() if c == component and where[w].get("graph") == k}
        table, entry = self._table(component) if self.embeddings and component in self._encoders() else (None, None)
        if entry is not None and entry["graph"] == k:
            changes[table] = []
        entries = {w: where[w] for w in changes}
        names = {e["initializer"] for e in entries.values()}
        names |= {e[n] for e in entries.values() if e["stored"] == "int8" for n in ("scale", "zero_point")}
        graph = self.bundle / self.manifest.components[component].graphs[k]
        base = read_initializers(graph, names)
        out = {}
        for weight, e in entries.items():
            if weight == table:
                out[e["initializer"]] = self._grown(base[e["initializer"]], component)
            elif e["stored"] == "float":
                out[e["initializer"]] = apply_changes(base[e["initializer"]], changes[weight], e["transposed"])
            else:
                q, scale, zero = base[e["initializer"]], base[e["scale"]], base[e["zero_point"]]
                w = apply_changes(_dequantize(q, scale, zero), changes[weight], e["transposed"])
                out[e["initializer"]], out[e["scale"]], out[e["zero_point"]] = _requantize(w, q, scale, zero)
        return out

    def _encoders(self) -> list[str]:
        """The bundle's text encoders, whose token tables an embedding grows (SDXL: both; its refiner: the second)."""
        return [c for c in ("text_encoder", "text_encoder_2") if c in self.manifest.components]

    def _table(self, encoder: str = "text_encoder") -> tuple[str | None, dict | None]:
        """(name, entry) of a text encoder's token table in weights.json (transformers before 5 nested it in
        `text_model.`)."""
        where = self.weight_map().get(encoder, {})
        for name in (TOKEN_TABLE, "text_model." + TOKEN_TABLE):
            if name in where:
                return name, where[name]
        return None, None

    def _grown(self, table: np.ndarray, encoder: str) -> np.ndarray:
        rows = len(table)
        for e, ids in zip(self.embeddings, self._token_ids):
            if ids != list(range(rows, rows + len(ids))):
                raise EmbeddingError(f"{e.path.name}: its tokens got ids {ids[0]}…, not the rows after the token "
                                     f"table's {rows}; this bundle's vocabulary and text encoder disagree")
            rows += len(ids)
        return grown_table(table, self.embeddings, encoder)


def _channel_axis(q: np.ndarray, scale: np.ndarray) -> int | None:
    """The axis a per-channel scale runs along (None: one scale for the tensor)."""
    if scale.size == 1:
        return None
    axes = [a for a, n in enumerate(q.shape) if n == scale.size]
    if not axes:
        raise LoraError(f"a quantised weight of shape {list(q.shape)} has {scale.size} scales: unknown scheme")
    return axes[0] if q.ndim != 2 else axes[-1]  # MatMul (in, out): per output column; Conv (out, ...): axis 0


def _broadcast(values: np.ndarray, q: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return values.reshape(())
    shape = [1] * q.ndim
    shape[axis] = -1
    return values.reshape(shape)


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    axis = _channel_axis(q, scale)
    return ((q.astype(np.float32) - _broadcast(zero, q, axis).astype(np.float32))
            * _broadcast(scale, q, axis).astype(np.float32))


def _requantize(w: np.ndarray, q: np.ndarray, scale: np.ndarray,
                zero: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w quantised as onnxruntime's quantiser stored q: int8 symmetric in [-127, 127] (zero point 0), or uint8
    asymmetric over [min(w, 0), max(w, 0)] in [0, 255]; one scale, or one per channel of q's."""
    axis = _channel_axis(q, scale)
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    lo, hi = np.minimum(w.min(axis=reduce), 0), np.maximum(w.max(axis=reduce), 0)
    if q.dtype == np.int8:
        qmin, qmax = -127, 127
        absmax = np.maximum(-lo, hi)
        lo, hi = -absmax, absmax
    else:
        qmin, qmax = 0, 255
    new_scale = ((hi - lo) / (qmax - qmin)).astype(np.float32)
    new_scale = np.where(new_scale > 0, new_scale, np.float32(1.0))
    new_zero = np.round(qmin - lo / new_scale)
    new_zero = np.zeros_like(new_zero) if q.dtype == np.int8 else new_zero
    s, z = _broadcast(new_scale, q, axis), _broadcast(new_zero, q, axis)
    new_q = np.clip(np.round(w / s) + z, qmin, qmax).astype(q.dtype)
    return new_q, new_scale.reshape(scale.shape).astype(scale.dtype), new_zero.reshape(zero.shape).astype(zero.dtype)


def describe(loras: list[tuple[LoraFile, float]]) -> list[dict[str, Any]]:
    """What a generation records of its LoRAs (PNG parameters, results)."""
    return [{"name": lora.name, "sha256": lora.sha256[:12], "scale": scale} for lora, scale in loras]


LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>")
LoraSpec = tuple  # (path | LoraFile, scale)


def strip_lora_tags(text: str) -> tuple[str, list[tuple[str, str]]]:
    """A1111's `<lora:NAME:SCALE>` (SCALE optional: 1) taken out of a prompt: (the prompt without them, [(NAME,
    SCALE text)])."""
    tags = [(m[1].strip(), (m[2] or "1").strip()) for m in LORA_TAG.finditer(text)]
    text = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", LORA_TAG.sub("", text)))
    return text.strip(" ,"), tags


def lora_files(adapters: "Adapters", loras, prompt: str, negative: str,
               lora_dir: Path | str | None) -> tuple[str, str, list[tuple[LoraFile, float]]]:
    """The LoRAs a generation asks for, as `loras` [(file or LoraFile, scale)] and as `<lora:NAME:SCALE>` in
    either prompt (NAME.safetensors in `lora_dir`); returns both prompts without the tags."""
    prompt, tags = strip_lora_tags(prompt)
    negative, negative_tags = strip_lora_tags(negative)
    wanted = []
    for spec in loras or ():
        if not isinstance(spec, (tuple, list)) or len(spec) != 2:
            raise LoraError(f"LoRA {spec!r}: expected (file, scale)")
        wanted.append((spec[0], parse_scale(spec[1], f"LoRA {spec[0]}")))
    for name, scale in tags + negative_tags:
        if lora_dir is None:
            raise LoraError(f"the prompt asks for <lora:{name}:{scale}> but no LoRA folder is set (--lora-dir)")
        path = Path(lora_dir) / f"{name}.safetensors"
        if not path.is_file():
            known = sorted(p.stem for p in Path(lora_dir).glob("*.safetensors"))
            raise LoraError(f"<lora:{name}:{scale}>: no {path.name} in {lora_dir}; there: {', '.join(known) or 'none'}")
        wanted.append((path, parse_scale(scale, f"<lora:{name}>")))
    return prompt, negative, [(f if isinstance(f, LoraFile) else adapters.read(f), s) for f, s in wanted]
