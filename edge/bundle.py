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
from typing import Any, Iterable

FORMAT_VERSION = 2  # 2: attention, quantization, UNet chunks, memory measurements
MANIFEST = "manifest.json"
# What `edge generate` and the Python API use where neither the user nor the bundle's `recommended` says otherwise
GENERATION_DEFAULTS = {"steps": 20, "guidance": 7.5, "scheduler": "euler"}
# The last two are optional: the VAE decoder cut for tiled decoding (converters/tiled_vae.py). Bundles of
# the first format-2 converters have a "vae_decoder_tiled" that takes latents and no head.
# "tiny_vae_decoder" is the optional tiny autoencoder's decoder (TAESD; converters/tiny_vae.py).
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "vae_decoder_head", "vae_decoder_tiled",
              "tiny_vae_decoder")


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
    fidelity: dict[str, Any] = field(default_factory=dict)  # a stand-in's closeness to what it replaces (tiny VAE)
    deep_cache: dict[str, Any] = field(default_factory=dict)  # {"skip_chunks", "cached"}: the UNet's DeepCache cut
    control_inputs: tuple[dict, ...] = ()  # a UNet converted with ControlNets: its residual inputs (name, channels,
    #                                        stride); a ControlNet's component has "controlnet" {name, source, ...}
    controlnet: dict[str, Any] = field(default_factory=dict)

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
    weight_bytes: int = 0  # its weights (0: not recorded)


@dataclass(frozen=True)
class Manifest:
    format_version: int
    bundle_id: str  # short hash of all component hashes
    family: str  # "sd1" (CLIP text encoder), "sd2" (OpenCLIP, by its activation), "sdxl" (two text encoders) or
    # "sdxl-refiner" (the second only; edge.refiner)
    prediction_type: str  # "epsilon" or "v_prediction"
    # The keys the source model's scheduler_config.json states (older bundles: the source class's whole config,
    # defaults included); every sampler fills in what is absent with its diffusers class's default.
    scheduler: dict[str, Any]
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
    # Every file the bundle ships but the manifest (graphs, tokenizer, Core ML packages), relative -> sha256.
    # Older bundles hashed only their graphs and vocab.json: their map holds those, and hashes_every_file is False.
    files: dict[str, str] = field(default_factory=dict)
    # {"weights": (3, C), "bias": (3,), "psnr_db"}: latents -> RGB for previews (edge.stages.preview); {} if older
    preview: dict[str, Any] = field(default_factory=dict)
    hashes_every_file: bool = True
    # weights.json: where each Linear/Conv weight of the UNet and text encoder is stored (edge.adapters, LoRA at
    # run time); "" in bundles from before it
    weight_map: str = ""
    # SDXL: how the added conditions ride in the UNet's context (converters/sdxl.py: rows, pooled_dim, time_ids,
    # the second tokenizer's pad, force_zeros_for_empty_prompt); {} for SD 1.x/2.x
    conditioning: dict[str, Any] = field(default_factory=dict)
    # the model's own steps / guidance / scheduler (few-step models: Turbo, LCM), and why; {} for older bundles
    recommended: dict[str, Any] = field(default_factory=dict)

    def generation_defaults(self, **given: Any) -> dict[str, Any]:
        """steps, guidance, scheduler (in that order): those `given` that are not None, else the bundle's
        recommendation, else GENERATION_DEFAULTS."""
        return {k: given[k] if given.get(k) is not None else self.recommended.get(k, v)
                for k, v in GENERATION_DEFAULTS.items()}


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
        chunks=tuple(Chunk(c["file"], tuple(t["name"] for t in c["inputs"]), tuple(t["name"] for t in c["outputs"]),
                           int(c.get("weight_bytes", 0))) for c in d.get("chunks", ())),
        memory=dict(d.get("memory", {})),
        attention=dict(d.get("attention", {})),
        quantization=dict(d.get("quantization", {})),
        fidelity=dict(d.get("fidelity", {})),
        deep_cache=_deep_cache(d.get("deep_cache", {})),
        control_inputs=tuple(dict(r) for r in d.get("control_inputs", ())),
        controlnet=dict(d.get("controlnet", {})),
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
            scheduler=dict(d["scheduler"]) if "files" in d else _older_scheduler(d["scheduler"]),
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
            preview=dict(d.get("preview", {})),
            files=_older_files(d) if "files" not in d else _file_map(d["files"], where),
            hashes_every_file="files" in d,
            weight_map=str(d.get("weight_map", "")),
            conditioning=dict(d.get("conditioning", {})),
            recommended=dict(d.get("recommended", {})),
        )
    except (KeyError, TypeError, IndexError) as e:
        raise BundleError(f"{where}: manifest is missing or has a malformed field: {e}") from None


