"""`edge convert`: what a bundle holds, and that a conversion is all-or-nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

from conftest import EDGE, REPO, run_edge
from edge.bundle import COMPONENTS, read_manifest, sha256_file


@pytest.mark.parametrize("key", ["folder-epsilon", "single-v_prediction"])
def test_manifest_describes_every_graph(bundles, key):
    bundle = bundles[key]
    m = read_manifest(bundle)
    assert m.prediction_type == key.split("-", 1)[1]
    assert m.family == "sd1" and m.latent_channels == 4 and m.vae_scale_factor == 8
    assert m.size_multiple == 16 and m.default_size == (64, 64)
    assert m.scheduler["beta_schedule"] == "scaled_linear" and m.scheduler["prediction_type"] == m.prediction_type
    assert set(m.components) == set(COMPONENTS)
    for c in m.components.values():
        for rel, digest in c.files.items():
            assert sha256_file(bundle / rel) == digest
        assert c.bytes == sum((bundle / rel).stat().st_size for rel in c.files)
        assert c.parity["psnr_db"] >= 60 and c.parity["max_abs_diff"] < 1e-3
        assert c.precision == "fp32" and c.parameters > 0
        session = ort.InferenceSession(str(bundle / c.file))  # the recorded names and shapes are the graph's
        assert [i.name for i in session.get_inputs()] == [t.name for t in c.inputs]
        assert [o.name for o in session.get_outputs()] == [t.name for t in c.outputs]
        for spec, actual in zip(c.inputs, session.get_inputs()):
            assert len(spec.shape) == len(actual.shape)
            assert all(isinstance(a, str) if isinstance(s, str) else a == s for s, a in zip(spec.shape, actual.shape))
    unet = m.components["unet"]
    assert unet.inputs[0].shape == ("batch", 4, "height", "width")
    assert (bundle / m.tokenizer["vocab"]).is_file() and (bundle / m.tokenizer["merges"]).is_file()


def test_folder_and_single_file_give_the_same_graphs(bundles):
    """The same weights through two loaders must give the same numbers."""
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    outs = [ort.InferenceSession(str(bundles[k] / "vae_decoder.onnx")).run(None, {"latent_sample": x})[0]
            for k in ("folder-epsilon", "single-epsilon")]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_existing_output_is_not_overwritten_without_flag(models, bundles, tmp_path):
    target = tmp_path / "b"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    proc = run_edge("convert", models["folder-epsilon"], "-o", target, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (target / "keep.txt").read_text() == "mine"


def test_interrupted_convert_leaves_no_bundle(models, tmp_path):
    """Kill the converter once it has started writing graphs: nothing may appear under the target name."""
    target = tmp_path / "bundle"
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen([*EDGE, "convert", str(models["folder-epsilon"]), "-o", str(target)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not any(tmp_path.glob(".bundle.partial-*/*.onnx")) and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "converter finished before it could be interrupted"
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert proc.returncode != 0
        assert not target.exists()
        if sig == signal.SIGINT:  # a clean interrupt also removes its scratch folder
            assert not list(tmp_path.glob(".bundle.partial-*"))
    # and a later run succeeds in the same place
    run_edge("convert", models["folder-epsilon"], "-o", target)
    assert json.loads((target / "manifest.json").read_text())["format_version"] == 1
