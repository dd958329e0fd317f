"""The outputs folder as a gallery: every image the server makes, written atomically, listed newest first
with the parameters read back from the files themselves (so a restart, or a copied-in image, loses nothing).

Names from requests are checked before any path is made of them: one plain file name (letters, digits, `.`,
`_`, `-`; no separators, no `..`), a PNG, inside the folder after resolving links, and not a link itself.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from edge.png import read_params, save_image
from edge.serve.params import ApiError

log = logging.getLogger("edge.serve")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.png")


@dataclass(frozen=True)
class Entry:
    name: str
    params: dict[str, Any] | None  # None: a PNG in the folder that edge did not write
    created: float  # seconds since the epoch (the file's modification time)

    def as_dict(self) -> dict[str, Any]:
        created = dt.datetime.fromtimestamp(self.created, dt.timezone.utc).isoformat(timespec="seconds")
        return {"name": self.name, "url": f"/api/gallery/{self.name}", "params": self.params,
                "created": created.replace("+00:00", "Z")}


class Gallery:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder.resolve()
        self._params: dict[str, tuple[int, dict[str, Any] | None]] = {}  # name -> (mtime_ns, params)
        self._lock = threading.Lock()

    def save(self, image: Image.Image, params: dict[str, Any], stem: str) -> Entry:
        """Write `stem`.png (unique: the caller's job id and image index are in it) with its parameters."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = self.folder / f"{stamp}-{stem}.png"
        save_image(image, path, params)  # a temporary file renamed into place: never half an image
        return Entry(path.name, params, path.stat().st_mtime)

    def path(self, name: str) -> Path:
        """The file a request names, or a 400/404 that says why not: nothing outside the folder is reachable."""
        if not NAME.fullmatch(name) or ".." in name:
            raise ApiError(400, f"{name!r} is not a gallery image name (a PNG file name in the outputs folder, "
                                "no folders)", "name")
        path = self.folder / name
        if path.is_symlink() or not path.resolve().is_relative_to(self.folder) or not path.is_file():
            raise ApiError(404, f"no image {name!r} in the gallery", "name")
        return path

    def entries(self, offset: int, limit: int) -> tuple[list[Entry], int]:
        """A page of images, newest first, and how many there are in all."""
        files = []
        for path in self.folder.glob("*.png"):
            if NAME.fullmatch(path.name) and not path.is_symlink():
                try:
                    files.append((path.stat().st_mtime_ns, path.name))
                except FileNotFoundError:  # deleted meanwhile
                    continue
        files.sort(reverse=True)
        page = [Entry(name, self._read(name, mtime), mtime / 1e9) for mtime, name in files[offset:offset + limit]]
        return page, len(files)

    def delete(self, name: str) -> None:
        path = self.path(name)
        path.unlink(missing_ok=True)
        with self._lock:
            self._params.pop(name, None)

    def _read(self, name: str, mtime: int) -> dict[str, Any] | None:
        """The file's edge parameters, read once per version of the file."""
        with self._lock:
            cached = self._params.get(name)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            params = read_params(self.folder / name)
        except (ValueError, OSError) as e:  # not written by edge, or damaged: listed without parameters
            log.info("gallery: %s has no edge parameters (%s)", name, e)
            params = None
        with self._lock:
            self._params[name] = (mtime, params)
        return params
