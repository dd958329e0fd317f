"""The device's control-image pre-processors: canny against OpenCV's cv2.Canny (what ControlNet's own annotator
runs), the others by what they must draw, and `edge control-image` end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import run_edge
from edge.control_images import canny, make, mask, tile
from edge.eval.scenes import COLORS, SHAPES, Scene, SceneObject, render

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is the canny reference (pip install "
                                        "'edge-diffusion[test]')")


def _photos():
    rng = np.random.default_rng(0)
    for k, shape in enumerate(SHAPES):
        colors = list(COLORS)
        scene = Scene(colors[k % len(colors)], (SceneObject(shape, colors[(k + 3) % len(colors)], "large", "centre"),))
        yield Image.fromarray(render(scene, 128))
    noise = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    yield Image.fromarray(noise).filter(ImageFilter.GaussianBlur(2))


@pytest.mark.parametrize("low, high", [(100, 200), (30, 90), (5, 15)])
def test_canny_is_opencvs(low, high):
    for photo in _photos():
        ours = np.asarray(canny(photo, low, high))
        assert ours.shape == (photo.height, photo.width, 3) and set(np.unique(ours)) <= {0, 255}
        theirs = cv2.Canny(np.asarray(photo.convert("L")), low, high) > 0
        edges = ours[..., 0] > 0
        union = (edges | theirs).sum()
        assert union == 0 or (edges & theirs).sum() / union >= 0.99, (low, high)


def test_mask_tile_and_bad_input():
    photo = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (8, 1, 3)))
    m = np.asarray(mask(photo, 128))[..., 0]
    assert (m[:, :128] == 0).all() and (m[:, 128:] == 255).all()
    t = tile(photo.resize((256, 256)), 8)
    assert t.size == (256, 256)
    with pytest.raises(ValueError, match="expected 0 <= low <= high"):
        canny(photo, 200, 100)
    with pytest.raises(ValueError, match="need a model of their own"):
        make("depth", photo)


def test_cli(tmp_path):
    photo = next(_photos())
    photo.save(tmp_path / "photo.png")
    run_edge("control-image", "canny", tmp_path / "photo.png", "--size", "64x64", "-o", tmp_path / "edges.png")
    edges = Image.open(tmp_path / "edges.png")
    assert edges.size == (64, 64)
    expected = cv2.Canny(np.asarray(photo.resize((64, 64), Image.Resampling.LANCZOS).convert("L")), 100, 200) > 0
    assert np.array_equal(np.asarray(edges)[..., 0] > 0, expected)
    proc = run_edge("control-image", "canny", tmp_path / "photo.png", "--size", "64by64", "-o", tmp_path / "x.png",
                    check=False)
    assert proc.returncode == 2 and "expected WIDTHxHEIGHT" in proc.stderr and not (tmp_path / "x.png").exists()
