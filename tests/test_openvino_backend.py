"""The OpenVINO backend: the bundle's own ONNX graphs compiled by OpenVINO, in the same pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_edge
from edge import Pipeline
from edge.metrics import psnr

pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino (pip install 'edge-diffusion[openvino]')")

PROMPT = "a red circle on a blue background"


def test_f32_is_onnxruntime_s_image(bundles):
    """At f32 OpenVINO computes what onnxruntime computes; at its own choice (bf16 on AMX CPUs) close to it."""
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    ref = Pipeline.load(bundles["folder-epsilon"]).generate(PROMPT, steps=4, latents=latents)
    ov = Pipeline.load(bundles["folder-epsilon"], backend="openvino", inference_precision="f32")
    assert ov.precision_of("unet") == "f32"
    got = ov.generate(PROMPT, steps=4, latents=latents)
    assert psnr(np.asarray(ref.images[0]), np.asarray(got.images[0]), peak=255.0) >= 40
    chosen = Pipeline.load(bundles["folder-epsilon"], backend="openvino")
    assert chosen.precision_of("unet") in ("f32", "bf16", "f16")
    assert psnr(ref.latents, chosen.generate(PROMPT, steps=4, latents=latents).latents) >= 25


def test_each_shape_is_compiled_for_its_call(bundles):
    """Graphs are compiled for the shapes they are called with: another size, or guidance off (batch 1), gets a
    graph of its own, and each computes what onnxruntime does."""
    ref = Pipeline.load(bundles["folder-epsilon"])
    ov = Pipeline.load(bundles["folder-epsilon"], backend="openvino", inference_precision="f32")
    for shape, guidance in (((1, 4, 8, 8), 7.5), ((1, 4, 6, 10), 7.5), ((1, 4, 6, 10), 1.0), ((1, 4, 8, 8), 7.5)):
        latents = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
        size = {"height": 8 * shape[2], "width": 8 * shape[3]}
        want = ref.generate(PROMPT, steps=3, latents=latents, guidance=guidance, **size)
        got = ov.generate(PROMPT, steps=3, latents=latents, guidance=guidance, **size)
        assert psnr(want.latents, got.latents) >= 60
        unet = ov.graphs.open("unet")[0]
        assert unet.compiled.input("sample").get_partial_shape().is_static  # compiled for this call's shape
        batch = 2 if guidance > 1 else 1
        assert tuple(unet.compiled.input("sample").get_shape()) == (batch, *shape[1:])


def test_cli_and_refusals(bundles, tmp_path):
    out = tmp_path / "ov.png"
    run_edge("generate", bundles["folder-epsilon"], PROMPT, "--steps", "2", "--backend", "openvino",
             "--inference-precision", "f32", "-o", out)
    assert out.exists()
    proc = run_edge("generate", bundles["folder-epsilon"], PROMPT, "--backend", "openvino", "--memory-budget", "2GB",
                    "-o", tmp_path / "b.png", check=False)
    assert proc.returncode == 2 and "onnxruntime's measurements" in proc.stderr and not (tmp_path / "b.png").exists()
    with pytest.raises(ValueError, match="unknown inference_precision 'int3'"):
        Pipeline.load(bundles["folder-epsilon"], backend="openvino", inference_precision="int3")
