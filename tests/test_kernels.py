"""Attention kernels: each against a float64 reference, inside a tiny UNet and VAE, and exported to ONNX.

The ONNX tests export at one size and run at another: the converter traces at a small latent and relies
on dynamic axes, so a kernel whose slicing is baked in at trace time would pass at the trace size only.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from edge.kernels.attention import KERNELS, get_kernel
from edge.kernels.processor import KernelAttnProcessor, use_attention

TOL = 1e-4
CHUNKED = [("original", None), ("sliced", 7), ("split_einsum", None), ("fused", None)]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float | None) -> np.ndarray:
    """softmax(q kᵀ · scale) v per head, in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    b, sq, c = q.shape
    d = c // heads
    scale = d ** -0.5 if scale is None else scale
    qh, kh, vh = (x.reshape(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))  # (B, H, S, d)
    out = torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1) @ vh  # (B, H, Sq, d)
    return out.transpose(1, 2).reshape(b, sq, c).numpy()


def inputs(b: int, sq: int, sk: int, c: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, sq, c, generator=g), torch.randn(b, sk, c, generator=g), torch.randn(b, sk, c, generator=g)


# (B, Sq, Sk, C, heads, chunk, scale): self- and cross-attention, Sq not a multiple of chunk, chunk > Sq, chunk 1
SHAPES = [
    (2, 64, 64, 32, 4, 16, None),
    (1, 100, 100, 40, 8, 32, None),
    (2, 37, 77, 64, 2, 10, None),
    (1, 5, 77, 8, 1, 8, None),
    (3, 50, 50, 24, 3, 1, None),
    (2, 45, 45, 16, 2, 20, 1.0),  # scale_qk=False layers
]


def test_kernels_share_one_signature():
    signatures = {name: inspect.signature(k) for name, k in KERNELS.items()}
    assert len(set(map(str, signatures.values()))) == 1, signatures


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("b,sq,sk,c,heads,chunk,scale", SHAPES)
def test_kernel_matches_float64_reference(name, b, sq, sk, c, heads, chunk, scale):
    q, k, v = inputs(b, sq, sk, c)
    out = get_kernel(name)(q, k, v, heads, chunk if name == "sliced" else None, scale)
    assert out.shape == (b, sq, c) and out.dtype == torch.float32
    assert np.abs(out.double().numpy() - reference(q, k, v, heads, scale)).max() <= TOL


class _KernelModule(torch.nn.Module):
    def __init__(self, name: str, heads: int, chunk: int | None):
        super().__init__()
        self.kernel, self.heads, self.chunk = get_kernel(name), heads, chunk

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.kernel(q, k, v, self.heads, self.chunk)


def _export(module: torch.nn.Module, example: tuple, path, names: list[str], dynamic: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), input_names=names, output_names=["out"],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)


@pytest.mark.parametrize("name,chunk", CHUNKED)
def test_exported_kernel_is_right_at_other_sizes(tmp_path, name, chunk):
    path = tmp_path / f"{name}.onnx"
    dynamic = {"q": {0: "b", 1: "sq"}, "k": {0: "b", 1: "sk"}, "v": {0: "b", 1: "sk"}, "out": {0: "b", 1: "sq"}}
    _export(_KernelModule(name, 4, chunk), inputs(1, 64, 64, 32), path, ["q", "k", "v"], dynamic)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, sq, sk in [(1, 64, 64), (2, 200, 200), (1, 3, 3), (2, 50, 77)]:
        q, k, v = inputs(b, sq, sk, 32, seed=sq)
        (got,) = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
        assert got.shape == (b, sq, 32), (name, sq)
        assert np.abs(got - reference(q, k, v, 4, None)).max() <= TOL, (name, sq)


@contextlib.contextmanager
def kernel_in(model: torch.nn.Module, name: str, chunk: int | None):
    """`model` with `name` on every attention layer, and its own processors back afterwards."""
    own = model.attn_processors
    use_attention(model, name, chunk)
    try:
        yield model
    finally:
        model.set_attn_processor(own)


@pytest.fixture(scope="module")
def pipe():
    from edge.converters.tiny import tiny_pipeline

    return tiny_pipeline(seed=3)


