"""edge.images against diffusers' VaeImageProcessor and inpaint pipeline steps, on real files written to tmp_path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.images import (
    binarize, check_size, expand, load_image, load_mask, mask_latents, masked_image, paste_back, to_tensor,
)

torch = pytest.importorskip("torch")  # the reference side only: the `convert` extra
pytest.importorskip("diffusers")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.utils import load_image as diffusers_load_image  # noqa: E402

W, H = 64, 40  # multiples of 8, so diffusers' preprocess does not resize


def picture(w: int = W, h: int = H, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise on top: JPEG-friendly, and no two pixels alike."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)  # (h, w, 3)
    return Image.fromarray(np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8))


def mask_picture(w: int = W, h: int = H) -> Image.Image:
    """An RGB mask: a white ellipse, grey ramps across the 0.5 threshold (127 vs 128) at its rim."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = ((xx - w / 2) / (w / 3)) ** 2 + ((yy - h / 2) / (h / 3)) ** 2
    values = np.clip((1.5 - r) * 255, 0, 255).astype(np.uint8)  # (h, w)
    values[0, :4] = [126, 127, 128, 129]
    return Image.fromarray(np.stack([values] * 3, axis=-1))


def mask_processor() -> VaeImageProcessor:
    """As StableDiffusionInpaintPipeline builds its mask_processor."""
    return VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {"png": tmp_path / "image.png", "jpeg": tmp_path / "image.jpg", "rgba": tmp_path / "rgba.png",
           "mask": tmp_path / "mask.png", "text": tmp_path / "notes.png"}
    picture().save(out["png"])
    picture().save(out["jpeg"], quality=90)
    rgba = picture().convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((H, W), 100, np.uint8)))
    rgba.save(out["rgba"])
    mask_picture().save(out["mask"])
    out["text"].write_text("not an image\n")
    return out


@pytest.mark.parametrize("kind", ["png", "jpeg", "rgba"])
def test_load_image_as_diffusers(files: dict[str, Path], kind: str) -> None:
    mine = load_image(files[kind])
    assert mine.mode == "RGB" and mine.size == (W, H)
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(diffusers_load_image(str(files[kind]))))
    assert np.asarray(load_image(str(files[kind]))).tobytes() == np.asarray(mine).tobytes()  # str path too


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    picture().save(path, exif=exif.tobytes())
    mine = load_image(path)
    assert mine.size == (H, W)
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(diffusers_load_image(str(path))))


