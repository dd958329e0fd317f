"""One convolution of SD 1.5's UNet shapes through onnxruntime's CPU kernels, fp32 against the int8 forms.

    python benchmarks/int8_conv.py [--threads 2] [--repeat 7]

Three 3x3 convolutions of 7.55 GMAC each, batch 2 (classifier-free guidance), as the UNet has them at
512x512 (64, 32 and 16 latent pixels a side). Each is run as:
- fp32 Conv;
- static int8: QuantizeLinear -> DequantizeLinear -> Conv(DequantizeLinear(int8 weights, per channel)) ->
  QuantizeLinear -> DequantizeLinear, which onnxruntime fuses into QLinearConv (what
  `edge convert --precision int8 --activations static` writes);
- dynamic int8: DynamicQuantizeLinear -> ConvInteger(uint8 weights) -> scale (what `--quantize-ops Conv` writes).
Prints the median time, GMAC/s and the PSNR of each against fp32; then one of the UNet's MatMuls (the
feed-forward GEGLU projection at 64x64 latents) as fp32 and as dynamic int8 (onnxruntime's quantize_dynamic:
what `--precision int8` writes for MatMul/Gemm).

`--u8u8` opens the int8 graphs as edge does on x86 CPUs without VNNI (`session.x64quantprecision`, see
edge/cpu.py): int8 weights shifted to uint8, U8U8 kernels. Run it on a VNNI/AMX CPU to see what that path
would cost there (which is why edge never turns it on where VNNI exists).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge.metrics import psnr

SHAPES = [(2, 320, 64), (2, 640, 32), (2, 1280, 16)]  # batch, channels in = out, latent side
MATMUL = (2 * 4096, 320, 2560)  # rows (batch 2 x 64x64 tokens), in, out: down_blocks.0's GEGLU projection


def graph(nodes, inits, shape) -> bytes:
    g = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def fp32(w: np.ndarray, shape) -> bytes:
    return graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], {"w": w}, shape)


def static_int8(w: np.ndarray, x_range: float, y_range: float, shape) -> bytes:
    w_scale = (np.abs(w).reshape(len(w), -1).max(1) / 127).astype(np.float32)
    w_q = np.round(w / w_scale[:, None, None, None]).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "ys", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "z"], ["y"])]
    inits = {"xs": np.float32(2 * x_range / 255), "ys": np.float32(2 * y_range / 255), "z": np.uint8(128),
             "wq": w_q, "ws": w_scale, "wz": np.zeros(len(w), np.int8)}
    return graph(nodes, inits, shape)


def dynamic_int8(w: np.ndarray, shape) -> bytes:
    scale = np.float32((w.max() - w.min()) / 255)
    zero = np.uint8(np.round(-w.min() / scale))
    w_q = np.clip(np.round(w / scale) + zero, 0, 255).astype(np.uint8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("ConvInteger", ["xq", "wq", "xz", "wz"], ["acc"], pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["s"]), helper.make_node("Mul", ["accf", "s"], ["y"])]
    return graph(nodes, {"wq": w_q, "wz": zero, "ws": scale}, shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--u8u8", action="store_true", help="int8 through U8U8 kernels (session.x64quantprecision)")
    a = ap.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = a.threads
    if a.u8u8:
        options.add_session_config_entry("session.x64quantprecision", "1")
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {a.threads} threads{', int8 as U8U8' if a.u8u8 else ''}")
    print("| shape | GMAC | fp32 ms (GMAC/s) | static int8 ms (GMAC/s) | PSNR | dynamic int8 ms (GMAC/s) | PSNR |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for b, c, side in SHAPES:
        shape = (b, c, side, side)
        x = rng.standard_normal(shape).astype(np.float32)
        w = (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        gmac = b * c * c * 9 * side * side / 1e9
        ref = None
        row = [f"{b}x{c}x{side}x{side}", f"{gmac:.2f}"]
        for model in (fp32(w, shape), static_int8(w, float(np.abs(x).max()), 4.0, shape), dynamic_int8(w, shape)):
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            y = session.run(None, {"x": x})[0]
            times = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                session.run(None, {"x": x})
                times.append(time.perf_counter() - t)
            ms = 1e3 * float(np.median(times))
            row.append(f"{ms:.1f} ({gmac / ms * 1e3:.0f})")
            if ref is None:
                ref = y
            else:
                row.append(f"{psnr(ref, y):.1f} dB")
        print("| " + " | ".join(row) + " |", flush=True)
    print(_matmul_row(rng, options, a.repeat))


def _timed(session: ort.InferenceSession, feeds: dict, repeat: int) -> tuple[np.ndarray, float]:
    y = session.run(None, feeds)[0]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t)
    return y, 1e3 * float(np.median(times))


def _matmul_row(rng: np.random.Generator, options: ort.SessionOptions, repeat: int) -> str:
    """fp32 MatMul against onnxruntime's dynamic int8 quantization of it (MatMulInteger, U8S8 or U8U8)."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantType, quantize_dynamic

    rows, k, n = MATMUL
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "mm.onnx", Path(tmp) / "mm8.onnx"
        onnx.save(onnx.load_from_string(graph(nodes, {"w": w}, (rows, k))), str(src))
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        ref, fp32_ms = _timed(ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"]),
                              {"x": x}, repeat)
        got, int8_ms = _timed(ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"]),
                              {"x": x}, repeat)
    gmac = rows * k * n / 1e9
    return (f"\nMatMul {rows}x{k} @ {k}x{n} ({gmac:.2f} GMAC): fp32 {fp32_ms:.1f} ms ({gmac / fp32_ms * 1e3:.0f} "
            f"GMAC/s), dynamic int8 {int8_ms:.1f} ms ({gmac / int8_ms * 1e3:.0f} GMAC/s), {psnr(ref, got):.1f} dB")


if __name__ == "__main__":
    main()