def _file_map(files: Any, where: str) -> dict[str, str]:
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items()):
        raise BundleError(f"{where}: malformed field 'files': expected an object of relative path -> sha256 hex")
    return dict(files)


def _older_scheduler(scheduler: dict[str, Any]) -> dict[str, Any]:
    """Bundles from before the file map recorded the source class's whole config (PNDM's, for SD), which has no
    clip_sample; the runtime then took it as false, where diffusers' DDIM takes true. They keep sampling as
    they did. (New bundles record only what the model states, and each sampler fills in its diffusers default.)"""
    return {"clip_sample": False, **scheduler}


def _deep_cache(d: dict[str, Any]) -> dict[str, Any]:
    """Bundles cut for DeepCache before the deep part could be several chunks name one: `skip_chunk`."""
    d = dict(d)
    if "skip_chunk" in d and "skip_chunks" not in d:
        d["skip_chunks"] = [d["skip_chunk"]]
    return d


def _older_files(d: dict[str, Any]) -> dict[str, str]:
    """What a bundle from before the top-level file map hashed: its graphs (ONNX and Core ML) and vocab.json."""
    sections = [d["components"], d.get("coreml", {}).get("components", {})]
    files = {rel: digest for section in sections for c in section.values() for rel, digest in c["files"].items()}
    tokenizer = d["tokenizer"]
    if "sha256" in tokenizer and "vocab" in tokenizer:
        files[tokenizer["vocab"]] = tokenizer["sha256"]
    return files


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
        _check_file(bundle / rel, expected, component.name)


def verify_paths(bundle: Path, manifest: Manifest, paths: Iterable[str], what: str) -> None:
    """Check files against the manifest before they are read, so a damaged one is named as such instead of
    failing later in a parser. An older bundle's unhashed files (merges.txt) pass unchecked."""
    for rel in paths:
        expected = manifest.files.get(rel)
        if expected is not None:
            _check_file(bundle / rel, expected, what)
        elif manifest.hashes_every_file:
            raise BundleError(f"{what}: {bundle / rel} has no sha256 in the manifest's file list, which should "
                              "name every file of the bundle; re-convert the model")


def verify_tokenizer(bundle: Path, manifest: Manifest) -> None:
    """vocab.json and merges.txt, before the tokenizer reads them."""
    verify_paths(bundle, manifest, (manifest.tokenizer["vocab"], manifest.tokenizer["merges"]), "tokenizer")


def verify_bundle(bundle: Path, manifest: Manifest) -> None:
    """Every file the manifest hashes: a complete, undamaged bundle passes."""
    verify_paths(bundle, manifest, manifest.files, "bundle")


def _check_file(path: Path, expected: str, what: str) -> None:
    if not path.is_file():
        raise BundleError(f"{what}: file {path} named in the manifest is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise BundleError(
            f"{what}: {path} is corrupt or was replaced: sha256 {actual[:12]}… "
            f"does not match the manifest's {expected[:12]}…"
        )


def write_manifest(bundle: Path, data: dict[str, Any]) -> Manifest:
    """Validate by parsing, then write atomically."""
    manifest = parse_manifest(data, str(bundle / MANIFEST))
    tmp = bundle / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, bundle / MANIFEST)
    return manifest
