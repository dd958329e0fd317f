"""Save an ONNX graph with its weights in a page-aligned `.data` file, so that onnxruntime maps them.

onnxruntime memory-maps an external initializer instead of reading it when its offset is a multiple of the
allocation granularity (the page size on Linux and macOS; 64 KiB on Windows). A mapped weight costs no copy
while the session is created, and leaves the process when the session is freed; read through the protobuf
(weights inline) or into a buffer, every weight is copied at least once while the session is created. That
copy is what made streamed UNet chunks slow and large (benchmarks/RESULTS.md, "Streaming the UNet").
onnx's own writer (`onnx.save_model(..., save_as_external_data=True)`) packs tensors back to back; this one
starts every tensor of at least ALIGN bytes on an ALIGN boundary. Smaller tensors stay in the protobuf:
mapping them would waste most of a page each.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx.external_data_helper import set_external_data

ALIGN = 64 * 1024  # the largest allocation granularity among the platforms (Windows); a multiple of 4 and 16 KiB pages


def save_aligned(model: onnx.ModelProto, path: Path, align: int = ALIGN) -> list[str]:
    """Write `model` to `path` with every initializer of >= `align` bytes at an aligned offset of
    `path.name + ".data"` (written to temporary names, then renamed). Returns the files written. `model`'s
    large initializers are left pointing at the data file."""
    data = path.with_name(path.name + ".data")
    parts = [path.with_name(path.name + ".partial"), data.with_name(data.name + ".partial")]
    try:
        with open(parts[1], "wb") as f:
            for tensor in model.graph.initializer:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    raise ValueError(f"save_aligned: initializer {tensor.name!r} still refers to an external "
                                     "file; load its data first")
                if len(tensor.raw_data) < align:
                    continue
                offset = f.seek(-f.tell() % align, os.SEEK_CUR)
                f.write(tensor.raw_data)
                set_external_data(tensor, data.name, offset, len(tensor.raw_data))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
        external = parts[1].stat().st_size > 0
        onnx.save_model(model, str(parts[0]))
        parts[0].replace(path)
        if external:
            parts[1].replace(data)
        else:
            parts[1].unlink()
            data.unlink(missing_ok=True)
    finally:
        for p in parts:
            p.unlink(missing_ok=True)
    return [path.name, *([data.name] if external else [])]


def realign(files: list[Path]) -> list[Path]:
    """Rewrite the graph `files[0]` (its external data, if any, among `files`) with save_aligned; returns the
    files it has now, the ones no longer needed removed."""
    path = files[0]
    model = onnx.load(str(path))  # its external data read in
    kept = [path.with_name(name) for name in save_aligned(model, path)]
    del model
    for old in files:
        if old not in kept:
            old.unlink(missing_ok=True)
    return kept
