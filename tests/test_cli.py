"""The CLI as a user runs it: real processes, real bundles, real files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_edge
from edge.png import parameters_text, read_parameters_text, read_params


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
    assert proc.returncode == 2, proc.stderr
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


GUIDANCE = "--guidance must be a finite number >= 0 (<= 1 skips the unconditional pass), got "


@pytest.mark.parametrize("args, expect", [
    (["--guidance", "nan"], GUIDANCE + "nan"),
    (["--guidance", "inf"], GUIDANCE + "inf"),
    (["--guidance=-inf"], GUIDANCE + "-inf"),
    (["--guidance", "-0.5"], GUIDANCE + "-0.5"),
    (["--guidance", "1e39"], GUIDANCE + "1e39 (beyond float32"),
    (["--guidance", "lots"], GUIDANCE + "lots"),
    (["--steps", "2.5"], "--steps must be a whole number >= 1, got 2.5"),
    (["--seed", "-1"], "--seed must be a whole number >= 0, got -1"),
    (["--num-images", "0"], "--num-images must be a whole number >= 1, got 0"),
    (["--threads", "0"], "--threads must be a whole number >= 1, got 0"),
    (["--height", "0"], "--height must be a whole number >= 1, got 0"),
    (["--width", "-64"], "--width must be a whole number >= 1, got -64"),
    (["--quality", "101"], "--quality must be a whole number from 1 to 100, got 101"),
    (["--memory-budget", "1e400GB"], "--memory-budget: memory budget '1e400GB' is not a finite size"),
    (["--memory-budget", "nanGB"], "--memory-budget: memory budget 'nanGB' is not a size"),
])
def test_generate_refuses_values_out_of_range(bundles, tmp_path, args, expect):
    _fails("generate", bundles["folder-epsilon"], "x", "-o", tmp_path / "x.png", *args, expect=expect)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, args, expect", [
    ("convert", ["--min-psnr", "nan"], "--min-psnr must be a finite number > 0, got nan"),
    ("convert", ["--min-psnr", "0"], "--min-psnr must be a finite number > 0, got 0"),
    ("convert", ["--max-chunk-mb", "inf"], "--max-chunk-mb must be a finite number > 0, got inf"),
    ("convert", ["--max-chunk-mb", "-5"], "--max-chunk-mb must be a finite number > 0, got -5"),
    ("convert", ["--split-unet", "0"], "--split-unet must be a whole number >= 1, got 0"),
    ("convert", ["--attention", "sliced", "--attention-chunk", "0"], "--attention-chunk must be a whole number >= 1"),
    ("convert", ["--threads", "two"], "--threads must be a whole number >= 1, got two"),
    ("plan", ["--memory-budget", "2GB", "--guidance", "nan"], GUIDANCE + "nan"),
    ("plan", ["--memory-budget", "2GB", "--num-images", "-1"], "--num-images must be a whole number >= 1, got -1"),
    ("plan", ["--memory-budget", "2GB", "--height", "0"], "--height must be a whole number >= 1, got 0"),
    ("profile", ["--threads", "0"], "--threads must be a whole number >= 1, got 0"),
])
def test_other_commands_refuse_values_out_of_range(models, bundles, tmp_path, command, args, expect):
    if command == "convert":
        _fails("convert", models["folder-epsilon"], "-o", tmp_path / "b", *args, expect=expect)
        assert not (tmp_path / "b").exists()
    else:
        _fails(command, bundles["folder-epsilon"], *args, expect=expect)


def test_parse_errors_are_one_line_too(tmp_path):
    _fails("generate", expect="the following arguments are required: bundle, prompt")


def test_unknown_extension_is_refused_before_the_bundle_is_read(bundles, tmp_path):
    expect = "-o/--output: cannot write an image to"
    err = _fails("generate", tmp_path / "no-such-bundle", "x", "-o", tmp_path / "out.jpgx", expect=expect)
    assert "extension '.jpgx'; use one of .png, .jpg, .jpeg, .webp" in err and "bundle not found" not in err
    _fails("generate", bundles["folder-epsilon"], "x", "-o", tmp_path / "out", expect="no extension")
    (tmp_path / "dir.png").mkdir()
    _fails("generate", bundles["folder-epsilon"], "x", "-o", tmp_path / "dir.png", expect="it is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png"] and not any((tmp_path / "dir.png").iterdir())


@pytest.mark.parametrize("name, fmt", [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.JPEG", "JPEG"), ("a.webp", "WEBP")])
def test_generate_writes_the_format_the_extension_names(bundles, tmp_path, name, fmt):
    out = tmp_path / name
    run_edge("generate", bundles["folder-epsilon"], "a blue cube", "--negative-prompt", "red", "--steps", "2",
             "--seed", "3", "--guidance", "4", "-o", out)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left beside it
    expected = {"prompt": "a blue cube", "negative_prompt": "red", "seed": 3, "steps": 2, "scheduler": "euler",
                "guidance": 4.0, "height": 64, "width": 64, "index": 0,
                "bundle_id": json.loads((bundles["folder-epsilon"] / "manifest.json").read_text())["bundle_id"]}
    with Image.open(out) as im:
        assert im.format == fmt and im.size == (64, 64) and im.mode == "RGB"
        if fmt == "PNG":
            assert im.text["parameters"] == parameters_text(expected)
        else:  # where A1111 (piexif) reads it: EXIF UserComment, "UNICODE\0" + UTF-16BE
            comment = im.getexif().get_ifd(0x8769)[0x9286]
            assert comment[:8] == b"UNICODE\0" and comment[8:].decode("utf-16-be") == parameters_text(expected)
    assert read_params(out) == expected
    assert read_parameters_text(out) == parameters_text(expected)


def test_image_formats_hold_the_same_picture(bundles, tmp_path):
    """WebP at --quality 100 is lossless; JPEG at the default quality stays close to the PNG (full-resolution
    colour: with 4:2:0 chroma it measured 24 dB on this noise-like image, as lossy WebP, which has no 4:4:4)."""
    for name, quality in (("a.png", "95"), ("a.webp", "100"), ("a.jpg", "95"), ("b.webp", "95")):
        run_edge("generate", bundles["folder-epsilon"], "x", "--steps", "2", "--quality", quality,
                 "-o", tmp_path / name)
    png, lossless, jpg, lossy = (np.asarray(Image.open(tmp_path / n).convert("RGB"), dtype=np.float64)
                                 for n in ("a.png", "a.webp", "a.jpg", "b.webp"))
    assert np.array_equal(png, lossless)
    psnr = {name: 10 * np.log10(255.0**2 / np.mean((png - x) ** 2)) for name, x in (("jpg", jpg), ("webp", lossy))}
    assert 33 < psnr["jpg"] < 99 and 20 < psnr["webp"] < 99, psnr


def test_several_images_keep_the_extension(bundles, tmp_path):
    run_edge("generate", bundles["folder-epsilon"], "x", "--steps", "2", "--num-images", "2", "-o", tmp_path / "n.webp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n-0.webp", "n-1.webp"]
    assert [read_params(tmp_path / f"n-{k}.webp")["index"] for k in (0, 1)] == [0, 1]
