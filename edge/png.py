"""PNG files that remember how they were made."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo


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


def save_png(image: Image.Image, path: Path | str, params: dict[str, Any]) -> Path:
    """Write atomically, with `parameters` (human-readable) and `edge` (exact JSON) text chunks."""
    path = Path(path)
    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("edge", json.dumps(params, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def read_params(path: Path | str) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text["edge"])
