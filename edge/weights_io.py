"""Reading weights on the device without torch, safetensors or onnx: a `.safetensors` file's tensors, and named
initializers of an ONNX graph (inline or in its external-data file).

safetensors: 8 bytes of little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} with an
optional "__metadata__" of strings, then the raw little-endian bytes. ONNX: a protobuf ModelProto whose graph
(field 7) lists its initializers (GraphProto field 5) as TensorProtos; only the fields a weight needs are read.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# TensorProto.DataType -> numpy (bfloat16, 16, is widened by hand)
ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 10: np.float16,
               11: np.float64}


class WeightsError(ValueError):
    """A weights file that cannot be read: the file, and what was expected."""


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; tensors are float32 or their stored integer type (bf16 and f16
    widened to float32). Pickles are refused: unpickling runs whatever code the file holds."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"refusing to load {path}: {path.suffix} files are Python pickles, and unpickling runs "
                           "whatever code the file contains; use the .safetensors version of it")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
    except (struct.error, ValueError):
        raise WeightsError(f"{path} is not a .safetensors file (no JSON header)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a .safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n :]
    tensors = {}
    for name, info in header.items():
        try:
            kind, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: tensor {name!r} has no dtype/shape/data_offsets") from None
        raw = body[start:end]
        if kind == "BF16":
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif kind in SAFETENSORS_DTYPES:
            array = np.frombuffer(raw, SAFETENSORS_DTYPES[kind])
        else:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {kind}; readable: BF16, "
                               f"{', '.join(SAFETENSORS_DTYPES)}")
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise WeightsError(f"{path}: tensor {name!r} holds {array.size} values for shape {list(shape)}")
        array = array.reshape(shape)
        tensors[name] = array.astype(np.float32) if array.dtype.kind == "f" else array
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _varint(buf, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) over buf[start:end]."""
    i = start
    while i < end:
        tag, i = _varint(buf, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield number, wire, value
        elif wire == 2:
            n, i = _varint(buf, i)
            yield number, wire, (i, i + n)
            i += n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, wire, (i, i + size)
            i += size
        else:
            raise WeightsError(f"unsupported protobuf wire type {wire}")


def initializer_names(path: Path) -> list[str]:
    """Names of every initializer of the ONNX graph at `path`."""
    return list(_scan(Path(path), None))


def read_initializers(path: Path, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """The named initializers (all, with None) of the ONNX graph at `path`, as numpy arrays (copies)."""
    return dict(iter_initializers(path, names))


def iter_initializers(path: Path, names: set[str] | None = None):
    """(name, array) of the named initializers (all, with None), read one at a time."""
    for name, read in _scan(Path(path), names).items():
        yield name, read()


def _scan(path: Path, names: set[str] | None) -> dict:
    """name -> a function that reads that initializer, for the wanted ones."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    found = {}
    for number, wire, span in _fields(buf, 0, len(buf)):
        if number == 7 and wire == 2:  # ModelProto.graph
            for n, w, tspan in _fields(buf, *span):
                if n == 5 and w == 2:  # GraphProto.initializer
                    name, reader = _tensor(buf, tspan, path)
                    if names is None or name in names:
                        found[name] = reader
    return found


TYPED_FIELDS = {4: np.float32, 5: np.int32, 7: np.int64, 10: np.float64}


def _typed(buf, field: tuple, kind) -> np.ndarray:
    """A TensorProto's typed data field as `kind` (int8/uint8/int16 and float16 bits travel in int32_data)."""
    n, wire, value = field
    if n in (4, 10):  # fixed-width, packed (or one unpacked value)
        start, end = value
        return np.frombuffer(bytes(buf[start:end]), TYPED_FIELDS[n]).astype(kind)
    if wire == 0:
        values = [value]
    else:
        values, i = [], value[0]
        while i < value[1]:
            v, i = _varint(buf, i)
            values.append(v)
    wide = np.array([v - (1 << 64) if v >= 1 << 63 else v for v in values], np.int64)  # two's complement
    return wide.astype(np.uint16).view(np.float16) if kind == np.float16 else wide.astype(kind)


def _tensor(buf, span: tuple[int, int], graph: Path):
    dims, dtype, name, raw, external, typed = [], 0, "", None, {}, None
    for n, w, value in _fields(buf, *span):
        if n == 1:
            if w == 0:
                dims.append(value)
            else:  # packed
                i, end = value
                while i < end:
                    d, i = _varint(buf, i)
                    dims.append(d)
        elif n == 2:
            dtype = value
        elif n == 8:
            name = bytes(buf[value[0] : value[1]]).decode()
        elif n == 9:
            raw = value
        elif n in TYPED_FIELDS:  # float_data, int32_data, int64_data, double_data (small tensors: scales, zero points)
            typed = (n, w, value)
        elif n == 13:
            entry = {k: bytes(buf[v[0] : v[1]]).decode() for k, _, v in _fields(buf, *value)}
            external[entry.get(1, "")] = entry.get(2, "")

    def read() -> np.ndarray:
        if dtype == 16:
            kind = np.uint16
        elif dtype in ONNX_DTYPES:
            kind = ONNX_DTYPES[dtype]
        else:
            raise WeightsError(f"{graph}: initializer {name!r} has ONNX data type {dtype}, which is not read here")
        if typed is not None:
            return _typed(buf, typed, kind).reshape(dims)
        if external:
            offset, length = int(external.get("offset", 0)), external.get("length")
            with open(graph.parent / external["location"], "rb") as f:
                f.seek(offset)
                data = f.read(int(length) if length else -1)
        elif raw is not None:
            data = bytes(buf[raw[0] : raw[1]])
        else:
            data = b""
        array = np.frombuffer(data, kind).copy()
        if dtype == 16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.reshape(dims)

    return name, read
