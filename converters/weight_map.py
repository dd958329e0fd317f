"""Which ONNX initializer holds which model weight: written at convert time (`weights.json`) so that the runtime
can change weights (LoRA) without torch and without re-converting.

torch's exporter keeps a Conv weight under its parameter name but a Linear weight as a transposed constant
(`onnx::MatMul_123`, shape (in, out)), so weights are matched by value: every Linear and Conv2d weight of the
diffusers model against every initializer of the fp32 graph, as stored or transposed. A weight found twice (two
identical tensors) is left out rather than guessed. After quantisation and splitting, `locate` says in which
graph file each one ended up and how it is stored there: float (fp32/fp16), or int8 with its scale and zero point.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from edge.weights_io import initializer_names, iter_initializers

WEIGHT_MAP = "weights.json"
QUANTIZED_SUFFIXES = ("_quantized", "_scale", "_zero_point")


def _key(array: np.ndarray) -> tuple:
    return array.shape, hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def match_weights(model: torch.nn.Module, graph: Path) -> dict[str, tuple[str, bool]]:
    """weight name (`down_blocks.0.resnets.0.conv1.weight`) -> (initializer, transposed) for each Linear / Conv2d /
    Embedding weight of `model` that the fp32 graph at `graph` stores as an initializer."""
    wanted: dict[tuple, list[tuple[str, bool]]] = {}
    for name, module in model.named_modules():  # Embedding: the token table, which textual inversion grows
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
            w = module.weight.detach().float().numpy()
            wanted.setdefault(_key(w), []).append((name + ".weight", False))
            if w.ndim == 2:
                wanted.setdefault(_key(w.T), []).append((name + ".weight", True))
    found: dict[str, list[tuple[str, bool]]] = {}
    for init, array in iter_initializers(graph):  # one at a time: a UNet's are GBs
        if array.ndim >= 2 and array.dtype == np.float32:
            for weight, transposed in wanted.get(_key(array), ()):
                found.setdefault(weight, []).append((init, transposed))
    duplicated = {k for keys in wanted.values() for k, _ in keys if len({w for w, _ in keys}) > 1}
    return {w: places[0] for w, places in found.items() if len(places) == 1 and w not in duplicated}


def locate(matched: dict[str, tuple[str, bool]], graphs: list[Path]) -> dict[str, dict]:
    """Where each matched weight is in the final graph files (run order): {"graph": k, "initializer", "transposed",
    "stored": "float" | "int8"} (int8: the initializer is the quantised weight, with "scale" and "zero_point")."""
    names = [set(initializer_names(g)) for g in graphs]
    out = {}
    for weight, (init, transposed) in matched.items():
        for k, held in enumerate(names):
            if init in held:
                out[weight] = {"graph": k, "initializer": init, "transposed": transposed, "stored": "float"}
            elif all(init + s in held for s in QUANTIZED_SUFFIXES):
                out[weight] = {"graph": k, "initializer": init + "_quantized", "transposed": transposed,
                               "stored": "int8", "scale": init + "_scale", "zero_point": init + "_zero_point"}
            else:
                continue
            break
    return out


LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL's


def model_weights(pipe) -> dict[str, dict[str, torch.nn.Parameter]]:
    """component -> {weight name: parameter} of every Linear and Conv2d a LoRA can change."""
    return {c: {name + ".weight": m.weight for name, m in getattr(pipe, c).named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
            for c in LORA_COMPONENTS if getattr(pipe, c, None) is not None}


def fuse_loras(pipe, loras: list[tuple[str, float]], log) -> list[dict]:
    """Add each LoRA (path, scale) into the model's weights before export, as edge's runtime would; returns what
    the manifest records of them (file, sha256, scale, layers applied)."""
    from edge.lora import apply_changes, read_lora, resolve

    files = [(read_lora(path), scale) for path, scale in loras]
    weights = model_weights(pipe)
    resolved = resolve(files, {c: set(w) for c, w in weights.items()}, warn=log)
    with torch.no_grad():
        for (component, name), changes in resolved.changes.items():
            param = weights[component][name]
            param.copy_(torch.from_numpy(apply_changes(param.detach().float().numpy(), changes, False)))
    records = []
    for lora, scale in files:
        own = {id(layer) for layer in lora.layers}
        applied = sum(1 for changes in resolved.changes.values() for layer, _ in changes if id(layer) in own)
        records.append({"file": lora.path.name, "sha256": lora.sha256, "scale": scale, "layers": applied})
        log(f"  LoRA {lora.path.name} x {scale:g}: {applied} of {len(lora.layers)} layers fused")
    return records


def add_weight_map(bundle: Path, source: str) -> dict[str, dict]:
    """Write weights.json into a bundle converted before bundles recorded it (fp32 or fp16 weights: matched by
    value against `source`, the model it was converted from), and name it in the manifest; atomically."""
    import json
    import os

    from edge.bundle import MANIFEST, read_manifest, sha256_file
    from edge.converters.sources import open_source

    manifest = read_manifest(bundle)
    pipe = open_source(source).pipe
    found = {}
    for name in (c for c in LORA_COMPONENTS if c in manifest.components):
        graphs = [bundle / g for g in manifest.components[name].graphs]
        matched = {}
        for graph in graphs:
            matched.update(match_weights(getattr(pipe, name), graph))
        found[name] = locate(matched, graphs)
    tmp = bundle / (WEIGHT_MAP + ".tmp")
    tmp.write_text(json.dumps(found, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, bundle / WEIGHT_MAP)
    data = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    data["weight_map"] = WEIGHT_MAP
    data.setdefault("files", {})[WEIGHT_MAP] = sha256_file(bundle / WEIGHT_MAP)
    tmp = bundle / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, bundle / MANIFEST)
    return found


def main(argv: list[str] | None = None) -> int:
    """python -m edge.converters.weight_map BUNDLE SOURCE: add weights.json to an older fp32/fp16 bundle."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m edge.converters.weight_map", description=main.__doc__)
    p.add_argument("bundle", type=Path)
    p.add_argument("source", help="the model the bundle was converted from (folder, file or cached Hub id)")
    a = p.parse_args(argv)
    found = add_weight_map(a.bundle, a.source)
    print(", ".join(f"{c}: {len(w)} weights" for c, w in found.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
