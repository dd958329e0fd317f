"""The input side of img2img, inpainting and outpainting: image and mask files in, the arrays the pipeline runs on out.

numpy and pillow only. Where diffusers has a step of its own (VaeImageProcessor for Stable Diffusion, the inpaint
pipeline's mask handling, apply_overlay), the function here does the same arithmetic, so a run can be compared with
diffusers' pipelines on the same files (tests/test_images.py). Masks are arrays (1, 1, H, W) float32 in [0, 1]
throughout, white (1) = repaint; sizes are (width, height), as PIL gives them.

    image = check_size(load_image("photo.jpg"), manifest.size_multiple, resize=False)
    mask = load_mask("mask.png", image.size, blur=4)       # soft: for paste_back
    pixels = to_tensor(image)                              # (1, 3, H, W) in [-1, 1]: the VAE encoder's input
    hard = binarize(mask)                                  # what diffusers' inpaint pipeline runs on
    latent_mask = mask_latents(hard, vae_scale_factor)     # (1, 1, H/8, W/8): the latent blend, or 9-channel UNet input
    ...
    result = paste_back(image, generated, mask)
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

ImageInput = Image.Image | str | os.PathLike
FILLS = ("edge", "mean")


def _open(source: ImageInput, what: str) -> Image.Image:
    """A PIL image from an image or a file, fully decoded (a truncated file fails here, not mid-run) and upright:
    EXIF orientation applied, as diffusers' load_image does (phones store photos sideways with a tag saying so)."""
    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"{what} must be a PIL image or a file path; got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{what} file {str(path)!r} does not exist or is not a file")
    try:
        with Image.open(path) as f:
            f.load()
            return ImageOps.exif_transpose(f)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read {what} file {str(path)!r} as an image ({e}); accepted: any image file "
                         f"Pillow reads (PNG, JPEG, WebP, BMP, TIFF, ...)") from e


def load_image(image: ImageInput) -> Image.Image:
    """The image as RGB, upright. Alpha is dropped, as diffusers' load_image drops it: the VAE takes 3 channels."""
    return _open(image, "image").convert("RGB")


def _check_multiple(size_multiple: object) -> int:
    if not isinstance(size_multiple, numbers.Integral) or isinstance(size_multiple, bool) or size_multiple < 1:
        raise ValueError(f"size_multiple must be a whole number >= 1; got {size_multiple!r}")
    return int(size_multiple)


def _nearest_multiple(n: int, m: int) -> int:
    return max(m, (n + m // 2) // m * m)  # halves round up


def check_size(image: Image.Image, size_multiple: int, resize: bool) -> Image.Image:
    """The image if its width and height are multiples of the bundle's size_multiple (what the UNet's downsampling
    allows); else, with resize=True, resized (Lanczos, as diffusers) to the nearest valid size, or refused naming it.
    Refusing is the default because resizing changes the aspect ratio a little and should be asked for."""
    m = _check_multiple(size_multiple)
    w, h = image.size
    if w % m == 0 and h % m == 0:
        return image
    nw, nh = _nearest_multiple(w, m), _nearest_multiple(h, m)
    if not resize:
        raise ValueError(f"image size {w}x{h} is not a multiple of {m} (this bundle's size_multiple); the nearest "
                         f"valid size is {nw}x{nh}: resize the image to it, or pass resize=True")
    return image.resize((nw, nh), resample=Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1], the VAE encoder's input: exactly VaeImageProcessor.preprocess for SD
    (x / 255 in float32, then 2x - 1). Another mode than RGB is converted as load_image would; the size is kept
    (check_size first: diffusers would silently shrink it to a multiple of 8)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"to_tensor takes a PIL image (see load_image); got {type(image).__name__}")
    pixels = np.asarray(image.convert("RGB")).astype(np.float32) / np.float32(255.0)  # (H, W, 3) in [0, 1]
    return np.ascontiguousarray((2.0 * pixels - 1.0).transpose(2, 0, 1)[None])  # (1, 3, H, W)


def _check_size_pair(size: object, what: str) -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in size)):
        raise ValueError(f"{what} must be (width, height), two whole numbers >= 1; got {size!r}")
    return int(size[0]), int(size[1])