def _unet_inputs(h: int, w: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(h * 100 + w)
    return torch.randn(2, 4, h, w, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 32, generator=g)


@pytest.mark.parametrize("name,chunk", CHUNKED)
def test_unet_and_vae_processors_match_default(pipe, name, chunk):
    """Self- and cross-attention (UNet); group norm, residual and rescale on 4-D input (VAE mid-block)."""
    sample, t, text = _unet_inputs(6, 10)
    unet, vae = pipe.unet, pipe.vae
    with torch.no_grad():
        want_unet, want_vae = unet(sample, t, text).sample, vae.decode(sample).sample  # diffusers' own processors
        with kernel_in(unet, name, chunk), kernel_in(vae, name, chunk):
            assert {type(p) for p in unet.attn_processors.values()} == {KernelAttnProcessor}
            got_unet, got_vae = unet(sample, t, text).sample, vae.decode(sample).sample
    assert (got_unet - want_unet).abs().max().item() <= TOL
    assert (got_vae - want_vae).abs().max().item() <= TOL


def test_sliced_unet_onnx_runs_at_another_latent_size(pipe, tmp_path):
    """Exported as the converter does, at an 8×8 latent; run at 12×16, where every loop runs more times."""
    from edge.converters.onnx_export import component_specs, export, parity

    (tmp_path / "scratch").mkdir()
    with kernel_in(pipe.unet, "sliced", 24):
        spec = next(s for s in component_specs(pipe) if s.name == "unet")
        g = torch.Generator().manual_seed(0)
        files, _ = export(spec, tmp_path / "unet.onnx", spec.example(g, 8, 8), tmp_path / "scratch")
        check = parity(spec, files[0], spec.example(g, 12, 16))
    assert check["max_abs_diff"] <= TOL, check
    layers = len(pipe.unet.attn_processors)
    loops = sum(n.op_type == "Loop" for n in onnx.load(str(files[0])).graph.node)
    assert loops == layers, f"expected one ONNX Loop per attention layer ({layers}), found {loops}"


def test_fused_unet_onnx_is_one_attention_node_per_layer(pipe, tmp_path):
    """`fused` leaves one onnxruntime MultiHeadAttention node per layer and no score matrix (no Softmax) behind."""
    from edge.converters.onnx_export import component_specs, export, parity

    (tmp_path / "scratch").mkdir()
    with kernel_in(pipe.unet, "fused", None):
        spec = next(s for s in component_specs(pipe) if s.name == "unet")
        g = torch.Generator().manual_seed(0)
        files, _ = export(spec, tmp_path / "unet.onnx", spec.example(g, 8, 8), tmp_path / "scratch")
        check = parity(spec, files[0], spec.example(g, 12, 16))
    assert check["max_abs_diff"] <= TOL, check
    ops = [n.op_type for n in onnx.load(str(files[0])).graph.node]
    assert ops.count("MultiHeadAttention") == len(pipe.unet.attn_processors)
    assert "Softmax" not in ops


def test_bad_kernel_name_lists_known_names(pipe):
    for call in (lambda: get_kernel("flash"), lambda: KernelAttnProcessor("flash"),
                 lambda: use_attention(pipe.unet, "flash")):
        with pytest.raises(ValueError, match="flash") as err:
            call()
        assert all(name in str(err.value) for name in KERNELS)


def test_chunk_is_checked_at_the_boundary():
    with pytest.raises(ValueError, match="positive int"):
        KernelAttnProcessor("sliced")
    with pytest.raises(ValueError, match="positive int"):
        KernelAttnProcessor("sliced", 0)
    with pytest.raises(ValueError, match="only to the 'sliced'"):
        KernelAttnProcessor("original", 64)


def test_sliced_without_a_chunk_converts_with_the_default(models, tmp_path):
    """`edge convert --attention sliced` alone slices DEFAULT_CHUNK query rows and records it in the manifest."""
    from conftest import run_edge
    from edge.bundle import read_manifest
    from edge.kernels.attention import DEFAULT_CHUNK

    bundle = tmp_path / "b"
    run_edge("convert", models["folder-epsilon"], "-o", bundle, "--attention", "sliced", "--no-memory-profile")
    recorded = {name: c.attention for name, c in read_manifest(bundle).components.items() if c.attention}
    assert "unet" in recorded and "vae_decoder" in recorded
    assert all(a == {"kernel": "sliced", "chunk": DEFAULT_CHUNK} for a in recorded.values()), recorded
    assert any(n.op_type == "Loop" for n in onnx.load(str(bundle / "unet.onnx")).graph.node)
    assert f"sliced ({DEFAULT_CHUNK})" in run_edge("info", bundle).stdout
    assert f"default {DEFAULT_CHUNK}" in run_edge("convert", "--help").stdout  # the help states the same figure
    # what the figure bounds: SD 1.5's largest self-attention (512 px: 64x64 latent, 8 heads) in float32
    assert 8 * DEFAULT_CHUNK * 4096 * 4 == 128 * 2**20
