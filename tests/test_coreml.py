"""The Core ML target: real coremltools conversions of the default model, checked without running Core ML.

What Linux can check: the packages Apple's Swift package would load (names, dtypes, shapes, chunk chaining,
compressed weight storage, sizes), the torch-side parity of the Neural-Engine rewrite, and the refusals.
Running the graphs needs macOS: those tests skip elsewhere, saying so (`make coreml-check` runs them on a Mac).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

ct = pytest.importorskip("coremltools")

from edge.converters.convert import ConvertError, Options, convert  # noqa: E402
from edge.converters.coreml import compress as cmp  # noqa: E402
from edge.converters.coreml.convert import CoreMLError, CoreMLOptions, build_coreml  # noqa: E402
from edge.converters.coreml.unet import GRAPH_INPUTS, UNetANE, make_chunks, plan_chunks, stage_bytes  # noqa: E402
from edge.converters.sources import open_source  # noqa: E402
from edge.metrics import psnr  # noqa: E402

MAC = platform.system() == "Darwin"
NOT_MAC = "Core ML runs only on macOS; run `make coreml-check` on a Mac"
CHUNK_MB = 2.4  # the default model's fp16 UNet holds ~4.8 MB: the fewest chunks under 2.4 MB are 3

FLOAT32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The default model's ops are tiny: one torch thread runs them ~2x faster than two (measured) and leaves a
    core to whatever else runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return open_source("default").pipe


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """`edge convert default --target coreml --max-chunk-mb 2`, through the library call."""
    out = tmp_path_factory.mktemp("coreml") / "bundle"
    convert("default", out, options=Options(targets=("coreml",), coreml=CoreMLOptions(max_chunk_mb=CHUNK_MB)),
            log=lambda s: None)
    return out


def _manifest(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _io(package) -> tuple[dict, dict]:
    """(inputs, outputs) of a saved package as name -> (shape, is float32), read with skip_model_load."""
    d = ct.models.MLModel(str(package), skip_model_load=True).get_spec().description
    def ports(fs):
        return {f.name: (list(f.type.multiArrayType.shape), f.type.multiArrayType.dataType == FLOAT32) for f in fs}
    return ports(d.input), ports(d.output)


def test_packages_have_apple_names_and_io(bundle):
    folder = bundle / "coreml"
    m = _manifest(bundle)["coreml"]["components"]
    chunks = sorted(p.name for p in folder.glob("UnetChunk*.mlpackage"))
    assert {p.name for p in folder.iterdir()} == {"TextEncoder.mlpackage", "VAEDecoder.mlpackage",
                                                 "VAEEncoder.mlpackage", "vocab.json", "merges.txt", *chunks}
    assert len(chunks) >= 2 and not (folder / "Unet.mlpackage").exists()
    d, seq, lat = 64, 77, 8  # the default model: CLIP width 64, 8x8 latents, 64x64 images
    expected = {
        "TextEncoder": ({"input_ids": ([1, seq], True)},
                        {"last_hidden_state": ([1, seq, d], True), "pooled_outputs": ([1, d], True)}),
        "VAEDecoder": ({"z": ([1, 4, lat, lat], True)}, {"image": ([1, 3, 8 * lat, 8 * lat], True)}),
        "VAEEncoder": ({"sample": ([1, 3, 8 * lat, 8 * lat], True), "diagonal_noise": ([1, 4, lat, lat], True),
                        "noise": ([1, 4, lat, lat], True), "sqrt_alphas_cumprod": ([1, 1], True),
                        "sqrt_one_minus_alphas_cumprod": ([1, 1], True)},
                       {"latent_dist": ([1, 4, lat, lat], True)}),
    }
    for name, (inputs, outputs) in expected.items():
        assert _io(folder / f"{name}.mlpackage") == (inputs, outputs), name
    first_in, _ = _io(folder / "UnetChunk1.mlpackage")
    assert first_in == {"sample": ([2, 4, lat, lat], True), "timestep": ([2], True),
                        "encoder_hidden_states": ([2, d, 1, seq], True)}
    _, last_out = _io(folder / chunks[-1])
    assert last_out == {"noise_pred": ([2, 4, lat, lat], True)}
    for c in m.values():  # the manifest says what the packages hold, and every file is hashed
        for t in c["inputs"] + c["outputs"]:
            assert t["dtype"] == "float32"
        assert all((bundle / f).is_file() for f in c["files"])
    assert (folder / "vocab.json").read_bytes() == (bundle / "tokenizer" / "vocab.json").read_bytes()


def test_unet_chunks_chain_as_apples_swift_feeds_them(bundle, pipe):
    """Chunk k reads only the original inputs and chunk k-1's outputs (Swift's `Unet` merges just those), each
    holds under the limit, and the limit's fewest chunks were made."""
    chunks = _manifest(bundle)["coreml"]["components"]["unet"]["chunks"]
    available = set(GRAPH_INPUTS)
    for k, c in enumerate(chunks):
        package = bundle / c["file"]
        inputs, outputs = _io(package)
        assert set(inputs) == {t["name"] for t in c["inputs"]} and set(outputs) == {t["name"] for t in c["outputs"]}
        assert set(inputs) <= available, f"chunk {k + 1} reads {set(inputs) - available}"
        assert not set(inputs) & set(outputs)
        available = set(GRAPH_INPUTS) | set(outputs)
        weights = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        assert c["weight_bytes"] == weights.stat().st_size <= CHUNK_MB * 1e6
    stages = list(UNetANE.from_diffusers(pipe.unet).stages)
    assert len(chunks) == len(plan_chunks(stages, 2, max_bytes=int(CHUNK_MB * 1e6)))
    fewer = plan_chunks(stages, 2, n=len(chunks) - 1)
    assert max(sum(stage_bytes(s, 2) for s in stages[a:b]) for a, b in fewer) > CHUNK_MB * 1e6  # could not fit