def load_mask(mask: ImageInput, size: tuple[int, int], blur: int = 0) -> np.ndarray:
    """(1, 1, H, W) float32 in [0, 1], white = repaint, for an image of `size` (width, height). Any mode is read as
    L (luma, as diffusers' mask processor converts). `blur`: Gaussian blur radius in pixels (PIL's GaussianBlur,
    as A1111's mask_blur and diffusers' VaeImageProcessor.blur), for a seamless paste_back. Kept soft: `binarize`
    gives what diffusers' inpaint pipeline runs on."""
    width, height = _check_size_pair(size, "mask size")
    if not isinstance(blur, numbers.Integral) or isinstance(blur, bool) or blur < 0:
        raise ValueError(f"mask blur must be a whole number of pixels >= 0; got {blur!r}")
    gray = _open(mask, "mask").convert("L")
    if gray.size != (width, height):
        raise ValueError(f"mask size {gray.width}x{gray.height} differs from the image's {width}x{height}; "
                         f"the mask must be the image's size")
    if blur > 0:
        gray = gray.filter(ImageFilter.GaussianBlur(int(blur)))
    return (np.asarray(gray).astype(np.float32) / np.float32(255.0))[None, None]  # (1, 1, H, W)


def _check_mask(mask: object, size: tuple[int, int], what: str) -> np.ndarray:
    """`mask` as (1, 1, H, W) float32 for an image of `size` (width, height), or one error naming what is wrong."""
    width, height = size
    if not isinstance(mask, np.ndarray) or mask.shape != (1, 1, height, width):
        got = mask.shape if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"{what} must be an array (1, 1, {height}, {width}) for a {width}x{height} image, as "
                         f"load_mask gives; got {got}")
    mask = mask.astype(np.float32, copy=False)
    if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"{what} values must be finite, from 0 to 1; got {mask.min()}..{mask.max()}")
    return mask


def binarize(mask: np.ndarray) -> np.ndarray:
    """0 or 1 at 0.5, as diffusers' inpaint mask processor (do_binarize=True): 128 of 255 and above repaint."""
    return (mask >= 0.5).astype(np.float32)  # (1, 1, H, W)


def mask_latents(mask: np.ndarray, vae_scale_factor: int) -> np.ndarray:
    """(1, 1, H/f, W/f): the mask at latent size, as diffusers' prepare_mask_latents (interpolate, mode "nearest":
    the top-left pixel of each f x f block). Pass the binarized mask for diffusers' inpainting."""
    f = _check_multiple(vae_scale_factor)
    if mask.ndim != 4 or mask.shape[2] % f or mask.shape[3] % f:
        raise ValueError(f"mask_latents: mask {mask.shape} must be (1, 1, H, W) with H and W multiples of the "
                         f"VAE scale factor {f}")
    return np.ascontiguousarray(mask[:, :, ::f, ::f])  # (1, 1, H/f, W/f)


