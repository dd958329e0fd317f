"""The bundles a server offers, and the one pipeline it holds: a device's memory is for one model at a time.

Manifests are read at start (a missing or damaged bundle stops the server there, named). Pipelines are loaded
and switched only by the worker thread (edge/serve/jobs.py), between jobs: the previous pipeline is dropped,
collected and its heap returned to the OS (edge.memprobe.release_memory) before the next one is loaded, so the
two never sit in memory together.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge.bundle import MANIFEST, Manifest, read_manifest
from edge.memprobe import release_memory
from edge.serve.config import Limits, ServeConfig
from edge.schedulers import SCHEDULERS
from edge.serve.params import ApiError, GenerationRequest

log = logging.getLogger("edge.serve")
INPAINT_CHANNELS = 9  # a UNet whose sample input takes mask + masked-image latents (edge.stages.inpaint)
SHAPES = ((1, 1), (3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (16, 9))  # width : height presets
SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)  # of the trained pixel count, for square presets


@dataclass(frozen=True)
class Bundle:
    name: str  # the folder's name: what requests and A1111's sd_model_checkpoint say
    path: Path
    manifest: Manifest
    backend: str  # "onnx", "openvino" or "coreml"

    @property
    def inpainting(self) -> bool:
        unet = self.manifest.components.get("unet")
        return bool(unet and unet.inputs and unet.inputs[0].shape[1:2] == (INPAINT_CHANNELS,))

    @property
    def precision(self) -> str:
        unet = self.manifest.components.get("unet")
        return "unknown" if unet is None else unet.precision

    def sizes(self, limits: Limits) -> list[list[int]]:
        """[height, width] presets this bundle accepts within the limits: the trained size first, then
        squares and common aspect ratios at about its pixel count, each a multiple of size_multiple. Core ML
        graphs have fixed shapes: only the trained size."""
        h0, w0 = self.manifest.default_size
        if self.backend == "coreml":
            return [[h0, w0]]
        m, area = self.manifest.size_multiple, h0 * w0
        found = [[h0, w0]]
        for scale in SCALES:
            found.append([_round(math.sqrt(area * scale), m)] * 2)
        for w, h in SHAPES[1:]:
            unit = math.sqrt(area / (w * h))
            found.append([_round(unit * h, m), _round(unit * w, m)])
        ok = [s for s in found if s[0] * s[1] <= limits.max_pixels and max(s) <= limits.max_side]
        return [list(s) for s in dict.fromkeys(map(tuple, ok))]

    def resolve(self, req: GenerationRequest, limits: Limits) -> GenerationRequest:
        """`req` with the steps, guidance and scheduler it left out taken from this bundle (its model's
        recommendation, e.g. SD-Turbo's 1 step without guidance; else edge's defaults; steps at most the server's
        --max-steps), then checked."""
        given = {"steps": req.steps, "guidance": req.guidance, "scheduler": req.scheduler}
        req = replace(req, **self.manifest.generation_defaults(**given))
        if req.steps > limits.max_steps:  # a recommendation over the server's limit: the limit
            req = replace(req, steps=limits.max_steps)
        self.check(req)
        return req

    def check(self, req: GenerationRequest) -> None:
        """What the pipeline would refuse on this bundle, refused before the job is queued (422 naming it)."""
        m = self.manifest
        if req.scheduler not in SCHEDULERS:
            raise ApiError(422, f"unknown scheduler {req.scheduler!r}; known: {', '.join(SCHEDULERS)}", "scheduler")
        size = (req.width, req.height) if req.image is None else req.image.size
        for name, v in zip(("width", "height"), size):
            if v is not None and v % m.size_multiple:
                nearest = max(m.size_multiple, round(v / m.size_multiple) * m.size_multiple)
                what = name if req.image is None else f"the picture's {name}"
                raise ApiError(422, f"{what} {v} is not a multiple of {m.size_multiple}, which bundle {self.name} "
                                    f"needs; nearest: {nearest}", name)
        if self.backend == "coreml" and tuple(s or d for s, d in zip(size, m.default_size[::-1])) != m.default_size[::-1]:
            raise ApiError(422, f"bundle {self.name} runs Core ML graphs of fixed shape: only "
                                f"{m.default_size[1]}x{m.default_size[0]}", "width")
        if req.image is not None and "vae_encoder" not in m.components:
            raise ApiError(422, f"bundle {self.name} has no VAE encoder, which img2img needs; re-convert it", "image")
        if self.inpainting and req.mask is None:
            raise ApiError(422, f"bundle {self.name} has an inpainting UNet: send a picture and a mask", "mask")

    def describe(self, limits: Limits) -> dict[str, Any]:
        m = self.manifest
        return {"name": self.name, "path": str(self.path), "bundle_id": m.bundle_id, "precision": self.precision,
                "default_size": list(m.default_size), "size_multiple": m.size_multiple, "sizes": self.sizes(limits),
                "family": m.family, "inpainting": self.inpainting, "backend": self.backend,
                "defaults": m.generation_defaults()}  # steps, guidance, scheduler where a request gives none


def _round(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def _backend(path: Path, asked: str | None) -> str:
    """Core ML on macOS where the bundle carries its graphs, unless told; onnxruntime elsewhere."""
    if asked is not None:
        return asked
    data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    return "coreml" if sys.platform == "darwin" and "coreml" in data else "onnx"


def embedding_files(folder: Path | None) -> list[Path]:
    return [] if folder is None else sorted(Path(folder).glob("*.safetensors"))


def lora_files(folder: Path | None) -> list[dict]:
    """/sdapi/v1/loras: the LoRAs a prompt can name, as A1111 lists them."""
    return [] if folder is None else [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}}
                                      for p in sorted(Path(folder).glob("*.safetensors"))]


class Bundles:
    def __init__(self, config: ServeConfig):
        if not config.bundles:
            raise ValueError("edge serve needs at least one bundle folder")
        self.config = config
        self.all: dict[str, Bundle] = {}
        for path in config.bundles:
            path = Path(path)
            manifest = read_manifest(path)  # BundleError (a ValueError) names a missing or damaged bundle
            name = path.resolve().name
            if name in self.all:
                raise ValueError(f"two bundles are named {name!r} ({self.all[name].path} and {path}): requests "
                                 "choose bundles by folder name, so rename one folder")
            self.all[name] = Bundle(name, path, manifest, _backend(path, config.backend))
        self.current: str = next(iter(self.all))  # what a request without a bundle gets
        self.loaded: str | None = None
        self._pipe = None

    def find(self, name: str | None) -> Bundle:
        """The bundle a request names (None: the current one); a 404 listing the names otherwise."""
        if name is None:
            return self.all[self.current]
        if name not in self.all:
            raise ApiError(404, f"no bundle named {name!r}; this server has: {', '.join(self.all)}", "bundle")
        return self.all[name]

    def pipeline(self, name: str):
        """The loaded pipeline of bundle `name`, loading it (and unloading any other first). Worker thread only."""
        if self.loaded == name and self._pipe is not None:
            return self._pipe
        self.unload()
        bundle = self.all[name]
        from edge.pipeline import Pipeline

        log.info("loading bundle %s (%s, backend %s)", name, bundle.path, bundle.backend)
        self._pipe = Pipeline.load(bundle.path, threads=self.config.threads, memory_budget=self.config.memory_budget,
                                   backend=bundle.backend, compute_units=self.config.compute_units)
        for path in embedding_files(self.config.embeddings_dir):
            self._pipe.load_embedding(path)
        self.loaded = name
        return self._pipe

    def unload(self) -> None:
        """Drop the pipeline and return its memory before anything else is loaded."""
        if self._pipe is None:
            return
        log.info("unloading bundle %s", self.loaded)
        self._pipe, self.loaded = None, None
        gc.collect()
        release_memory()

    def plan_peak(self) -> int | None:
        """The loaded pipeline's estimated peak for its latest plan (None without a budget: nothing planned)."""
        plan = None if self._pipe is None else self._pipe.plan
        return plan.peak if plan is not None and plan.stages else None
