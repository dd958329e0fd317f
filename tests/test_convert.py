"""`edge convert`: what a bundle holds, and that a conversion is all-or-nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import onnxruntime as ort
import pytest

from conftest import EDGE, REPO, run_edge
from edge.bundle import FORMAT_VERSION
from edge.bundle import COMPONENTS, read_manifest, sha256_file, verify_bundle


@pytest.mark.parametrize("key", ["folder-epsilon", "single-v_prediction"])
def test_manifest_describes_every_graph(bundles, key):
    bundle = bundles[key]
    m = read_manifest(bundle)
    assert m.prediction_type == key.split("-", 1)[1]
    assert m.family == "sd1" and m.latent_channels == 4 and m.vae_scale_factor == 8
    assert m.size_multiple == 16 and m.default_size == (64, 64)
    assert m.scheduler["beta_schedule"] == "scaled_linear" and m.scheduler["prediction_type"] == m.prediction_type
    assert set(m.components) == set(COMPONENTS) - {"tiny_vae_decoder"}  # only with --tiny-vae
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
    """Kill the converter once it has started writing graphs: nothing may appear under the target name.
    Ctrl-C and `kill` (SIGTERM) remove the partial folder at once; what SIGKILL leaves, the next convert to
    the same place removes."""
    target = tmp_path / "bundle"
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        # SIGINT back to its default in the child: a shell's background job (`make test &`) ignores SIGINT,
        # the child would inherit that, and Python would then never raise KeyboardInterrupt.
        proc = subprocess.Popen([*EDGE, "convert", str(models["folder-epsilon"]), "-o", str(target)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while not any(tmp_path.glob(".bundle.partial-*/*.onnx")) and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "converter finished before it could be interrupted"
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert proc.returncode != 0
        assert not target.exists()
        if sig != signal.SIGKILL:  # a clean interrupt also removes its scratch folder
            assert not list(tmp_path.glob(".bundle.partial-*")), sig
    assert list(tmp_path.glob(".bundle.partial-*"))  # SIGKILL: no chance to clean up
    # and a later run succeeds in the same place (the dead run's lock is no lock), removing its folder
    run_edge("convert", models["folder-epsilon"], "-o", target)
    assert not list(tmp_path.glob(".bundle.partial-*")) and not (tmp_path / ".bundle.lock").exists()
    assert json.loads((target / "manifest.json").read_text())["format_version"] == FORMAT_VERSION


def test_external_data_graphs_load_verify_and_generate(models, tmp_path):
    """Large graphs keep weights in a .data file (forced here with a 0-byte limit); the hash covers it."""
    from edge import Pipeline
    from edge.converters.convert import convert

    bundle = tmp_path / "b"
    convert(str(models["folder-epsilon"]), bundle, external_data_over=0, log=lambda s: None)
    unet = read_manifest(bundle).components["unet"]
    assert sorted(unet.files) == ["unet.onnx", "unet.onnx.data"]
    assert (bundle / "unet.onnx.data").stat().st_size > (bundle / "unet.onnx").stat().st_size
    assert Pipeline.load(bundle).generate("x", steps=2).images[0].size == (64, 64)
    data = bytearray((bundle / "unet.onnx.data").read_bytes())
    data[-1] ^= 0xFF
    (bundle / "unet.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="unet.onnx.data is corrupt"):
        Pipeline.load(bundle)


def test_hub_id_is_read_from_the_local_cache_only(models, tmp_path):
    """A Hub id resolves through huggingface_hub's real cache layout, and never through the network."""
    import shutil

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--edge-test--tiny-sd"
    shutil.copytree(models["folder-v_prediction"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HUB_CACHE": str(cache)}
    proc = subprocess.run([*EDGE, "convert", "edge-test/tiny-sd", "-o", str(tmp_path / "b")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(tmp_path / "b")
    assert m.source["kind"] == "hub" and m.prediction_type == "v_prediction"
    proc = subprocess.run([*EDGE, "convert", "edge-test/other", "-o", str(tmp_path / "c")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "'edge-test/other' is not in the local Hugging Face cache" in proc.stderr


def _start_convert(model, target) -> subprocess.Popen:
    return subprocess.Popen([*EDGE, "convert", str(model), "-o", str(target)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _paused_once_converting(proc: subprocess.Popen, folder) -> list:
    """Wait until `proc` has taken the lock and started writing its partial bundle, then stop it there."""
    deadline = time.time() + 120
    while not (partials := list(folder.glob(".b.partial-*"))) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert partials and proc.poll() is None, "the first convert never started writing"
    proc.send_signal(signal.SIGSTOP)
    return partials


def _assert_complete(target) -> None:
    from edge import Pipeline

    m = read_manifest(target)
    verify_bundle(target, m)  # every file of the bundle, against its manifest
    assert set(m.components) == set(COMPONENTS) - {"tiny_vae_decoder"}  # only with --tiny-vae
    assert Pipeline.load(target).generate("x", steps=1).images[0].size == (64, 64)
    assert not list(target.parent.glob(".b.*")), list(target.parent.iterdir())  # no partial, lock or old folder


def test_second_convert_to_a_folder_being_written_fails_at_once(models, tmp_path):
    """The second must not wait for the end and then replace the first's bundle: it stops with the reason,
    and leaves the first's partial folder alone."""
    target = tmp_path / "b"
    first = _start_convert(models["folder-epsilon"], target)
    try:
        partials = _paused_once_converting(first, tmp_path)
        second = run_edge("convert", models["folder-v_prediction"], "-o", target, check=False)
        assert first.poll() is None and all(p.is_dir() for p in partials)  # still paused mid-conversion
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: another `edge convert` (pid {first.pid}) is writing {target}; wait for it to finish or "
        f"choose another -o (its lock: {tmp_path / '.b.lock'})")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    _assert_complete(target)
    assert read_manifest(target).prediction_type == "epsilon"  # the first's model, not the second's


def test_simultaneous_converts_to_one_folder_one_wins(models, tmp_path):
    target = tmp_path / "b"
    procs = [_start_convert(models[k], target) for k in ("folder-epsilon", "folder-v_prediction")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2).strip().splitlines()[-1]
    # the loser either found the winner's lock or, started late, its finished bundle
    assert f"is writing {target};" in loser or f"{target} already exists" in loser, loser
    _assert_complete(target)
    winner = ["epsilon", "v_prediction"][[rc for rc, _ in results].index(0)]
    assert read_manifest(target).prediction_type == winner


def test_folder_made_by_hand_during_a_convert_is_kept(models, tmp_path):
    """Something else created the target meanwhile (not a convert: it took no lock). Without --overwrite it is
    left untouched, and the finished bundle is kept beside it rather than thrown away."""
    target = tmp_path / "b"
    first = _start_convert(models["folder-epsilon"], target)
    try:
        _paused_once_converting(first, tmp_path)
        target.mkdir()
        (target / "mine.txt").write_text("keep me")
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    kept = tmp_path / f"b.new-{first.pid}"
    assert first.returncode == 2
    assert err.strip().splitlines()[-1] == (f"error: {target} appeared while converting and was left as it is "
                                            f"(pass --overwrite to replace it); the new bundle is at {kept}")
    assert [p.name for p in target.iterdir()] == ["mine.txt"] and (target / "mine.txt").read_text() == "keep me"
    verify_bundle(kept, read_manifest(kept))
