"""The CLI as a user runs it: real processes, real bundles, real files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_edge
from edge.png import read_params


def test_generate_writes_png_with_parameters(bundles, tmp_path):
    out = tmp_path / "cat.png"
    proc = run_edge("generate", bundles["folder-epsilon"], "a tiny cat", "--negative-prompt", "dog",
                    "--steps", "3", "--seed", "5", "--scheduler", "euler_a", "--width", "96", "-o", out)
    assert "peak memory" in proc.stdout and "s/step" in proc.stderr  # timings and the progress bar
    params = read_params(out)
    assert params == {"prompt": "a tiny cat", "negative_prompt": "dog", "seed": 5, "steps": 3,
                      "scheduler": "euler_a", "guidance": 7.5, "height": 64, "width": 96, "index": 0,
                      "bundle_id": json.loads((bundles["folder-epsilon"] / "manifest.json").read_text())["bundle_id"]}
    with Image.open(out) as im:
        assert im.size == (96, 64)
        assert "Steps: 3, Sampler: euler_a, CFG scale: 7.5, Seed: 5, Size: 96x64" in im.text["parameters"]


def test_same_seed_same_image_other_seed_other_image(bundles, tmp_path):
    paths = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        paths[name] = tmp_path / f"{name}.png"
        run_edge("generate", bundles["folder-epsilon"], "x", "--steps", "2", "--seed", seed, "-o", paths[name])
    a, b, c = (np.asarray(Image.open(paths[k])) for k in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_num_images(bundles, tmp_path):
    run_edge("generate", bundles["folder-epsilon"], "x", "--steps", "2", "--num-images", "2", "-o", tmp_path / "n.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n-0.png", "n-1.png"]


def test_info_summarises_manifest(bundles):
    out = run_edge("info", bundles["single-v_prediction"]).stdout
    assert "v_prediction" in out and "single_file" in out
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert name in out


def _fails(*args: str, expect: str) -> str:
    proc = run_edge(*args, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert expect in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("args, expect", [
    (["--height", "60"], "height 60 must be a positive multiple of 16"),
    (["--width", "100"], "width 100 must be a positive multiple of 16"),
    (["--steps", "0"], "steps must be a whole number >= 1, got 0"),
    (["--scheduler", "heun"], "unknown scheduler 'heun'"),
])
def test_bad_generate_arguments(bundles, tmp_path, args, expect):
    err = _fails("generate", bundles["folder-epsilon"], "x", *args, "-o", tmp_path / "x.png", expect=expect)
    if "scheduler" in expect:
        for known in ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "lcm"):
            assert known in err
    assert not (tmp_path / "x.png").exists()


def test_missing_bundle(tmp_path):
    _fails("generate", tmp_path / "nope", "x", expect="bundle not found")


def test_corrupt_graph_is_refused(bundles, tmp_path):
    bundle = shutil.copytree(bundles["folder-epsilon"], tmp_path / "b")
    data = bytearray((bundle / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "unet.onnx").write_bytes(bytes(data))
    _fails("generate", bundle, "x", "--steps", "1", expect="unet.onnx is corrupt or was replaced: sha256")


def test_newer_format_version_is_refused(bundles, tmp_path):
    bundle = shutil.copytree(bundles["folder-epsilon"], tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _fails("info", bundle, expect="bundle format version 99 is newer than this runtime reads (2)")


def test_unsupported_sources(tmp_path):
    from safetensors.numpy import save_file

    random_keys = tmp_path / "not-sd.safetensors"
    save_file({"some.weight": np.zeros((3, 3), np.float32)}, str(random_keys))
    _fails("convert", random_keys, "-o", tmp_path / "b", expect="cannot read")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(random_keys.read_bytes()[:40])
    _fails("convert", truncated, "-o", tmp_path / "b", expect="cannot read")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not really")
    _fails("convert", pickle, "-o", tmp_path / "b", expect="--allow-pickle")
    text = tmp_path / "model.txt"
    text.write_text("hello")
    _fails("convert", text, "-o", tmp_path / "b", expect="unsupported source")
    _fails("convert", "nobody/no-such-model", "-o", tmp_path / "b", expect="not in the local Hugging Face cache")
    assert not (tmp_path / "b").exists()