def test_plan_chunks_balances_and_refuses():
    class S(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.w, self.output = torch.nn.Parameter(torch.zeros(n)), f"s{n}"

    stages = [S(n) for n in (5, 1, 1, 1, 6, 2)]  # bytes at 1 byte per weight
    assert plan_chunks(stages, 1, n=2) == [(0, 4), (4, 6)]  # 8 | 8
    assert plan_chunks(stages, 1, max_bytes=7) == [(0, 3), (3, 5), (5, 6)]  # fewest under 7: 7 | 7 | 2
    with pytest.raises(ValueError, match="s6 alone holds"):
        plan_chunks(stages, 1e6, max_bytes=5_000_000)
    with pytest.raises(ValueError, match="only 6 stages"):
        plan_chunks(stages, 1, n=7)


def test_rewrite_matches_diffusers(pipe):
    """The Neural-Engine modules against diffusers, fp32, at a non-square size: >= 60 dB (to float rounding)."""
    from edge.converters.coreml.ane import LayerNormANE, split_einsum_bc1s
    from edge.converters.coreml.vae import DecoderANE, EncoderANE
    from edge.kernels.attention import original

    g = torch.Generator().manual_seed(1)
    unet = UNetANE.from_diffusers(pipe.unet)
    x, t, ctx = torch.randn(2, 4, 8, 16, generator=g), torch.tensor([1.0, 700.0]), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx, return_dict=False)[0]
        got = unet(x, t, ctx.transpose(1, 2).unsqueeze(2))
        assert psnr(ref.numpy(), got.numpy()) >= 60
        env = {"sample": x, "timestep": t, "encoder_hidden_states": ctx.transpose(1, 2).unsqueeze(2)}
        for chunk in make_chunks(list(unet.stages), plan_chunks(list(unet.stages), 2, n=4)):
            env.update(zip(chunk.outputs, chunk(*(env[n] for n in chunk.inputs))))
        assert torch.equal(env["noise_pred"], got)  # the chunks are the same modules, in order

        z = torch.randn(1, 4, 8, 16, generator=g)
        assert psnr(pipe.vae.decode(z, return_dict=False)[0].numpy(), DecoderANE(pipe.vae)(z).numpy()) >= 60
        img = torch.rand(1, 3, 64, 128, generator=g) * 2 - 1
        moments = torch.cat([pipe.vae.encode(img, return_dict=False)[0].mean,
                             pipe.vae.encode(img, return_dict=False)[0].logvar], dim=1)
        assert psnr(moments.numpy(), EncoderANE(pipe.vae)(img).numpy()) >= 60

        norm = torch.nn.LayerNorm(48)
        torch.nn.init.normal_(norm.weight, generator=g)
        seq = torch.randn(2, 10, 48, generator=g)
        assert psnr(norm(seq).numpy(), LayerNormANE.from_diffusers(norm)(seq.transpose(1, 2).unsqueeze(2))
                    .squeeze(2).transpose(1, 2).numpy()) >= 60
        q, k, v = (torch.randn(2, n, 48, generator=g) for n in (10, 77, 77))
        bc1s = lambda a: a.transpose(1, 2).unsqueeze(2)  # noqa: E731
        assert psnr(original(q, k, v, 8).numpy(),
                    split_einsum_bc1s(bc1s(q), bc1s(k), bc1s(v), 8).squeeze(2).transpose(1, 2).numpy()) >= 60