def masked_image(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(1, 3, H, W): the image with the repaint area zeroed (mid-grey in [-1, 1]), the 9-channel inpainting UNet's
    conditioning before encoding; diffusers' init_image * (mask_condition < 0.5)."""
    if pixels.shape[2:] != mask.shape[2:]:
        raise ValueError(f"masked_image: image {pixels.shape} and mask {mask.shape} differ in size")
    return (pixels * (mask < 0.5)).astype(np.float32)  # (1, 3, H, W)


def _padding_error(axis: str, n: int, a: tuple[str, int], b: tuple[str, int], m: int) -> ValueError:
    """A message naming the nearest valid paddings along one axis, and one split that keeps the first side."""
    total = a[1] + b[1]
    lower, upper = (n + total) // m * m - n, (n + total) // m * m + m - n  # the valid totals either side
    options = f"{lower} or {upper}" if lower >= 0 else f"{upper}"
    return ValueError(f"expand: {axis} {n} + {a[0]} {a[1]} + {b[0]} {b[1]} = {n + total} is not a multiple of {m}; "
                      f"the nearest valid {a[0]} + {b[0]} is {options} (e.g. {a[0]}={a[1]}, {b[0]}={upper - a[1]})")


def expand(image: Image.Image, mask: np.ndarray | None, left: int, top: int, right: int, bottom: int,
           size_multiple: int, fill: str = "edge") -> tuple[Image.Image, np.ndarray]:
    """Outpainting: the canvas grown by the given pixels on each side, and its mask, white over the new area
    (and where `mask` (1, 1, h, w) is white). The new size must stay a multiple of size_multiple.

    fill="edge" (the default) replicates the border pixels outward, so at strength < 1 the new area starts from
    a continuation of the picture with no step at the seam; "mean" fills the image's mean colour, a neutral
    block the model repaints more freely but that shows through at low strength. At strength 1 the fill is never
    seen (pure noise there; the 9-channel inpainting UNet sees the area zeroed)."""
    m = _check_multiple(size_multiple)
    pads = {"left": left, "top": top, "right": right, "bottom": bottom}
    for side, value in pads.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise ValueError(f"expand: {side} must be a whole number of pixels >= 0; got {value!r}")
    if fill not in FILLS:
        raise ValueError(f"expand: unknown fill {fill!r}; known: {', '.join(FILLS)}")
    w, h = image.size
    if (w + left + right) % m:
        raise _padding_error("width", w, ("left", left), ("right", right), m)
    if (h + top + bottom) % m:
        raise _padding_error("height", h, ("top", top), ("bottom", bottom), m)
    inner = np.zeros((1, 1, h, w), np.float32) if mask is None else _check_mask(mask, (w, h), "expand mask")
    pixels = np.asarray(image.convert("RGB"))  # (h, w, 3) uint8
    if fill == "edge":
        canvas = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")  # (H, W, 3)
    else:
        colour = np.round(pixels.reshape(-1, 3).mean(axis=0)).astype(np.uint8)  # (3,)
        canvas = np.empty((h + top + bottom, w + left + right, 3), np.uint8)  # (H, W, 3)
        canvas[:] = colour
        canvas[top:top + h, left:left + w] = pixels
    new_mask = np.ones((1, 1, h + top + bottom, w + left + right), np.float32)  # (1, 1, H, W)
    new_mask[:, :, top:top + h, left:left + w] = inner
    return Image.fromarray(canvas), new_mask


def paste_back(original: Image.Image, generated: Image.Image, mask: np.ndarray) -> Image.Image:
    """The generated image with the original's pixels put back where `mask` (1, 1, H, W) is not white, blended
    where it is soft: diffusers' VaeImageProcessor.apply_overlay, by the same PIL operations (premultiplied alpha,
    so it rounds as diffusers does). Where the mask is 0 the pixels are the original's exactly, so the VAE's
    round trip never touches what was not to be repainted."""
    if original.size != generated.size:
        raise ValueError(f"paste_back: the generated image is {generated.width}x{generated.height}, the original "
                         f"{original.width}x{original.height}; they must be the same size")
    mask = _check_mask(mask, original.size, "paste_back mask")
    alpha = Image.fromarray(np.round(mask[0, 0] * 255.0).astype(np.uint8))  # (H, W) L, 255 = repaint
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(alpha))
    out = generated.convert("RGBA")
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")


__all__ = ["FILLS", "binarize", "check_size", "expand", "load_image", "load_mask", "mask_latents", "masked_image",
           "paste_back", "to_tensor"]
