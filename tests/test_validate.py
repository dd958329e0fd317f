"""Arguments checked where they enter the library, and images written whole or not at all."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from edge.png import read_params, save_image
from edge.validate import check_generate, finite_number, whole_number

PARAMS = {"prompt": "a cat", "negative_prompt": "", "seed": 1, "steps": 2, "scheduler": "euler", "guidance": 7.5,
          "height": 16, "width": 16, "bundle_id": "test", "index": 0}


@pytest.mark.parametrize("guidance", [math.nan, math.inf, -math.inf, -1.0, 1e39, np.float32("nan"), True, "7.5", None])
def test_bad_guidance_is_refused(guidance):
    with pytest.raises(ValueError, match=r"^guidance must be a finite number >= 0 \(<= 1 skips the unconditional"):
        check_generate(guidance, 0)


@pytest.mark.parametrize("seed", [-1, 1.0, True, "3", None])
def test_bad_seed_is_refused(seed):
    with pytest.raises(ValueError, match=r"^seed must be a whole number >= 0, got "):
        check_generate(7.5, seed)


def test_good_values_come_back_as_plain_python_numbers():
    guidance, seed = check_generate(np.float32(7.5), np.int64(3))
    assert (guidance, seed) == (7.5, 3) and type(guidance) is float and type(seed) is int  # JSON-serialisable
    assert check_generate(0, 0) == (0.0, 0)
    assert finite_number("x", 5, above=0.0, maximum=5) == 5.0 and whole_number("n", 100, maximum=100) == 100
    with pytest.raises(ValueError, match=r"^x must be a finite number > 0 and <= 5, got 6$"):
        finite_number("x", 6, above=0.0, maximum=5)
    with pytest.raises(ValueError, match=r"^n must be a whole number from 1 to 100, got 101$"):
        whole_number("n", 101, maximum=100)
    with pytest.raises(ValueError, match=r"got '7'$"):  # text is quoted, so it is not taken for the number 7
        whole_number("n", "7")


def test_pipeline_generate_refuses_nan_guidance(bundles):
    from edge.pipeline import Pipeline

    pipe = Pipeline.load(bundles["folder-epsilon"])
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="guidance must be a finite number"):
            pipe.generate("x", steps=1, guidance=bad)
    with pytest.raises(ValueError, match="seed must be a whole number >= 0, got -1"):
        pipe.generate("x", steps=1, seed=-1)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    image = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    out = save_image(image, tmp_path / "a.jpg", PARAMS)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"cannot write .*a\.jpg: EXIF data is too long .*PNG and WebP"):
        save_image(image, out, {**PARAMS, "prompt": "x" * 40_000})  # over JPEG's 64 KB metadata segment
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.jpg"]
    save_image(image, tmp_path / "b.webp", {**PARAMS, "prompt": "x" * 40_000})  # WebP has room for it
    assert read_params(tmp_path / "b.webp")["prompt"] == "x" * 40_000


def test_unknown_extension_and_quality_are_refused_before_writing(tmp_path):
    image = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match=r"extension '\.gif'; use one of \.png, \.jpg, \.jpeg, \.webp"):
        save_image(image, tmp_path / "a.gif", PARAMS)
    with pytest.raises(ValueError, match="quality must be a whole number from 1 to 100, got 0"):
        save_image(image, tmp_path / "a.jpg", PARAMS, quality=0)
    assert list(tmp_path.iterdir()) == []


def test_unicode_and_markup_survive_every_format(tmp_path):
    params = {**PARAMS, "prompt": 'a "cät" <b>&amp;</b>\n🐱 \'x\'', "negative_prompt": "ünder"}
    for name in ("a.png", "a.jpg", "a.webp"):
        assert read_params(save_image(Image.new("RGB", (16, 16)), tmp_path / name, params)) == params


def test_a_file_without_edge_parameters_says_so(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    with pytest.raises(ValueError, match="carries no edge parameters"):
        read_params(tmp_path / "plain.jpg")


@pytest.mark.parametrize("text, expected", [
    ("loras/style.safetensors:0.8", ("loras/style.safetensors", "0.8")),
    ("loras/style.safetensors", ("loras/style.safetensors", None)),
    ("models/control_canny:canny", ("models/control_canny", "canny")),
    ("emb/x.safetensors:<tok>", ("emb/x.safetensors", "<tok>")),
    ("C:/loras/style.safetensors", ("C:/loras/style.safetensors", None)),  # a drive letter is part of the path
])
def test_split_suffix(text, expected):
    from edge.validate import split_suffix

    assert split_suffix(text) == expected
