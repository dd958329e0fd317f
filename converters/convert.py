"""`edge convert`: a Stable Diffusion model in, a self-describing ONNX bundle out.

The bundle is assembled in a hidden sibling folder and renamed into place only when every graph has
been exported, checked against torch and hashed, so an interrupted run never leaves a half bundle
under the target name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from edge.bundle import FORMAT_VERSION, Manifest, sha256_file, write_manifest
from edge.converters.onnx_export import ONE_FILE_LIMIT, OPSET, component_specs, export, parity
from edge.converters.sources import Source, open_source
from edge.schedulers import scheduler_config_from_dict

PARITY_MIN_PSNR_DB = 40.0  # a graph below this against torch fails the conversion


class ConvertError(ValueError):
    """The conversion cannot go ahead or produced a graph that does not match torch."""


def convert(
    source: str,
    out: Path | str,
    *,
    config: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    external_data_over: int = ONE_FILE_LIMIT,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Convert `source` into a bundle at `out`; graphs whose weights exceed `external_data_over` bytes keep
    them in a `.data` file beside the graph (ONNX protobufs cannot exceed 2 GiB)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists; choose another -o or pass --overwrite")
    t0 = time.perf_counter()
    src = open_source(source, config=config, allow_pickle=allow_pickle)
    log(f"loaded {source} ({src.kind}) in {time.perf_counter() - t0:.1f}s")

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ".scratch").mkdir(parents=True)
    try:
        data = _build_bundle(src, tmp, external_data_over, log)
        (tmp / ".scratch").rmdir()
        manifest = write_manifest(tmp, data)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return manifest


def _build_bundle(src: Source, tmp: Path, external_data_over: int, log: Callable[[str], None]) -> dict[str, Any]:
    pipe = src.pipe
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size_multiple = vae_scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    m = size_multiple // vae_scale  # latent pixels per UNet-compatible step
    export_hw = (2 * m, 2 * m)  # small example: dynamic axes make the graphs size-independent
    parity_hw = (2 * m, 3 * m)  # checked at another, non-square size
    g = torch.Generator().manual_seed(0)

    components: dict[str, Any] = {}
    for spec in component_specs(pipe):
        t = time.perf_counter()
        files, parameters = export(spec, tmp / f"{spec.name}.onnx", spec.example(g, *export_hw), tmp / ".scratch",
                                   external_data_over)
        check = parity(spec, files[0], spec.example(g, *parity_hw))
        if check["psnr_db"] < PARITY_MIN_PSNR_DB:
            raise ConvertError(
                f"{spec.name}: the ONNX graph does not match torch (PSNR {check['psnr_db']:.1f} dB < "
                f"{PARITY_MIN_PSNR_DB} dB, max-abs-diff {check['max_abs_diff']:.3g})"
            )
        components[spec.name] = {
            "file": files[0].name,
            "files": {f.name: sha256_file(f) for f in files},
            "bytes": sum(f.stat().st_size for f in files),
            "precision": "fp32",
            "parameters": parameters,
            "inputs": spec.inputs,
            "outputs": spec.outputs,
            "parity": check,
        }
        log(f"  {spec.name:<12} {parameters / 1e6:8.2f}M params  PSNR {check['psnr_db']:6.1f} dB  "
            f"max|diff| {check['max_abs_diff']:.2e}  {time.perf_counter() - t:.1f}s")

    tok_dir = _write_tokenizer(pipe.tokenizer, tmp / "tokenizer", tmp / ".scratch")

    scheduler = json.loads(json.dumps(dict(pipe.scheduler.config), default=str))
    try:  # refuse now, not at the first `edge generate`
        scheduler_config_from_dict(scheduler)
    except ValueError as e:
        raise ConvertError(f"the model's scheduler config cannot be sampled by edge: {e}") from None

    hashes = "".join(c["files"][c["file"]] for c in components.values())
    te_cfg = pipe.text_encoder.config
    sample = pipe.unet.config.sample_size
    sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return {
        "format_version": FORMAT_VERSION,
        "bundle_id": hashlib.sha256(hashes.encode()).hexdigest()[:12],
        "family": "sd2" if te_cfg.hidden_act == "gelu" else "sd1",
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "scheduler": scheduler,
        "latent_channels": pipe.vae.config.latent_channels,
        "vae_scale_factor": vae_scale,
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "size_multiple": size_multiple,
        "default_size": [sample[0] * vae_scale, sample[1] * vae_scale],
        "text_max_length": int(pipe.tokenizer.model_max_length),
        "pad_token": str(pipe.tokenizer.pad_token),
        "tokenizer": {
            "vocab": "tokenizer/vocab.json",
            "merges": "tokenizer/merges.txt",
            "sha256": sha256_file(tok_dir / "vocab.json"),
        },
        "components": components,
        "source": {
            "name": src.name,
            "kind": src.kind,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "onnx_opset": OPSET,
        },
    }


def _write_tokenizer(tokenizer, out: Path, scratch: Path) -> Path:
    """vocab.json + merges.txt, whichever way the installed transformers saves a CLIP tokenizer."""
    tokenizer.save_pretrained(str(scratch))
    out.mkdir()
    if (scratch / "vocab.json").is_file() and (scratch / "merges.txt").is_file():
        shutil.copy(scratch / "vocab.json", out / "vocab.json")
        shutil.copy(scratch / "merges.txt", out / "merges.txt")
    elif (scratch / "tokenizer.json").is_file():  # transformers >= 5 writes only tokenizer.json
        model = json.loads((scratch / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
            raise ConvertError(f"the model's tokenizer is a {model.get('type')} model, not CLIP's byte-level BPE")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    else:
        raise ConvertError("the model's tokenizer did not save as vocab.json + merges.txt or tokenizer.json")
    for f in scratch.iterdir():
        f.unlink()
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
