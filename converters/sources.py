"""Open a Stable Diffusion model from whatever the user has: a diffusers folder, a single-file
checkpoint, a Hub id in the local cache, or one of our built-in names. Always offline.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Never touch the network (diffusers otherwise tries the Hub when a single file's configs aren't cached),
# and keep the libraries' notices out of the user's way. Set before huggingface_hub is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
BUILTIN = ("default", "tiny-random")
ASSETS = Path(__file__).parent / "assets"


class SourceError(ValueError):
    """The model source cannot be opened; the message says why and what would work."""


@dataclass
class Source:
    pipe: Any  # diffusers.StableDiffusionPipeline, fp32, eval mode
    kind: str  # "diffusers_folder", "single_file", "hub", "builtin"
    name: str  # what the user passed
    tiny_vae: Path | None = None  # a tiny autoencoder (TAESD) the model ships: the default model's


def open_source(source: str, *, config: str | None = None, allow_pickle: bool = False) -> Source:
    """Load `source` as a float32 diffusers pipeline, offline, with one clear error when it can't be."""
    path = Path(source)
    if source in BUILTIN and not path.exists():
        tiny = ASSETS / "default_model" / "tiny_vae"
        shipped = tiny if source == "default" and (tiny / "config.json").is_file() else None
        return Source(_builtin(source), "builtin", source, tiny_vae=shipped)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SourceError(f"{path} is a folder but not a diffusers model: it has no model_index.json")
        return Source(_from_pretrained(str(path)), "diffusers_folder", source)
    if path.suffix in PICKLE_SUFFIXES and (path.is_file() or allow_pickle):
        if not allow_pickle:
            raise SourceError(
                f"refusing to load {path}: {path.suffix} checkpoints are Python pickles, and unpickling runs "
                "whatever code the file contains. Convert it to .safetensors, or pass --allow-pickle if you trust it."
            )
        return Source(_from_single_file(path, config), "single_file", source)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise SourceError(f"checkpoint not found: {path}")
        return Source(_from_single_file(path, config), "single_file", source)
    if path.exists():
        raise SourceError(
            f"unsupported source {path}: expected a diffusers folder (with model_index.json), "
            "a .safetensors checkpoint, a Hub id such as org/name, or one of: " + ", ".join(BUILTIN)
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return Source(_from_hub_cache(source), "hub", source)
    raise SourceError(
        f"source not found: {source!r} is neither an existing file or folder, a Hub id (org/name), "
        "nor one of: " + ", ".join(BUILTIN)
    )


def _builtin(name: str):
    from edge.converters.tiny import tiny_pipeline

    default_dir = ASSETS / "default_model"
    if name == "default" and (default_dir / "model_index.json").is_file():
        return _from_pretrained(str(default_dir))
    if name == "default":
        print("note: no trained default model is shipped yet; using the tiny SD-architecture model with "
              "RANDOM weights (it draws noise, not pictures)")
    return tiny_pipeline()


def _pipeline_class(where: str):
    """The SDXL pipeline class a folder's model_index.json names (base or refiner), else StableDiffusionPipeline."""
    import diffusers

    index = Path(where) / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError):
        name = ""
    xl = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")  # SDXL base, and its refiner
    return getattr(diffusers, name) if name in xl else diffusers.StableDiffusionPipeline


def _from_pretrained(where: str, **kwargs: Any):
    try:
        pipe = _pipeline_class(where).from_pretrained(
            where, safety_checker=None, requires_safety_checker=False, local_files_only=True, **kwargs,
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"cannot load Stable Diffusion model from {where}: {_first_line(e)}") from None
    return _check_pipe(pipe, where)


def _from_hub_cache(repo_id: str):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise SourceError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({cache}) and edge convert never "
            f"downloads: fetch it on a connected machine (`huggingface-cli download {repo_id}`) "
            "or pass a local diffusers folder or .safetensors file"
        ) from None
    return _from_pretrained(folder)


def _from_single_file(path: Path, config: str | None):
    from diffusers import StableDiffusionPipeline

    if path.suffix == ".safetensors":
        _check_safetensors(path)
    kwargs: dict[str, Any] = {"local_files_only": True, "safety_checker": None, "requires_safety_checker": False}
    if config is not None:
        kwargs["config"] = config
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except Exception as e:  # diffusers raises many types here; all mean "this file can't be read as SD"
        hint = "" if config is not None else (
            " (without --config the model's configs come from the Hugging Face cache; pass --config with a "
            "diffusers folder holding its configs and tokenizer)")
        raise SourceError(f"cannot read {path} as a Stable Diffusion checkpoint: {_first_line(e)}{hint}") from None
    return _check_pipe(pipe, str(path))


def _check_safetensors(path: Path) -> None:
    """Read the header only: is this a readable safetensors file with an SD UNet in the LDM layout?"""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise SourceError(f"cannot read {path}: not a valid safetensors file (truncated or corrupt?): "
                          f"{_first_line(e)}") from None
    # diffusers fills a component whose weights are missing with random values without a word: refuse here.
    for prefix, what in (("model.diffusion_model.", "UNet"), ("first_stage_model.", "VAE"),
                         ("cond_stage_model.", "text encoder")):
        if not any(k.startswith(prefix) for k in keys):
            raise SourceError(
                f"cannot read {path} as a Stable Diffusion checkpoint: it has no {what} weights (none of its "
                f"{len(keys)} tensors is under '{prefix}', as in the original SD layout)"
            )


def text_parts(pipe) -> tuple[Any, Any]:
    """(text encoder, tokenizer): the first of the model's, or its second where it has only that (SDXL's refiner)."""
    if getattr(pipe, "text_encoder", None) is None and getattr(pipe, "text_encoder_2", None) is not None:
        return pipe.text_encoder_2, getattr(pipe, "tokenizer_2", None)
    return getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None)


def _check_pipe(pipe, where: str):
    text_encoder, tokenizer = text_parts(pipe)
    for part, module in (("text_encoder", text_encoder), ("tokenizer", tokenizer), *(
            (p, getattr(pipe, p, None)) for p in ("unet", "vae", "scheduler"))):
        if module is None:
            raise SourceError(f"{where}: the model has no {part}")
    vocab = text_encoder.config.vocab_size
    if len(tokenizer) != vocab:  # e.g. a config folder without tokenizer/ gives a 2-token stand-in
        raise SourceError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the text encoder "
                          f"expects {vocab}; is the tokenizer/ folder missing or from another model?")
    for module in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.unet, pipe.vae):
        if module is not None:
            module.eval().to(torch.float32)
    return pipe


def stated_config(config: Any) -> dict[str, Any]:
    """The keys a diffusers config (e.g. `pipe.scheduler.config`) was given by the model's own json, as JSON
    values. diffusers fills the keys the json lacks with the loading class's defaults and names them in
    `_use_default_values`; recording those would pass the source class's defaults (PNDM's "leading" for SD 1.5)
    to every sampler as if the model had chosen them. Underscore keys are diffusers' metadata."""
    filled = set(config.get("_use_default_values", ()))
    stated = {k: v for k, v in dict(config).items() if k not in filled and not k.startswith("_")}
    return json.loads(json.dumps(stated, default=str))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
