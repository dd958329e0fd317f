"""Weight compression with coremltools.optimize, and what it costs, measured in torch.

| name        | what                                   | iOS 16/17 granularity | iOS 18 granularity            |
|-------------|----------------------------------------|-----------------------|-------------------------------|
| `int8`      | 8-bit linear (symmetric) quantisation  | per output channel    | per block of 32 input weights*|
| `palettize6`| 6-bit k-means palette (64 values)      | one palette per tensor| one per group of 16 channels  |
| `palettize4`| 4-bit k-means palette (16 values)      | one palette per tensor| one per group of 16 channels  |

*16 where a model's channel counts are not multiples of 32 (the default model's 48): blocks must divide them.

The cost is measured on the torch side, where a reference exists on every OS: the compressed program's
weights are decompressed (coremltools' own `constexpr` value inference), loaded into a copy of the torch
module, and its output compared with the fp32 module's (PSNR), as well as each weight with its original.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator

import numpy as np
import torch

from edge.metrics import psnr

COMPRESSIONS = ("int8", "palettize6", "palettize4")
OPS = {"int8": ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"),
       "palettize6": ("constexpr_lut_to_dense",), "palettize4": ("constexpr_lut_to_dense",)}
BITS = {None: 16, "int8": 8, "palettize6": 6, "palettize4": 4}
MIN_WEIGHT_ELEMENTS = 2048  # smaller tensors (norms, biases) stay fp16: compressing them saves nothing


def is_ios18(target: str) -> bool:
    return target in ("iOS18", "macOS15", "watchOS11", "tvOS11", "visionOS2")


def config(compression: str, target: str, block_size: int = 32):
    """The coremltools.optimize config for `compression` at deployment `target`."""
    import coremltools.optimize.coreml as cto

    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown Core ML compression {compression!r}; choose one of {COMPRESSIONS}")
    ios18 = is_ios18(target)
    if compression == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                         granularity="per_block" if ios18 else "per_channel",
                                         block_size=block_size if ios18 else None, weight_threshold=MIN_WEIGHT_ELEMENTS)
    else:
        nbits = int(compression[-1])
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits,
                                    granularity="per_grouped_channel" if ios18 else "per_tensor",
                                    group_size=16 if ios18 else None, weight_threshold=MIN_WEIGHT_ELEMENTS)
    return cto.OptimizationConfig(global_config=op)


def compress(mlmodel, compression: str, target: str, block_size: int = 32):
    """`mlmodel` (converted with skip_model_load) with its large weights compressed."""
    import logging

    import coremltools.optimize.coreml as cto

    cfg = config(compression, target, block_size)
    quiet = logging.getLogger("coremltools")
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)  # one "skipped this op" line per small tensor otherwise
    try:
        if compression == "int8":
            return cto.linear_quantize_weights(mlmodel, cfg)
        return cto.palettize_weights(mlmodel, cfg)
    finally:
        quiet.setLevel(level)


_SUFFIX = re.compile(r"(_to_fp16)?_(quantized|palettized)$")


def decompressed_weights(mlmodel) -> Iterator[tuple[str, np.ndarray]]:
    """(const name: the torch parameter path with `_` for `.`, the weight the compressed program computes),
    one at a time: a full-size UNet's weights decompressed at once would be GBs."""
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            yield _SUFFIX.sub("", op.name), np.asarray(op.materialized_val_inference(), dtype=np.float32)


def weight_op_types(mlmodel) -> dict[str, int]:
    """How many ops of each `constexpr_*` type the program holds (what the weights are stored as)."""
    counts: dict[str, int] = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return counts


def stored_weights(package) -> list[dict]:
    """The compressed-weight ops of a saved .mlpackage, read from its spec (no model load, any OS):
    [{"op": type, "output": name, "shapes": {argument: shape}}], e.g. a per-tensor 4-bit palette has
    "lut" shape [16]; an iOS 18 palette per group of 16 channels [C/16, 1, 1, 1, 16, 1]."""
    import coremltools as ct

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    main = spec.mlProgram.functions["main"]
    out = []
    for op in main.block_specializations[main.opset].operations:
        if not op.type.startswith("constexpr_"):
            continue
        shapes = {k: [d.constant.size for d in v.type.tensorType.dimensions] for k, v in op.attributes.items()
                  if v.type.HasField("tensorType")}
        shapes |= {k: [d.constant.size for d in v.arguments[0].value.type.tensorType.dimensions]
                   for k, v in op.inputs.items() if v.arguments and v.arguments[0].HasField("value")}
        out.append({"op": op.type, "output": op.outputs[0].name, "shapes": shapes})
    return out


def torch_side_psnr(module: torch.nn.Module, mlmodel, inputs: tuple[torch.Tensor, ...]) -> dict:
    """Output PSNR of `module` with the compressed weights vs its fp32 self, and the worst weight's PSNR."""
    by_const = _suffix_index([name for name, _ in module.named_parameters()])
    changed = copy.deepcopy(module)
    params = dict(changed.named_parameters())
    worst, matched, compressed = float("inf"), 0, 0
    with torch.no_grad():
        for const, value in decompressed_weights(mlmodel):
            compressed += 1
            name = _lookup(by_const, const)
            if name is None or tuple(params[name].shape) != value.shape:
                continue
            worst = min(worst, psnr(params[name].numpy(), value))
            params[name].copy_(torch.from_numpy(value))
            matched += 1
        ref, got = _outputs(module, inputs), _outputs(changed, inputs)
    return {"output_psnr_db": round(min(psnr(r, g) for r, g in zip(ref, got)), 2),
            "min_weight_psnr_db": round(worst, 2) if matched else None,
            "weights_compressed": compressed, "weights_checked": matched}


def _suffix_index(names: list[str]) -> dict[str, str | None]:
    """Every `_`-joined tail of every parameter path -> that parameter (None where two share the tail).

    coremltools names a weight after the traced module path, sometimes with a level dropped
    (`text_encoder.text_model.encoder...` becomes `text_encoder_encoder_...`): the longest shared tail finds it.
    """
    index: dict[str, str | None] = {}
    for name in names:
        parts = name.split(".")
        for k in range(len(parts)):
            tail = "_".join(parts[k:])
            index[tail] = name if tail not in index or index[tail] == name else None
    return index


def _lookup(index: dict[str, str | None], const: str) -> str | None:
    parts = const.split("_")
    for k in range(len(parts)):
        hit = index.get("_".join(parts[k:]))
        if hit is not None:
            return hit
        if "_".join(parts[k:]) in index:  # ambiguous tail: a shorter one is only more so
            return None
    return None


def _outputs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    out = module(*inputs)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
