"""What a generation request is, and the checks that stand between HTTP bodies and the pipeline.

Both APIs (the page's /api/jobs and A1111's /sdapi/v1/*) end in one `GenerationRequest`; every value in it has
been checked here against its type, its range and the server's limits, so a bad one is refused with one
message that names the field before any work is queued. Pictures arrive as base64 (optionally a data URL)
and are decoded and bounded here too: a picture's pixel count is read from its header before it is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import secrets
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from edge.serve.config import Limits

PROMPT_SYNTAXES = ("auto", "a1111", "compel", "none")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_SEED = 2**63 - 1
_MISSING = object()


class ApiError(Exception):
    """A request the server refuses: HTTP status, the field at fault (or None) and a message that teaches."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


@dataclass(frozen=True)
class GenerationRequest:
    """One job's work, checked: `num_images` images, image k drawn with seed `seed + k`."""

    prompt: str
    negative_prompt: str = ""
    # None: the bundle's recommendation (few-step models: their own), else edge's defaults (Bundle.resolve)
    steps: int | None = None
    scheduler: str | None = None  # an edge scheduler name (edge.schedulers)
    guidance: float | None = None
    seed: int = 0  # resolved: never -1 here
    width: int | None = None  # None: the bundle's default size (or the input picture's)
    height: int | None = None
    num_images: int = 1
    bundle: str | None = None  # None: the server's current bundle
    image: Image.Image | None = None  # img2img / inpainting start picture, RGB
    mask: Image.Image | None = None  # L, white = repaint
    strength: float = 0.75
    mask_blur: int = 0
    prompt_syntax: str = "auto"


# ----------------------------------------------------------------------------------------- typed fields


def take(body: dict[str, Any], name: str, kind: type, default: Any = _MISSING, *, nullable: bool = True) -> Any:
    """body[name] if it has the JSON type `kind` (int: a whole number, also 20.0; float: any number; never a
    bool for either), else a 422 naming the field. Absent (or null, where allowed) gives `default`. A number
    sent as a string ("20") is read as A1111's pydantic models read it."""
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable):
        if default is _MISSING:
            raise ApiError(422, f"{name} is required", name)
        return default
    if kind in (int, float) and isinstance(value, str):
        value = _number(value)
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ApiError(422, f"{name} must be {_KIND_WORDS[kind]}, got {_shown(value)}", name)
    return value


def _number(text: str) -> object:
    """"20" -> 20, "7.5" -> 7.5; anything else stays the string (and is refused by the type check)."""
    try:
        return int(text.strip())
    except ValueError:
        try:
            return float(text.strip())
        except ValueError:
            return text


_KIND_WORDS = {int: "a whole number", float: "a finite number", str: "a string", bool: "true or false",
               list: "a list", dict: "an object"}


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def in_range(name: str, value: float, low: float | None = None, high: float | None = None, *,
             above: float | None = None, limit: str | None = None) -> None:
    """A 422 when value is outside [low, high] (or not > above); `limit` names the server flag that sets `high`."""
    if (low is not None and value < low) or (above is not None and value <= above) or (high is not None and value > high):
        bounds = [f">= {low:g}" if low is not None else None, f"> {above:g}" if above is not None else None,
                  f"<= {high:g}" if high is not None else None]
        why = f" (this server's {limit})" if limit and high is not None and value > high else ""
        raise ApiError(422, f"{name} must be {' and '.join(b for b in bounds if b)}, got {value:g}{why}", name)


def check_text(name: str, text: str, limits: Limits) -> str:
    if len(text) > limits.max_prompt_chars:
        raise ApiError(422, f"{name} is {len(text)} characters, more than this server's limit of "
                            f"{limits.max_prompt_chars} (--max-prompt-chars)", name)
    return text


def resolve_seed(seed: int) -> int:
    """-1 (both APIs' "random") becomes a fresh seed, reported back so the image can be made again."""
    if seed == -1:
        return secrets.randbelow(2**32)
    in_range("seed", seed, 0, MAX_SEED)
    return seed


def check_size(width: int | None, height: int | None, limits: Limits) -> None:
    for name, v in (("width", width), ("height", height)):
        if v is not None:
            in_range(name, v, 1, limits.max_side, limit="--max-side")
    if width is not None and height is not None and width * height > limits.max_pixels:
        raise ApiError(422, f"{width}x{height} is {width * height} pixels, more than this server's limit of "
                            f"{limits.max_pixels} (--max-pixels)", "width")