def test_gpu_attention_matches_diffusers_too(pipe):
    """`--attention original` for Core ML: batched-matmul attention (the GPU's form) in the same modules."""
    from edge.converters.coreml.ane import AttentionANE, use_attention
    from edge.converters.coreml.vae import DecoderANE

    g = torch.Generator().manual_seed(2)
    unet, decoder = use_attention(UNetANE.from_diffusers(pipe.unet), "original"), use_attention(DecoderANE(pipe.vae), "original")
    layers = [m for m in unet.modules() if isinstance(m, AttentionANE)]
    assert layers and all(m.attention_kernel == "original" for m in layers)
    x, t, ctx = torch.randn(2, 4, 8, 16, generator=g), torch.tensor([1.0, 700.0]), torch.randn(2, 77, 64, generator=g)
    z = torch.randn(1, 4, 8, 16, generator=g)
    with torch.no_grad():
        assert psnr(pipe.unet(x, t, ctx, return_dict=False)[0].numpy(),
                    unet(x, t, ctx.transpose(1, 2).unsqueeze(2)).numpy()) >= 60
        assert psnr(pipe.vae.decode(z, return_dict=False)[0].numpy(), decoder(z).numpy()) >= 60
    with pytest.raises(ValueError, match="choose one of split_einsum, original"):
        use_attention(unet, "fused")


@pytest.mark.parametrize("layout", ["DownBlock2D/UpBlock2D", "SD 2.x linear projections, heads per block"])
def test_rewrite_matches_diffusers_across_unet_layouts(layout):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        use_linear_projection=layout.startswith("SD 2"), attention_head_dim=(2, 4) if layout.startswith("SD 2") else 8,
    ).eval()
    with torch.no_grad():
        for p in unet.parameters():  # diffusers zero-initialises some output layers: make every layer count
            p.add_(torch.randn_like(p) * 0.02)
        x, t, ctx = torch.randn(2, 4, 8, 16), torch.tensor([3.0, 800.0]), torch.randn(2, 77, 32)
        ref = unet(x, t, ctx, return_dict=False)[0]
        got = UNetANE.from_diffusers(unet)(x, t, ctx.transpose(1, 2).unsqueeze(2))
    assert psnr(ref.numpy(), got.numpy()) >= 60


def test_manifest_records_parity_precision_and_sizes(bundle):
    from edge.coreml_backend import describe

    lines = describe(bundle)  # `edge info`
    assert lines[0].startswith("Core ML (iOS17, compression none, 8x8 latents)") and len(lines) == 6
    m = _manifest(bundle)
    assert m["components"] == {} and m["coreml"]["deployment_target"] == "iOS17"
    for name, c in m["coreml"]["components"].items():
        p = c["parity"]
        assert p["rewrite_psnr_db"] >= 60 and c["precision"] == "fp16" and p["fp16_vs_fp32_psnr_db"] >= 35, name
        assert c["weight_bytes"] <= c["bytes"] and abs(c["weight_bytes"] - 2 * c["parameters"]) < 0.1 * c["bytes"]
        assert (p["coreml_psnr_db"] is None) == (not MAC)


