"""Image files (PNG, JPEG, WebP) that remember how they were made.

Every file carries the parameters twice: the A1111 `parameters` line most tools read (a PNG text chunk; in
JPEG and WebP an EXIF UserComment, "UNICODE\\0" + UTF-16BE, as A1111 writes it with piexif) and the exact
parameters as JSON (a PNG `edge` text chunk; in JPEG and WebP an `edge:params` XMP property).
"""

from __future__ import annotations

import json
import os
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from xml.sax.saxutils import quoteattr

import PIL
from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from edge.validate import whole_number

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # extension -> Pillow format
DEFAULT_QUALITY = 95  # JPEG/WebP: well above Pillow's 75, where a diffusion model's fine texture blurs
_XMP_NS = "urn:edge-diffusion:xmp:1"
_UNICODE = b"UNICODE\0"  # EXIF UserComment character code (the 8-byte prefix), then UTF-16BE as piexif writes


def parameters_text(p: dict[str, Any]) -> str:
    """The A1111-style `parameters` line many image viewers and tools already read."""
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    lines.append(
        f"Steps: {p['steps']}, Sampler: {p['scheduler']}, CFG scale: {p['guidance']}, Seed: {p['seed']}, "
        f"Size: {p['width']}x{p['height']}, Model hash: {p['bundle_id']}"
    )
    return "\n".join(lines)


def image_format(path: Path | str) -> str:
    """The Pillow format a path's extension names; a ValueError naming it and the accepted ones otherwise."""
    ext = Path(path).suffix
    if ext.lower() not in FORMATS:
        shown = f"extension {ext!r}" if ext else "no extension"
        raise ValueError(f"cannot write an image to {str(path)!r}: {shown}; use one of {', '.join(FORMATS)}")
    if FORMATS[ext.lower()] == "JPEG" and int(PIL.__version__.split(".")[0]) < 11:
        raise ValueError(f"writing {ext} with its parameters needs Pillow >= 11 (JPEG XMP), found {PIL.__version__}")
    return FORMATS[ext.lower()]


def check_output_path(path: Path | str) -> Path:
    """Refuse, before a generation is spent on it, a path whose format is unknown or that is a folder."""
    path = Path(path)
    image_format(path)
    if path.is_dir():
        raise ValueError(f"cannot write an image to {str(path)!r}: it is a folder; give a file name")
    return path


def save_image(image: Image.Image, path: Path | str, params: dict[str, Any], quality: int = DEFAULT_QUALITY) -> Path:
    """Write in the format the extension names, with the parameters in its metadata, atomically (a temporary
    file in the same folder, renamed into place: a reader never sees half an image, an interrupted run leaves
    the old file). `quality` (1-100) applies to JPEG and WebP; WebP at 100 is lossless."""
    path, quality = check_output_path(path), whole_number("quality", quality, minimum=1, maximum=100)
    fmt, text, exact = image_format(path), parameters_text(params), json.dumps(params, sort_keys=True)
    if fmt == "PNG":
        info = PngInfo()
        info.add_text("parameters", text)
        info.add_text("edge", exact)
        options: dict[str, Any] = {"pnginfo": info}
    else:
        exif = Image.Exif()
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _UNICODE + text.encode("utf-16-be")
        options = {"exif": exif, "xmp": _xmp(exact), "quality": quality}
        if fmt == "WEBP" and quality >= 100:
            options["lossless"] = True
        if fmt == "JPEG" and quality >= 90:  # full-resolution colour: 4:2:0 caps a tiny model's output at 24 dB
            options["subsampling"] = "4:4:4"
        if fmt == "JPEG" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")  # JPEG has no alpha

    def check(tmp: Path) -> None:  # loud, not a file that silently lost its parameters (e.g. an old Pillow)
        if read_params(tmp) != json.loads(exact) or read_parameters_text(tmp) != text:
            raise OSError(f"{path}: the parameters did not survive writing {fmt} with Pillow {PIL.__version__}")

    def write(f: IO[bytes]) -> None:
        try:
            image.save(f, format=fmt, **options)
        except ValueError as e:  # Pillow: "EXIF data is too long" (JPEG keeps metadata in 64 KB segments)
            if fmt != "JPEG":
                raise
            raise ValueError(f"cannot write {path}: {e} ({len(text)} characters of parameters); "
                             "PNG and WebP have no such limit") from None

    _write_atomically(path, write, check)
    return path


def save_png(image: Image.Image, path: Path | str, params: dict[str, Any]) -> Path:
    """The old name of `save_image`, kept for callers; it writes what the extension names, as that does."""
    return save_image(image, path, params)


def read_params(path: Path | str) -> dict[str, Any]:
    """The exact parameters an edge image was made with, from a PNG, JPEG or WebP file edge wrote."""
    with Image.open(path) as im:
        exact = im.text.get("edge") if im.format == "PNG" else _xmp_params(im.info.get("xmp"))
    if exact is None:
        raise ValueError(f"{path} carries no edge parameters (not written by edge, or its metadata was stripped)")
    return json.loads(exact)


def read_parameters_text(path: Path | str) -> str | None:
    """The A1111 `parameters` line of a PNG, JPEG or WebP file, where tools read it; None if there is none."""
    with Image.open(path) as im:
        if im.format == "PNG":
            return im.text.get("parameters")
        comment = im.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if not isinstance(comment, bytes):
        return comment
    if comment.startswith(_UNICODE):
        return comment[len(_UNICODE):].decode("utf-16-be", errors="replace")
    return comment[8:].decode("utf-8", errors="replace").rstrip("\0")  # ASCII or undefined character code


def _write_atomically(path: Path, write: Callable[[IO[bytes]], None], check: Callable[[Path], None]) -> None:
    """Write through a uniquely named temporary file beside `path`, check it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")  # unique: parallel runs
    try:
        with open(tmp, "xb") as f:  # created with the umask's permissions, as a plain save would be
            write(f)
            f.flush()
            os.fsync(f.fileno())
        check(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _xmp(exact: str) -> bytes:
    """An XMP packet whose one property, edge:params, holds the exact parameters as JSON."""
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:edge="{_XMP_NS}" edge:params={quoteattr(exact)}/>'
            '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


def _xmp_params(xmp: bytes | str | None) -> str | None:
    if not xmp:
        return None
    try:
        root = ET.fromstring(xmp)
    except ET.ParseError:
        return None
    for description in root.iter("{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description"):
        if f"{{{_XMP_NS}}}params" in description.attrib:
            return description.attrib[f"{{{_XMP_NS}}}params"]
    return None
