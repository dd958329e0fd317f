"""A bundle on disk: `manifest.json` plus the graphs and tokenizer files it names.

The manifest is the contract between the converter (host) and the runtime (device). Every field the
runtime reads is mapped here by name; the converter writes it through `write_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2  # 2: attention, quantization, UNet chunks, memory measurements
MANIFEST = "manifest.json"
# The last two are optional: the VAE decoder cut for tiled decoding (converters/tiled_vae.py). Bundles of
# the first format-2 converters have a "vae_decoder_tiled" that takes latents and no head.
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "vae_decoder_head", "vae_decoder_tiled")


class BundleError(ValueError):
    """A bundle that is missing, corrupt, or from a newer converter."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str, ...]  # ints are fixed, strings are named dynamic axes


@dataclass(frozen=True)
class Component:
    name: str  # one of COMPONENTS
    file: str  # the graph, relative to the bundle folder
    files: dict[str, str]  # every file it needs (graph + external data) -> sha256
    bytes: int  # on disk, all files
    precision: str  # "fp32", "fp16", ...
    parameters: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    parity: dict[str, Any]  # max_abs_diff, psnr_db against the torch module
    chunks: tuple["Chunk", ...] = ()  # a split graph's pieces in run order; `file` is then the first one
    memory: dict[str, Any] = field(default_factory=dict)  # measured by edge.memprobe; read by edge.plan
    attention: dict[str, Any] = field(default_factory=dict)  # {"kernel", "chunk"} the graph was exported with
    quantization: dict[str, Any] = field(default_factory=dict)  # what was stored lower, PSNR vs fp32

    @property
    def graphs(self) -> tuple[str, ...]:
        """Graph files in run order: the chunks of a split graph, else the one graph."""
        return tuple(c.file for c in self.chunks) or (self.file,)


@dataclass(frozen=True)
class Chunk:
    """One piece of a split graph: it reads `inputs` (graph inputs or earlier chunks' outputs)."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    format_version: int
    bundle_id: str  # short hash of all component hashes
    family: str  # "sd1" (CLIP text encoder) or "sd2" (OpenCLIP), by the text encoder's activation
    prediction_type: str  # "epsilon" or "v_prediction"
    scheduler: dict[str, Any]  # the source model's scheduler_config.json
    latent_channels: int
    vae_scale_factor: int  # image pixels per latent pixel (8 for SD)
    vae_scaling_factor: float  # latents are multiplied by this after encoding (0.18215 for SD 1.x)
    size_multiple: int  # height and width must be multiples of this (8 x UNet downsampling)
    default_size: tuple[int, int]  # (height, width) the model was trained at
    text_max_length: int  # 77
    pad_token: str  # "<|endoftext|>" for SD 1.x, "!" for SD 2.x
    tokenizer: dict[str, str]  # vocab / merges file names
    components: dict[str, Component]
    source: dict[str, Any]  # where the model came from, for the record


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tensor(d: dict[str, Any]) -> Tensor:
    return Tensor(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


def _component(name: str, d: dict[str, Any]) -> Component:
    return Component(
        name=name,
        file=d["file"],
        files=dict(d["files"]),
        bytes=int(d["bytes"]),
        precision=d["precision"],
        parameters=int(d["parameters"]),
        inputs=tuple(_tensor(t) for t in d["inputs"]),
        outputs=tuple(_tensor(t) for t in d["outputs"]),
        parity=dict(d.get("parity", {})),
        chunks=tuple(Chunk(c["file"], tuple(t["name"] for t in c["inputs"]), tuple(t["name"] for t in c["outputs"]))
                     for c in d.get("chunks", ())),
        memory=dict(d.get("memory", {})),
        attention=dict(d.get("attention", {})),
        quantization=dict(d.get("quantization", {})),
    )


def parse_manifest(d: dict[str, Any], where: str) -> Manifest:
    version = d.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{where}: no integer format_version; is this an edge bundle?")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format version {version} is newer than this runtime reads ({FORMAT_VERSION}); "
            "upgrade edge-diffusion or re-convert the model with this version"
        )
    try:
        return Manifest(
            format_version=version,
            bundle_id=d["bundle_id"],
            family=d["family"],
            prediction_type=d["prediction_type"],
            scheduler=dict(d["scheduler"]),
            latent_channels=int(d["latent_channels"]),
            vae_scale_factor=int(d["vae_scale_factor"]),
            vae_scaling_factor=float(d["vae_scaling_factor"]),
            size_multiple=int(d["size_multiple"]),
            default_size=(int(d["default_size"][0]), int(d["default_size"][1])),
            text_max_length=int(d["text_max_length"]),
            pad_token=d["pad_token"],
            tokenizer=dict(d["tokenizer"]),
            components={k: _component(k, v) for k, v in d["components"].items()},
            source=dict(d.get("source", {})),
        )
    except (KeyError, TypeError, IndexError) as e:
        raise BundleError(f"{where}: manifest is missing or has a malformed field: {e}") from None


def read_manifest(bundle: Path | str) -> Manifest:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"bundle not found: {bundle} is not a folder (make one with `edge convert MODEL -o {bundle}`)")
    if not path.is_file():
        raise BundleError(f"{bundle} is not an edge bundle: it has no {MANIFEST}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    return parse_manifest(data, str(path))


def verify_files(bundle: Path, component: Component) -> None:
    """Check every file of a component against the sha256 the converter recorded."""
    for rel, expected in component.files.items():
        path = bundle / rel
        if not path.is_file():
            raise BundleError(f"{component.name}: file {path} named in the manifest is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{component.name}: {path} is corrupt or was replaced: sha256 {actual[:12]}… "
                f"does not match the manifest's {expected[:12]}…"
            )


def write_manifest(bundle: Path, data: dict[str, Any]) -> Manifest:
    """Validate by parsing, then write atomically."""
    manifest = parse_manifest(data, str(bundle / MANIFEST))
    tmp = bundle / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, bundle / MANIFEST)
    return manifest
