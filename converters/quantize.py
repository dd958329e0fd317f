"""Lower-precision copies of a bundle's ONNX graphs: fp16, int8 (dynamic) and int4 (MatMul weights).

Each call reads one ONNX file and writes another whose interface is unchanged: the same input and output
names, still float32, so the runtime feeds a quantized graph exactly as it feeds the fp32 one. The
defaults follow what was measured fast on a 2-core AVX-512/VNNI CPU (/work/shared/PEERS.md):

- int8: onnxruntime's dynamic quantization (weights quantized offline, activations per call). MatMul/Gemm
  weights only, as int8, by default: uint8 activations x int8 weights run on VNNI and were the most
  accurate (rel. L2 1.05e-2 on the SD 1.5 UNet). With Conv included the weights become uint8, because
  ConvInteger with int8 weights runs at half the fp32 speed on CPUs without AVX-VNNI-INT8.
- int8 with `activations="static"`: Conv activations get scales calibrated once, on inputs the caller
  supplies (converters/calibrate.py: the UNet's own denoising trajectories), and Conv weights int8
  per output channel, written as QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into
  QLinearConv: 3.2-3.8x the fp32 Conv throughput on VNNI (606-787 vs 189-209 GMAC/s on SD 1.5's 3x3
  shapes, benchmarks/int8_conv.py). MatMul/Gemm stay dynamic: their per-call quantization is cheap and
  exact-range. The model's boundary convolutions stay fp32 (`_boundary_convs`).
- fp16: halves the file. x86 CPUs compute most fp16 ops through casts (SD 1.5 UNet 15.3 s vs 10.5 s per
  call), so it is for size and for devices with fp16 units. Resize stays fp32 (its scales must be fp32).
- int4: MatMul/Gemm weights in blocks of `block_size` with one fp32 scale each (MatMulNBits); the rest,
  Conv included, stays fp32.

`mixed_precision` keeps the most sensitive layer groups at fp32 until a parity threshold is met.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_model

from edge.converters.onnx_export import ONE_FILE_LIMIT
from edge.metrics import psnr

PRECISIONS = ("fp32", "fp16", "int8", "int4")
OP_CHOICES = {"int8": ("MatMul", "Gemm", "Conv", "Gather"), "int4": ("MatMul", "Gemm")}
DEFAULT_OPS = ("MatMul", "Gemm")
WEIGHT_TYPES = ("int8", "uint8")
ACTIVATIONS = ("dynamic", "static")
BLOCK_SIZES = (16, 32, 64, 128, 256)
_LOW_BIT = {"fp16": {onnx.TensorProto.FLOAT16}, "int8": {onnx.TensorProto.INT8, onnx.TensorProto.UINT8},
            "int4": {onnx.TensorProto.UINT8, onnx.TensorProto.UINT4, onnx.TensorProto.INT4}}


def quantize(
    src: Path | str,
    dst: Path | str,
    precision: str,
    *,
    keep_fp32: Sequence[str] = (),
    ops: Sequence[str] | None = None,
    weight_type: str | None = None,
    block_size: int = 32,
    activations: str = "dynamic",
    calibration: Sequence[dict[str, np.ndarray]] | None = None,
    calibration_cache: Path | str | None = None,
    external_data_over: int = ONE_FILE_LIMIT,
) -> dict:
    """Write `src` at `precision` to `dst`; nodes named in `keep_fp32` stay fp32.

    `ops` (int8, int4) picks the op types whose weights are quantized, default MatMul + Gemm (int8 with
    static activations: MatMul, Gemm and Conv).
    `weight_type` (int8, dynamic) is "int8" or "uint8"; by default uint8 when Conv is quantized, else int8.
    `activations` (int8) is "dynamic" or "static": static calibrates Conv activation scales on
    `calibration` (a list of input feeds for `src`), keeping the ranges in `calibration_cache` when given so
    later calls on the same graph skip the calibration runs.
    Weights go to `dst`.data when they exceed `external_data_over` bytes (protobuf stops at 2 GiB).
    Returns what was done and the bytes before and after, for the manifest.
    """
    src, dst = Path(src), Path(dst)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {PRECISIONS}")
    if src.resolve() == dst.resolve():
        raise ValueError(f"quantize: dst {dst} is the source graph; write to another file")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r}; expected one of {ACTIVATIONS}")
    static = activations == "static"
    if static and precision != "int8":
        raise ValueError(f"activations='static' applies to int8, not to precision={precision!r}")
    ops = _check_ops(precision, ops, activations)
    if static and "Conv" not in ops:
        raise ValueError(f"activations='static' calibrates Conv activations; ops={list(ops)} has no Conv")
    if static and weight_type not in (None, "int8"):
        raise ValueError("activations='static' stores Conv weights as int8 per channel; weight_type must be int8")
    if static and not calibration and not (calibration_cache and Path(calibration_cache).is_file()):
        raise ValueError("activations='static' needs calibration feeds (or an existing calibration_cache)")
    graph = onnx.load(str(src), load_external_data=False).graph  # names and shapes only: small at any size
    names = {n.name for n in graph.node}
    unknown = sorted(set(keep_fp32) - names)
    if unknown:
        raise ValueError(f"keep_fp32 names nodes that are not in {src.name}: {unknown[:5]}")
    before = _weight_bytes(graph)
    _remove_outputs(dst)
    options: dict = {}
    if precision == "fp32":
        _copy(src, dst)
    elif precision == "fp16":
        _to_fp16(src, dst, keep_fp32, external_data_over)
    elif precision == "int8":
        external = sum(before.values()) > external_data_over  # decided by the source: the output is never larger
        if static:
            boundary = _boundary_convs(graph)
            options.update(weight_type="int8", activations="static", calibration_samples=len(calibration or ()),
                           boundary_fp32=boundary)
            _int8_static(src, dst, graph, sorted({*keep_fp32, *boundary}), ops, calibration, calibration_cache,
                         external)
        else:
            options["weight_type"] = _int8(src, dst, graph, keep_fp32, ops, weight_type, external)
    else:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size={block_size}; expected one of {BLOCK_SIZES}")
        options["block_size"] = block_size
        _int4(src, dst, graph, keep_fp32, ops, block_size, external_data_over)
    del graph
    out = onnx.load(str(dst), load_external_data=False).graph
    files = _files(dst, out)
    return {
        "precision": precision,
        **({"ops": list(ops)} if precision in OP_CHOICES else {}),
        **options,
        "kept_fp32": sorted(keep_fp32),
        "nodes_converted": _nodes_converted(out, precision),  # nodes whose weight matrix is now stored lower
        "bytes_before": sum(f.stat().st_size for f in _files(src)),
        "bytes_after": sum(f.stat().st_size for f in files),
        "weight_bytes_before": before,  # initializer bytes by dtype
        "weight_bytes_after": _weight_bytes(out),
        "files": [f.name for f in files],
    }


def mixed_precision(
    src: Path | str,
    dst: Path | str,
    precision: str,
    parity: Callable[[Path], float],
    min_psnr_db: float,
    *,
    group_depth: int = 3,
    log: Callable[[str], None] = lambda line: None,
    **options,
) -> dict:
    """Quantize `src`, keeping layer groups at fp32, most sensitive first, until `parity(dst)` >= `min_psnr_db`.

    A group is a module path cut at `group_depth` levels of the node names the exporter writes
    ("/unet/down_blocks.0/attentions.0/..." -> "unet/down_blocks.0/attentions.0"). Each group's sensitivity
    is the PSNR gained by keeping it alone at fp32 while the rest is quantized; groups are then kept in
    that order (ties by name) until the threshold is met. Greedy rather than optimal: 1 + groups + kept
    quantize-and-check runs, deterministic, and explainable in one line per group. The threshold is met
    on the inputs `parity` uses, so give it more than one. `options` go to `quantize`.
    Returns the kept groups and nodes, the PSNR reached and every group's sensitivity.
    """
    src, dst = Path(src), Path(dst)
    if precision not in PRECISIONS[1:]:
        raise ValueError(f"mixed_precision: precision={precision!r}; expected one of {PRECISIONS[1:]}")

    def trial(keep: Sequence[str]) -> tuple[float, dict]:
        report = quantize(src, dst, precision, keep_fp32=keep, **options)
        return float(parity(dst)), report

    base_psnr, report = trial(())
    result = {"precision": precision, "min_psnr_db": min_psnr_db, "psnr_all_quantized_db": base_psnr}
    if base_psnr >= min_psnr_db:
        return {**result, "psnr_db": base_psnr, "kept_groups": [], "kept_fp32": [], "sensitivity": {},
                "quantize": report}
    graph = onnx.load(str(src), load_external_data=False).graph
    groups = quantizable_groups(graph, precision, _check_ops(precision, options.get("ops"),
                                                             options.get("activations", "dynamic")), group_depth)
    del graph
    if not groups:
        raise ValueError(f"mixed_precision: {src.name} has no node that {precision} converts; nothing to keep")
    log(f"    {src.stem}: {base_psnr:.1f} dB fully {precision} < {min_psnr_db} dB; measuring {len(groups)} layer "
        f"groups, one quantize-and-check each")
    sensitivity = {g: trial(nodes)[0] - base_psnr for g, nodes in groups.items()}
    order = sorted(groups, key=lambda g: (-sensitivity[g], g))
    kept: list[str] = []
    for g in order:
        kept.append(g)
        psnr_db, report = trial([n for k in kept for n in groups[k]])
        log(f"    {src.stem}: {g} kept at fp32 -> {psnr_db:.1f} dB")
        if psnr_db >= min_psnr_db:
            return {**result, "psnr_db": psnr_db, "kept_groups": kept,
                    "kept_fp32": sorted(report["kept_fp32"]), "sensitivity": sensitivity, "quantize": report}
    raise ValueError(
        f"mixed_precision: {src.name} reaches only {psnr_db:.1f} dB < {min_psnr_db} dB even with every layer "
        "group at fp32; lower the threshold or choose a higher precision"
    )


def quantizable_groups(graph: onnx.GraphProto, precision: str, ops: Sequence[str] | None,
                       depth: int) -> dict[str, list[str]]:
    """Node names that `precision` converts, by module path cut at `depth` levels."""
    ops = _check_ops(precision, ops)
    consts = {t.name for t in graph.initializer}
    groups: dict[str, list[str]] = {}
    for node in graph.node:
        if precision == "fp16":
            wanted = node.op_type not in ("Constant", "Identity")  # every computing node runs in fp16
        else:
            weight = 0 if node.op_type == "Gather" else 1  # the input holding the weights
            wanted = node.op_type in ops and len(node.input) > weight and node.input[weight] in consts
        if wanted and node.name:
            groups.setdefault("/".join(node.name.strip("/").split("/")[:depth]), []).append(node.name)
    return groups


def psnr_parity(reference: Path | str, feeds: dict[str, np.ndarray]) -> Callable[[Path], float]:
    """A parity function for `mixed_precision`: the lowest PSNR over all outputs against `reference` on `feeds`."""
    expected = _run(Path(reference), feeds)

    def parity(candidate: Path) -> float:
        return min(psnr(r, g) for r, g in zip(expected, _run(candidate, feeds)))

    parity.expected = expected  # the reference outputs, in the graph's output order, for the bundle's check data
    return parity


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from edge.sessions import open_session

    session = open_session(path)
    return session.run(None, feeds)


def _check_ops(precision: str, ops: Sequence[str] | None, activations: str = "dynamic") -> tuple[str, ...]:
    """The op types to quantize: `ops`, checked, or the default (static int8 adds Conv)."""
    if precision not in OP_CHOICES:
        if ops is not None:
            raise ValueError(f"ops= applies to {tuple(OP_CHOICES)} only, not to precision={precision!r}")
        return ()
    if ops is None:
        ops = (*DEFAULT_OPS, "Conv") if activations == "static" else DEFAULT_OPS
    ops = tuple(ops)
    bad = [o for o in ops if o not in OP_CHOICES[precision]]
    if bad or not ops:
        raise ValueError(f"ops={list(ops)}: {precision} quantizes a non-empty subset of {OP_CHOICES[precision]}")
    return ops


def _excluded(graph: onnx.GraphProto, keep_fp32: Sequence[str], ops: Sequence[str]) -> list[str]:
    """Node names to leave alone. onnxruntime rewrites each Gemm as MatMul (named NAME_MatMul) + Add before
    quantizing, so MatMul and Gemm are told apart here by their original names."""
    skip = set(keep_fp32)
    skip |= {n.name for n in graph.node if n.op_type == "MatMul" and "MatMul" not in ops}
    skip |= {n.name for n in graph.node if n.op_type == "Gemm" and "Gemm" not in ops}
    gemms = {n.name for n in graph.node if n.op_type == "Gemm"}
    return sorted(skip | {f"{name}_MatMul" for name in skip & gemms})


def _int8(src: Path, dst: Path, graph: onnx.GraphProto, keep_fp32: Sequence[str], ops: Sequence[str],
          weight_type: str | None, external: bool) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weight_type is None:
        weight_type = "uint8" if "Conv" in ops else "int8"
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type={weight_type!r}; expected one of {WEIGHT_TYPES}")
    with _quiet_onnxruntime_advice():
        quantize_dynamic(
            src, dst,
            op_types_to_quantize=sorted({"MatMul" if o == "Gemm" else o for o in ops}),
            weight_type=QuantType.QUInt8 if weight_type == "uint8" else QuantType.QInt8,
            nodes_to_exclude=_excluded(graph, keep_fp32, ops),
            use_external_data_format=external,
        )
    return weight_type


BOUNDARY_CONVS = ("conv_in", "conv_out", "quant_conv", "post_quant_conv")  # diffusers' names


def _boundary_convs(graph: onnx.GraphProto) -> list[str]:
    """The model's first and last convolutions (diffusers names them conv_in/conv_out, and the VAE's
    quant_conv/post_quant_conv), which static int8 leaves at fp32: they read latents and write the noise
    or pixels directly, so a per-tensor activation scale there costs the most (default UNet, held-out
    trajectory: 30.5 -> 39.5 dB), and they are well under 1% of the multiply-adds."""
    def module(node: onnx.NodeProto) -> str:
        parts = node.name.strip("/").split("/")
        return parts[-2] if len(parts) >= 2 else ""

    return sorted(n.name for n in graph.node if n.op_type == "Conv" and module(n) in BOUNDARY_CONVS)


@contextmanager
def _quiet_onnxruntime_advice():
    """onnxruntime's quantizers log generic advice ("consider pre-processing", "is the model already
    quantized?") on the root logger at WARNING on every call; the conversion log keeps its own lines."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _int8_static(src: Path, dst: Path, graph: onnx.GraphProto, keep_fp32: Sequence[str], ops: Sequence[str],
                 calibration: Sequence[dict] | None, cache: Path | str | None, external: bool) -> None:
    """Conv: calibrated QDQ (uint8 activations, int8 weights per output channel); MatMul/Gemm: dynamic int8."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    exclude = _excluded(graph, keep_fp32, ops)
    matmul = sorted({"MatMul" for o in ops if o in ("MatMul", "Gemm")})
    conv_dst = dst.with_name(dst.stem + ".conv" + dst.suffix) if matmul else dst
    _remove_outputs(conv_dst)
    with _quiet_onnxruntime_advice():
        quantize_static(
            src, conv_dst, FeedReader(list(calibration)) if calibration else None,
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"], per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            use_external_data_format=external, calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=None if cache is None else str(cache),
        )
        if matmul:
            quantize_dynamic(conv_dst, dst, op_types_to_quantize=matmul, weight_type=QuantType.QInt8,
                             nodes_to_exclude=exclude, use_external_data_format=external)
            for f in _files(conv_dst):
                f.unlink()


class FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of input feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _int4(src: Path, dst: Path, graph: onnx.GraphProto, keep_fp32: Sequence[str], ops: Sequence[str],
          block_size: int, external_data_over: int) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.onnx_model import ONNXModel

    root.handlers[:], root.level = handlers, level  # that import calls logging.basicConfig(level=INFO)
    model = ONNXModel(onnx.load(str(src)))
    if "Gemm" in ops:
        model.replace_gemm_with_matmul()  # MatMulNBits has no Gemm form
    quantizer = MatMulNBitsQuantizer(model.model, bits=4, block_size=block_size, is_symmetric=True,
                                     nodes_to_exclude=_excluded(graph, keep_fp32, ops),
                                     op_types_to_quantize=("MatMul",))
    del model
    quantizer.process()
    quantizer.model.remove_unused_constant()
    quantizer.model.topological_sort()
    _save(quantizer.model.model, dst, external_data_over)


def _to_fp16(src: Path, dst: Path, keep_fp32: Sequence[str], external_data_over: int) -> None:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)  # value_info tells where casts go; no weights loaded yet
    load_external_data_for_model(model, str(src.parent))
    model = convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Resize"],
        node_block_list=sorted(set(keep_fp32) | _sinusoid_ancestors(model.graph)),
    )
    _save(model, dst, external_data_over)


def _sinusoid_ancestors(graph: onnx.GraphProto) -> set[str]:
    """Nodes that feed a Sin or Cos: the timestep embedding, which diffusers computes in fp32 even in fp16
    pipelines (a timestep of 999 has a resolution of 0.5 in fp16, a quarter turn of its fastest sinusoid)."""
    producer = {o: n for n in graph.node for o in n.output}
    found: dict[str, onnx.NodeProto] = {}
    stack = [n for n in graph.node if n.op_type in ("Sin", "Cos")]
    while stack:
        node = stack.pop()
        if node.name not in found:
            found[node.name] = node
            stack += [producer[i] for i in node.input if i in producer]
    return set(found)


def _copy(src: Path, dst: Path) -> None:
    model = onnx.load(str(src), load_external_data=False)
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        shutil.copyfile(src, dst)
        return
    del model
    model = onnx.load(str(src))  # external data is named after the graph file: rewrite it under dst's name
    _save(model, dst, 0)


def _save(model: onnx.ModelProto, dst: Path, external_data_over: int) -> None:
    external = sum(_weight_bytes(model.graph).values()) > external_data_over
    onnx.save_model(model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=dst.name + ".data")


def _remove_outputs(dst: Path) -> None:
    """onnx appends to an existing external-data file, so a rerun must start from nothing."""
    for f in (dst, dst.with_name(dst.name + ".data")):
        f.unlink(missing_ok=True)


def _files(path: Path, graph: onnx.GraphProto | None = None) -> list[Path]:
    """The graph file and the external-data files it names."""
    graph = onnx.load(str(path), load_external_data=False).graph if graph is None else graph
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    return [path, *(path.parent / loc for loc in sorted(locations))]


def _weight_bytes(graph: onnx.GraphProto) -> dict[str, int]:
    """Initializer bytes by numpy dtype name, from dims alone (external data is not read)."""
    out: dict[str, int] = {}
    for t in graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        bits = 4 if t.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4) else 8 * dtype.itemsize
        out[dtype.name] = out.get(dtype.name, 0) + int(np.prod(t.dims, dtype=np.int64)) * bits // 8
    return out


def _nodes_converted(graph: onnx.GraphProto, precision: str) -> int:
    """Nodes that consume a weight matrix (an initializer of rank >= 2) stored at the new precision."""
    if precision == "fp32":
        return 0
    low = {t.name for t in graph.initializer if t.data_type in _LOW_BIT[precision] and len(t.dims) >= 2}
    return sum(1 for n in graph.node if any(i in low for i in n.input))