@pytest.mark.parametrize("compression, target, op, lut", [
    ("int8", "iOS18", "constexpr_blockwise_shift_scale", None),  # per block of 16 input channels
    ("palettize6", "iOS18", "constexpr_lut_to_dense", [3, 1, 1, 1, 64, 1]),  # 64-entry palette per 16 channels
    ("palettize4", "iOS17", "constexpr_lut_to_dense", [16]),  # one 16-entry palette per tensor
])
def test_compression_stores_the_weight_type_asked_for(pipe, tmp_path, compression, target, op, lut):
    options = CoreMLOptions(compression=compression, deployment_target=target, compute_precision="fp16")
    section = build_coreml(pipe, tmp_path, options, log=lambda s: None, only=("vae_encoder",))  # the smallest graph
    c = section["components"]["vae_encoder"]
    stored = cmp.stored_weights(tmp_path / "coreml" / "VAEEncoder.mlpackage")
    assert stored and {s["op"] for s in stored} == {op}
    first = next(s for s in stored if s["output"].startswith("encoder_mid_resnets_0_conv1_weight"))  # (48, 48, 3, 3)
    if lut is not None:
        assert first["shapes"]["lut"] == lut
    if op == "constexpr_blockwise_shift_scale":
        assert first["shapes"]["scale"] == [48, 48 // 16, 1, 1]
    q = c["quantization"]
    assert q["compression"] == compression and q["weight_ops"] == {op: len(stored)}
    assert q["weights_checked"] >= len(stored) - 1 and q["output_psnr_db"] is not None
    bits = {"int8": 8, "palettize6": 6, "palettize4": 4}[compression]
    assert c["weight_bytes"] < (bits / 16 + 0.15) * 2 * c["parameters"]  # vs fp16, with scales/palettes and norms
    if compression == "int8":
        assert q["output_psnr_db"] >= 35 and q["min_weight_psnr_db"] >= 35


def test_fp16_falls_back_to_fp32_where_core_ml_measures_it_below_the_floor():
    """The decision alone (Core ML's figure comes from macOS): fp16 below 35 dB is remade at fp32 under `auto`."""
    from edge.converters.coreml.convert import _with_fallback

    measured = {"fp16": 30.0, "fp32": 80.0}
    made = []

    def make(precision):
        made.append(precision)
        return precision, {"coreml_psnr_db": measured[precision]}

    precision, (_, figures) = _with_fallback("unet", "fp16", CoreMLOptions(), make)
    assert (precision, made, figures) == ("fp32", ["fp16", "fp32"], {"coreml_psnr_db": 80.0, "fp16_coreml_psnr_db": 30.0})
    with pytest.raises(CoreMLError, match="unet: the Core ML graph does not match torch .PSNR 30.0 dB < 35.0 dB at fp16"):
        _with_fallback("unet", "fp16", CoreMLOptions(compute_precision="fp16"), make)
    assert _with_fallback("unet", "fp16", CoreMLOptions(), lambda p: (p, {"coreml_psnr_db": None}))[0] == "fp16"


def test_bad_options_get_one_clear_error(tmp_path):
    with pytest.raises(CoreMLError, match="unknown Core ML compression 'int3'"):
        CoreMLOptions(compression="int3")
    with pytest.raises(CoreMLError, match="unknown deployment target 'iOS12'"):
        CoreMLOptions(deployment_target="iOS12")
    with pytest.raises(CoreMLError, match="--split-unet 0"):
        CoreMLOptions(split_unet=0)
    with pytest.raises(CoreMLError, match="Core ML attention 'fused'"):
        CoreMLOptions(attention="fused")
    with pytest.raises(ConvertError, match="unknown target 'tflite'"):
        Options(targets=("tflite",))


@pytest.mark.skipif(MAC, reason="checks the refusal where there is no Xcode")
def test_compile_is_refused_off_macos_before_converting(tmp_path, capsys):
    with pytest.raises(CoreMLError, match="macOS only"):
        CoreMLOptions(compile=True)
    from edge.cli import main

    assert main(["convert", "default", "-o", str(tmp_path / "b"), "--target", "coreml", "--compile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --compile needs Xcode") and "macOS only" in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.partial*"))


@pytest.mark.skipif(MAC, reason="checks the refusal off macOS")
def test_runtime_refuses_off_macos_and_onnx_refuses_a_coreml_only_bundle(bundle):
    from edge.coreml_backend import CoreMLBackendError
    from edge.pipeline import Pipeline

    with pytest.raises(CoreMLBackendError, match="runs only on macOS"):
        Pipeline.load(bundle, backend="coreml")
    with pytest.raises(CoreMLBackendError, match="unknown compute_units 'npu'"):
        Pipeline.load(bundle, backend="coreml", compute_units="npu")
    with pytest.raises(ValueError, match="only Core ML graphs"):
        Pipeline.load(bundle)


def test_runtime_reads_packages_without_torch(bundle):
    """The backend's coremltools import keeps torch out (it is installed here, and coremltools would load it)."""
    script = ("import sys, json\nfrom edge.coreml_backend import import_coremltools\nct = import_coremltools()\n"
              "d = ct.models.MLModel(sys.argv[1], skip_model_load=True).get_spec().description\n"
              "print(json.dumps([[i.name for i in d.input], 'torch' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", script, str(bundle / "coreml" / "TextEncoder.mlpackage")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [["input_ids"], False]


def test_coreml_generation_matches_torch(bundle, pipe):
    """On macOS: the Core ML pipeline's UNet output matches torch (>= 35 dB) and it generates an image."""
    if not MAC:
        pytest.skip(NOT_MAC)
    from edge.pipeline import Pipeline

    coreml = Pipeline.load(bundle, backend="coreml", compute_units="cpu_only")
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        ref = pipe.unet(x, torch.tensor([500.0, 500.0]), ctx, return_dict=False)[0].numpy()
    got = coreml.unet(x.numpy(), 500.0, ctx.numpy())
    assert psnr(ref, got) >= 35
    image = coreml.generate("a red circle on a blue background", steps=4, seed=0).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0
