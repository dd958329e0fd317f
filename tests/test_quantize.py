"""fp16 / int8 / int4 copies of the tiny bundle's graphs: same interface, smaller, close to fp32.

PSNR floors are the figures measured on the tiny random-weight graphs (seed 1, onnxruntime 1.32) less a
margin of 7-10 dB for other onnxruntime versions and CPUs; a quantizer that breaks drops far below them.
Measured (UNet / text encoder / VAE decoder): fp16 60.8 / 70.8 / 72.3 dB; int8 MatMul+Gemm 54.7 / 38.3 /
62.1 dB; int8 with Conv 41.2 / - / 40.8 dB; int4 42.0 / 21.7 / 42.1 dB. Random weights quantize worse
than trained ones (no structure), and the tiny text encoder's int4 figure is its 2 layers x 4 matrices
of random 32-wide weights at 4 bits.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edge.converters.quantize import PRECISIONS, mixed_precision, psnr_parity, quantize
from edge.metrics import psnr
from edge.sessions import open_session

GRAPHS = ("unet", "text_encoder", "vae_decoder")
VARIANTS = {  # name: (precision, quantize options)
    "fp16": ("fp16", {}),
    "int8": ("int8", {}),
    "int8-conv": ("int8", {"ops": ("MatMul", "Gemm", "Conv")}),
    "int4": ("int4", {}),
}
MIN_PSNR = {  # (graph, variant): floor in dB, measured figure in the module docstring
    ("unet", "fp16"): 50, ("text_encoder", "fp16"): 60, ("vae_decoder", "fp16"): 60,
    ("unet", "int8"): 45, ("text_encoder", "int8"): 30, ("vae_decoder", "int8"): 52,
    ("unet", "int8-conv"): 33, ("text_encoder", "int8-conv"): 30, ("vae_decoder", "int8-conv"): 32,
    ("unet", "int4"): 33, ("text_encoder", "int4"): 15, ("vae_decoder", "int4"): 33,
}


def feeds(graph: str, h: int = 4, w: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if graph == "text_encoder":
        ids = rng.integers(0, 49408, (2, 77)).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if graph == "unet":
        return {"sample": rng.standard_normal((2, 4, h, w), dtype=np.float32),
                "timestep": np.array([999.0, 37.0], np.float32),
                "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    return {"latent_sample": rng.standard_normal((1, 4, h, w), dtype=np.float32)}


def run(path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return open_session(path).run(None, inputs)  # as the runtime opens it: exact int8 on every CPU (edge.cpu)


@pytest.fixture(scope="module")
def quantized(bundles, tmp_path_factory) -> dict:
    """Every graph in every variant, made once: (graph, variant) -> (path, report)."""
    src, out = bundles["folder-epsilon"], tmp_path_factory.mktemp("quantized")
    made = {}
    for graph in GRAPHS:
        for name, (precision, options) in VARIANTS.items():
            dst = out / f"{graph}.{name}.onnx"
            made[graph, name] = dst, quantize(src / f"{graph}.onnx", dst, precision, **options)
    return made


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_with_the_same_interface_and_stays_close(bundles, quantized, graph, variant):
    path, report = quantized[graph, variant]
    fp32 = bundles["folder-epsilon"] / f"{graph}.onnx"
    a, b = (open_session(p) for p in (fp32, path))
    assert [(i.name, i.type) for i in a.get_inputs()] == [(i.name, i.type) for i in b.get_inputs()]
    assert [(o.name, o.type) for o in a.get_outputs()] == [(o.name, o.type) for o in b.get_outputs()]
    sizes = [(4, 6), (8, 8)] if graph != "text_encoder" else [(0, 0)]
    for h, w in sizes:  # two latent sizes: dynamic axes survived
        x = feeds(graph, h, w)
        got = b.run(None, x)
        assert all(g.dtype == np.float32 for g in got)
        db = min(psnr(r, g) for r, g in zip(a.run(None, x), got))
        assert db >= MIN_PSNR[graph, variant], f"{graph} {variant} at {h}x{w}: {db:.1f} dB"
    assert report["precision"] == VARIANTS[variant][0] and report["files"] == [path.name]
    assert report["nodes_converted"] > 0
    assert report["bytes_after"] == path.stat().st_size


def test_weights_shrink_as_their_precision_says(quantized):
    """fp16 halves every weight; int8 stores a quantized weight in 1/4 of its fp32 bytes; int4 in 1/8, plus
    an fp32 scale per block of 32 (so 0.129 of the fp32 bytes it replaces). Conv weights stay fp32 unless
    Conv is asked for, so the Conv-heavy UNet file shrinks only to 87% at int8 MatMul/Gemm."""
    for graph in GRAPHS:
        _, r = quantized[graph, "fp16"]
        assert r["weight_bytes_after"] == {"float16": r["weight_bytes_before"]["float32"] // 2}
        for variant, low, ratio in [("int8", "int8", (0.25, 0.27)), ("int8-conv", "uint8", (0.24, 0.27)),
                                    ("int4", "uint8", (0.12, 0.21))]:
            _, r = quantized[graph, variant]
            removed = r["weight_bytes_before"]["float32"] - r["weight_bytes_after"]["float32"]
            assert removed > 0 and ratio[0] <= r["weight_bytes_after"][low] / removed <= ratio[1], (graph, variant, r)
    unet = {v: quantized["unet", v][1]["bytes_after"] for v in VARIANTS}
    before = quantized["unet", "fp16"][1]["bytes_before"]
    # the whole file, names and all: on this tiny UNet the graph structure is ~10% of the file
    assert unet["fp16"] < 0.65 * before and unet["int8-conv"] < 0.5 * before
    assert unet["int8"] < before and unet["int4"] < before


def test_int8_weight_type_follows_the_fast_kernels(quantized):
    """uint8 weights when Conv is quantized (ConvInteger is slow with int8 weights), int8 otherwise."""
    assert quantized["unet", "int8"][1]["weight_type"] == "int8"
    assert quantized["unet", "int8-conv"][1]["weight_type"] == "uint8"
    ops = {n.op_type for n in onnx.load(str(quantized["unet", "int8-conv"][0])).graph.node}
    assert {"MatMulInteger", "ConvInteger"} <= ops and "Gemm" not in ops


def test_keep_fp32_leaves_those_nodes_alone(bundles, tmp_path):
    src = bundles["folder-epsilon"] / "unet.onnx"
    graph = onnx.load(str(src)).graph
    matmul = next(n.name for n in graph.node if n.op_type == "MatMul" and "to_q" in n.name)
    gemm = next(n.name for n in graph.node if n.op_type == "Gemm")
    everything = quantize(src, tmp_path / "all.onnx", "int4")
    kept = quantize(src, tmp_path / "kept.onnx", "int4", keep_fp32=[matmul, gemm])
    assert kept["nodes_converted"] == everything["nodes_converted"] - 2 and kept["kept_fp32"] == sorted([matmul, gemm])
    names = {n.name: n.op_type for n in onnx.load(str(tmp_path / "kept.onnx")).graph.node}
    assert names[matmul] == "MatMul" and names[f"{gemm}_MatMul"] == "MatMul"  # Gemm -> fp32 MatMul + Add


def test_fp32_is_an_exact_copy(bundles, tmp_path):
    src = bundles["folder-epsilon"] / "vae_decoder.onnx"
    report = quantize(src, tmp_path / "v.onnx", "fp32")
    assert (tmp_path / "v.onnx").read_bytes() == src.read_bytes() and report["nodes_converted"] == 0


def test_external_data_in_and_out(bundles, tmp_path):
    """Graphs over the size limit keep weights in NAME.data, going in and coming out."""
    src = tmp_path / "unet.onnx"
    onnx.save_model(onnx.load(str(bundles["folder-epsilon"] / "unet.onnx")), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="unet.onnx.data")
    x = feeds("unet")
    reference = run(src, x)[0]
    for precision in PRECISIONS:
        dst = tmp_path / "out" / f"unet.{precision}.onnx"
        dst.parent.mkdir(exist_ok=True)
        report = quantize(src, dst, precision, external_data_over=0)
        assert report["files"] == [dst.name, dst.name + ".data"] and (dst.parent / report["files"][1]).is_file()
        assert report["bytes_after"] == sum((dst.parent / f).stat().st_size for f in report["files"])
        assert psnr(reference, run(dst, x)[0]) >= 33, precision


def test_bad_arguments_are_named(bundles, tmp_path):
    src = bundles["folder-epsilon"] / "unet.onnx"
    with pytest.raises(ValueError, match=r"precision='int3'.*'fp32', 'fp16', 'int8', 'int4'"):
        quantize(src, tmp_path / "x.onnx", "int3")
    with pytest.raises(ValueError, match=r"ops=\['Conv'\].*int4 quantizes"):
        quantize(src, tmp_path / "x.onnx", "int4", ops=["Conv"])
    with pytest.raises(ValueError, match="keep_fp32 names nodes that are not in unet.onnx: \\['nope'\\]"):
        quantize(src, tmp_path / "x.onnx", "int8", keep_fp32=["nope"])
    with pytest.raises(ValueError, match="block_size=48"):
        quantize(src, tmp_path / "x.onnx", "int4", block_size=48)
    assert not (tmp_path / "x.onnx").exists()


def test_mixed_precision_keeps_the_most_sensitive_groups(bundles, tmp_path):
    """All-int4 text encoder: 21.7 dB. Measured: its MLP of layer 0 (+2.8 dB alone) and then the attention
    of layer 1 (+1.5 dB) are kept, 26.2 dB with 6 of its 12 weight MatMuls at fp32, in 0.9 s."""
    src = bundles["folder-epsilon"] / "text_encoder.onnx"
    parity = psnr_parity(src, feeds("text_encoder"))
    dst = tmp_path / "te.onnx"
    result = mixed_precision(src, dst, "int4", parity, 25.0, group_depth=4)
    assert result["psnr_all_quantized_db"] < 25.0 <= result["psnr_db"] == pytest.approx(parity(dst))
    assert result["kept_groups"] and len(result["kept_groups"]) < len(result["sensitivity"])
    assert result["kept_groups"][0] == max(result["sensitivity"], key=result["sensitivity"].get)
    ops = {n.name: n.op_type for n in onnx.load(str(dst)).graph.node}
    assert result["kept_fp32"] and all(ops[name] == "MatMul" for name in result["kept_fp32"])
    assert all(name.strip("/").startswith(tuple(result["kept_groups"])) for name in result["kept_fp32"])
    assert result["quantize"]["nodes_converted"] == 12 - len(result["kept_fp32"])

    met = mixed_precision(src, dst, "int4", parity, 15.0)  # already met: nothing kept, one trial
    assert met["kept_fp32"] == [] and met["psnr_db"] >= 15.0