# --------------------------------------------------------------------------------------------- pictures


def decode_picture(name: str, text: str, limits: Limits, field: str | None = None) -> Image.Image:
    """A base64 PNG, JPEG or WebP (optionally as a data URL) as an upright, fully decoded PIL image; a 422
    naming it (`name`, in the request's `field`) for anything else, or for more pixels than --max-pixels (read
    from the header, before decoding)."""
    field = name if field is None else field
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ApiError(422, f"{name}: a data URL must be base64 (data:image/png;base64,...)", field)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{name} is not base64: send the picture's file bytes base64-encoded "
                            "(PNG, JPEG or WebP), optionally as a data URL", field) from None
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        pixels = image.width * image.height
        if pixels > limits.max_pixels or max(image.size) > limits.max_side:
            raise ApiError(422, f"{name} is {image.width}x{image.height}, more than this server takes "
                                f"({limits.max_pixels} pixels, {limits.max_side} per side)", field)
        image.load()
        return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(422, f"{name} cannot be read as a PNG, JPEG or WebP picture ({e})", field) from None


def as_mask(image: Image.Image, invert: bool = False) -> Image.Image:
    """White = repaint. A picture with transparency is read by its alpha (painted = opaque), as A1111 reads
    masks drawn in its canvas; any other is read by its luma."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        mask = alpha if alpha.getextrema() != (255, 255) else image.convert("L")
    else:
        mask = image.convert("L")
    return ImageOps.invert(mask) if invert else mask


def fit_pictures(image: Image.Image, mask: Image.Image | None, width: int | None,
                 height: int | None) -> tuple[Image.Image, Image.Image | None]:
    """The start picture (and its mask) at the requested size, resized as A1111's "Just resize" does; without a
    size they keep theirs. A mask of another size than its picture is resized to it."""
    image = image.convert("RGB")
    size = (width or image.width, height or image.height)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    if mask is not None and mask.size != size:
        mask = mask.resize(size, Image.Resampling.LANCZOS)
    return image, mask


# ------------------------------------------------------------------------------------- the page's /api/jobs


def job_request(body: dict[str, Any], limits: Limits) -> GenerationRequest:
    """POST /api/jobs: the page's fields (see edge/serve/app.py), checked."""
    prompt = check_text("prompt", take(body, "prompt", str), limits)
    negative = check_text("negative_prompt", take(body, "negative_prompt", str, ""), limits)
    steps, guidance = take(body, "steps", int, None), take(body, "guidance", float, None)  # None: the bundle's
    if steps is not None:
        in_range("steps", steps, 1, limits.max_steps, limit="--max-steps")
    if guidance is not None:
        in_range("guidance", guidance, 0.0, 100.0)
    width, height = take(body, "width", int, None), take(body, "height", int, None)
    check_size(width, height, limits)
    syntax = take(body, "prompt_syntax", str, "auto")
    if syntax not in PROMPT_SYNTAXES:
        raise ApiError(422, f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)}, got {syntax!r}",
                       "prompt_syntax")
    image = _picture(body, "image", limits)
    mask = _picture(body, "mask", limits)
    if mask is not None and image is None:
        raise ApiError(422, "mask repaints part of a picture: send the picture as image too", "mask")
    strength = take(body, "strength", float, 0.75)
    in_range("strength", strength, None, 1.0, above=0.0)
    mask_blur = take(body, "mask_blur", int, 0)
    in_range("mask_blur", mask_blur, 0, 64)
    if image is not None:
        image, mask = fit_pictures(image, None if mask is None else as_mask(mask), width, height)
        width = height = None  # the picture's size is the output's
    return GenerationRequest(
        prompt=prompt, negative_prompt=negative, steps=steps, scheduler=take(body, "scheduler", str, None),
        guidance=guidance, seed=resolve_seed(take(body, "seed", int, -1)), width=width, height=height,
        bundle=take(body, "bundle", str, None), image=image, mask=mask, strength=strength, mask_blur=mask_blur,
        prompt_syntax=syntax)


def _picture(body: dict[str, Any], name: str, limits: Limits) -> Image.Image | None:
    text = take(body, name, str, None)
    return None if text in (None, "") else decode_picture(name, text, limits)