def test_unreadable_files_name_the_file(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read image file '.*notes\.png' as an image .*accepted: any image"):
        load_image(files["text"])
    with pytest.raises(ValueError, match=r"cannot read mask file '.*notes\.png'"):
        load_mask(files["text"], (W, H))
    with pytest.raises(ValueError, match=r"image file '.*missing\.png' does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"image file '.*' does not exist or is not a file"):
        load_image(tmp_path)
    with pytest.raises(ValueError, match="image must be a PIL image or a file path; got ndarray"):
        load_image(np.zeros((4, 4, 3)))  # type: ignore[arg-type]


def test_truncated_file_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.png"
    cut.write_bytes(files["png"].read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cannot read image file '.*cut\.png'"):
        load_image(cut)


def test_check_size() -> None:
    image = picture(64, 48)
    assert check_size(image, 16, resize=False) is image
    odd = picture(70, 41)
    with pytest.raises(ValueError, match=r"image size 70x41 is not a multiple of 16 .* nearest valid size is 64x48"):
        check_size(odd, 16, resize=False)
    resized = check_size(odd, 16, resize=True)
    assert resized.size == (64, 48)
    reference = VaeImageProcessor().resize(odd, height=48, width=64)  # diffusers' Lanczos resize
    np.testing.assert_array_equal(np.asarray(resized), np.asarray(reference))
    assert check_size(picture(8, 8), 16, resize=True).size == (16, 16)  # never below one multiple
    assert check_size(picture(24, 40), 16, resize=True).size == (32, 48)  # halves round up
    for bad in (0, -16, 1.5, True, "16"):
        with pytest.raises(ValueError, match=f"size_multiple must be a whole number >= 1; got {bad!r}"):
            check_size(image, bad, resize=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["png", "jpeg", "rgba"])
def test_to_tensor_as_vae_image_processor(files: dict[str, Path], kind: str) -> None:
    image = load_image(files[kind])
    mine = to_tensor(image)
    assert mine.shape == (1, 3, H, W) and mine.dtype == np.float32 and mine.flags.c_contiguous
    assert -1.0 <= mine.min() and mine.max() <= 1.0
    reference = VaeImageProcessor(vae_scale_factor=8).preprocess(image).numpy()  # (1, 3, H, W)
    assert np.abs(mine - reference).max() < 1e-6
    np.testing.assert_array_equal(mine, reference)  # the same float32 operations: bit for bit


def test_to_tensor_converts_other_modes_as_load_image() -> None:
    rgba = picture().convert("RGBA")
    np.testing.assert_array_equal(to_tensor(rgba), to_tensor(load_image(rgba)))
    with pytest.raises(ValueError, match="to_tensor takes a PIL image"):
        to_tensor(np.zeros((1, 3, 8, 8)))  # type: ignore[arg-type]


def test_mask_as_the_inpaint_pipeline(files: dict[str, Path]) -> None:
    soft = load_mask(files["mask"], (W, H))
    assert soft.shape == (1, 1, H, W) and soft.dtype == np.float32
    np.testing.assert_array_equal(soft[0, 0], np.asarray(mask_picture().convert("L")).astype(np.float32) / 255)
    condition = mask_processor().preprocess(Image.open(files["mask"]), height=H, width=W)  # (1, 1, H, W) 0/1
    hard = binarize(soft)
    np.testing.assert_array_equal(hard, condition.numpy())
    np.testing.assert_array_equal(hard[0, 0, 0, :4], [0, 0, 1, 1])  # 127 keeps, 128 repaints
    latents = mask_latents(hard, 8)  # (1, 1, H/8, W/8)
    reference = torch.nn.functional.interpolate(condition, size=(H // 8, W // 8))  # prepare_mask_latents
    assert latents.shape == (1, 1, H // 8, W // 8)
    assert np.abs(latents - reference.numpy()).max() == 0.0
    init_image = VaeImageProcessor().preprocess(load_image(files["png"]))  # (1, 3, H, W)
    np.testing.assert_array_equal(masked_image(to_tensor(load_image(files["png"])), hard),
                                  (init_image * (condition < 0.5)).numpy())


@pytest.mark.parametrize("blur", [1, 4])
def test_mask_blur_as_diffusers(files: dict[str, Path], blur: int) -> None:
    mine = load_mask(files["mask"], (W, H), blur=blur)
    reference = VaeImageProcessor.blur(Image.open(files["mask"]).convert("L"), blur)
    np.testing.assert_array_equal(mine[0, 0], np.asarray(reference).astype(np.float32) / 255)
    sharp = load_mask(files["mask"], (W, H))
    assert np.count_nonzero((mine > 0) & (mine < 1)) > np.count_nonzero((sharp > 0) & (sharp < 1))  # softer


def test_mask_any_mode() -> None:
    bits = Image.fromarray(np.eye(8, dtype=bool))  # mode "1"
    np.testing.assert_array_equal(load_mask(bits, (8, 8))[0, 0], np.eye(8))
    palette = mask_picture().convert("P")
    assert load_mask(palette, (W, H)).shape == (1, 1, H, W)


def test_mask_errors_name_the_values(files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="mask size 64x40 differs from the image's 64x48"):
        load_mask(files["mask"], (64, 48))
    with pytest.raises(ValueError, match=r"mask blur must be a whole number of pixels >= 0; got -1"):
        load_mask(files["mask"], (W, H), blur=-1)
    with pytest.raises(ValueError, match=r"mask blur .* got 2.5"):
        load_mask(files["mask"], (W, H), blur=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mask size must be \(width, height\)"):
        load_mask(files["mask"], 64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mask_latents: mask \(1, 1, 40, 60\) must be .* multiples of the VAE scale factor 8"):
        mask_latents(np.zeros((1, 1, 40, 60), np.float32), 8)


@pytest.mark.parametrize("fill", ["edge", "mean"])
def test_expand(fill: str) -> None:
    image = picture(48, 32)
    canvas, mask = expand(image, None, left=16, top=0, right=0, bottom=16, size_multiple=16, fill=fill)
    assert canvas.size == (64, 48) and canvas.mode == "RGB" and mask.shape == (1, 1, 48, 64)
    pixels, inner = np.asarray(canvas), np.asarray(image)
    np.testing.assert_array_equal(pixels[0:32, 16:64], inner)  # the picture, where it was put
    assert mask[0, 0, 0:32, 16:64].max() == 0.0 and mask[0, 0, 32:].min() == 1.0 and mask[0, 0, :, :16].min() == 1.0
    if fill == "edge":
        np.testing.assert_array_equal(pixels, np.pad(inner, ((0, 16), (16, 0), (0, 0)), mode="edge"))
    else:
        colour = np.round(inner.reshape(-1, 3).mean(axis=0))
        np.testing.assert_array_equal(pixels[40, 5], colour)


def test_expand_keeps_a_given_mask() -> None:
    image = picture(48, 32)
    inner = np.zeros((1, 1, 32, 48), np.float32)
    inner[..., 10:20, 10:20] = 0.5
    _, mask = expand(image, inner, left=0, top=16, right=16, bottom=0, size_multiple=16)
    np.testing.assert_array_equal(mask[..., 16:, :48], inner)
    assert mask[..., :16, :].min() == 1.0 and mask[..., :, 48:].min() == 1.0


def test_expand_refuses_naming_the_nearest_padding() -> None:
    image = picture(48, 32)
    with pytest.raises(ValueError, match=r"expand: width 48 \+ left 10 \+ right 10 = 68 is not a multiple of 16; "
                                         r"the nearest valid left \+ right is 16 or 32 \(e.g. left=10, right=22\)"):
        expand(image, None, left=10, top=0, right=10, bottom=0, size_multiple=16)
    with pytest.raises(ValueError, match=r"expand: height 32 \+ top 0 \+ bottom 8 = 40 .* is 0 or 16 \(e.g. top=0, bottom=16\)"):
        expand(image, None, left=0, top=0, right=0, bottom=8, size_multiple=16)
    with pytest.raises(ValueError, match="expand: left must be a whole number of pixels >= 0; got -16"):
        expand(image, None, left=-16, top=0, right=0, bottom=0, size_multiple=16)
    with pytest.raises(ValueError, match="expand: unknown fill 'noise'; known: edge, mean"):
        expand(image, None, left=16, top=0, right=0, bottom=0, size_multiple=16, fill="noise")
    with pytest.raises(ValueError, match=r"expand mask must be an array \(1, 1, 32, 48\) for a 48x32 image"):
        expand(image, np.zeros((32, 48), np.float32), left=16, top=0, right=0, bottom=0, size_multiple=16)


@pytest.mark.parametrize("blur", [0, 4])
def test_paste_back_as_apply_overlay(files: dict[str, Path], blur: int) -> None:
    original = load_image(files["png"])
    generated = picture(seed=1)
    mask = load_mask(files["mask"], original.size, blur=blur)
    mine = paste_back(original, generated, mask)
    mask_image = Image.open(files["mask"]).convert("L")
    if blur:
        mask_image = VaeImageProcessor.blur(mask_image, blur)
    reference = VaeImageProcessor().apply_overlay(mask_image, original, generated)
    assert mine.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(reference))
    keep = mask[0, 0] == 0
    np.testing.assert_array_equal(np.asarray(mine)[keep], np.asarray(original)[keep])  # untouched: exactly
    repaint = mask[0, 0] == 1
    np.testing.assert_array_equal(np.asarray(mine)[repaint], np.asarray(generated)[repaint])


def test_paste_back_errors() -> None:
    original, mask = picture(), np.zeros((1, 1, H, W), np.float32)
    with pytest.raises(ValueError, match="the generated image is 32x32, the original 64x40"):
        paste_back(original, picture(32, 32), mask)
    with pytest.raises(ValueError, match=r"paste_back mask must be an array \(1, 1, 40, 64\)"):
        paste_back(original, picture(), mask[0, 0])
    with pytest.raises(ValueError, match="paste_back mask values must be finite, from 0 to 1; got 0.0..2.0"):
        paste_back(original, picture(), mask + np.float32(2) * (np.arange(W) == 3))


def test_runtime_import_has_no_torch() -> None:
    code = "import sys, edge.images; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
