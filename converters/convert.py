"""`edge convert`: a Stable Diffusion model in, a self-describing ONNX bundle out.

The bundle is assembled in a hidden sibling folder and renamed into place only when every graph has
been exported, checked against torch and hashed, so an interrupted run never leaves a half bundle
under the target name; a lock file beside the target keeps two converts from writing the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from edge.bundle import FORMAT_VERSION, MANIFEST, Manifest, sha256_file, write_manifest
from edge.kernels.attention import DEFAULT_CHUNK
from edge.kernels.processor import use_attention
from edge.memory_profile import profile_component, profiled
from edge.converters.onnx_export import ONE_FILE_LIMIT, OPSET, component_specs, export, parity, tiled_vae_specs
from edge.converters.calibrate import calibrate
from edge.converters.preview_fit import fit_preview
from edge.converters.quantize import ACTIVATIONS, PRECISIONS, mixed_precision, psnr_parity
from edge.converters.sources import Source, open_source, stated_config, text_parts
from edge.converters.sdxl import added_widths, conditioning_record, family, is_xl, unused_weights, xl_specs
from edge.converters.pieces import PIECE, merge_pieces, piece_specs
from edge.converters.sdxl import refusal as xl_refusal
from edge.converters.recommended import recommended
from edge.converters.recommended import refusal as unet_refusal
from edge.converters.deep_cache import deep_cache_record, deep_cache_scopes
from edge.converters.controlnet import PREFIX as CONTROLNET
from edge.converters.controlnet import control_inputs, load_name, with_controlnets
from edge.converters.weight_map import LORA_COMPONENTS, WEIGHT_MAP, fuse_loras, locate, match_weights
from edge.converters.tome import MAX_RATIO, RATIO_RULE, install_token_merging, versus_unmerged
from edge.converters.aligned import realign
from edge.converters.placing import ConvertError, exclusive, move_into_place, remove_stale_partials
from edge.converters.split import run_chunks, split_graph
from edge.converters.tiny_vae import NAME as TINY_VAE
from edge.converters.tiny_vae import check_fits, load_tiny_vae, source_info, tiny_vae_spec, versus_full_decoder
from edge.metrics import psnr
from edge.schedulers import scheduler_config_from_dict
from edge.selfcheck import write_check

PARITY_MIN_PSNR_DB = 40.0  # a graph below this against torch fails the conversion
CHUNKS_MIN_PSNR_DB = 60.0  # chained UNet chunks against the whole graph
# Graphs larger than this keep their weights page-aligned in a .data file (converters/aligned.py), which
# onnxruntime maps instead of copying: SD 1.5's int8 text encoder loads at a peak of 385 MB inline (300 MB resident).
MAPPED_OVER = 16 * 2**20
# Lowest PSNR against the fp32 graph before layers are kept at fp32 (mixed precision), by precision.
MIN_PSNR_VS_FP32 = {"fp16": 40.0, "int8": 30.0, "int4": 25.0}
# Which components each precision stores lower; the rest stay fp32. int8/int4 convert MatMul/Gemm
# weights, which the VAE (convolutions) hardly has: it stays fp32 there.
QUANTIZED = {"fp16": ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "vae_decoder_head",
                      "vae_decoder_tiled"),
             "int8": ("text_encoder", "text_encoder_2", "unet"), "int4": ("text_encoder", "text_encoder_2", "unet")}
# int8 with static activations calibrates the UNet's Conv activations, and each ControlNet's, on the UNet's own
# denoising trajectories (converters/calibrate.py). The VAE decoder stays fp32 (see converters/calibrate.py).
TARGETS = ("onnx", "coreml")
# a UNet whose fp32 weights exceed this is exported in pieces of PIECE_MB (SDXL's 10.3 GB: the exporter holds about
# three copies of what it exports, more than a 24 GB machine has)
PIECES_OVER, PIECE_MB = 6e9, 1500.0
ATTENTION_KERNELS = ("original", "sliced", "split_einsum", "fused")


@dataclass(frozen=True)
class Options:
    """What to make of the model, beyond a faithful fp32 export."""

    attention: str = "fused"  # kernels/attention.py: fused, original, sliced, split_einsum (UNet and VAE)
    attention_chunk: int | None = None  # query rows per slice, for "sliced" (None: kernels.attention.DEFAULT_CHUNK)
    precision: str = "fp32"  # fp32, fp16, int8, int4
    quantize_ops: tuple[str, ...] | None = None  # int8/int4 op types (default MatMul, Gemm)
    activations: str = "dynamic"  # int8: "static" calibrates the UNet's Conv activations (QLinearConv)
    min_psnr_db: float | None = None  # vs fp32, below which layers are kept at fp32 (default by precision)
    split_unet: int | None = None  # UNet chunks
    max_chunk_mb: float | None = None  # or: the fewest chunks under this many MB of weights each
    profile_memory: bool = True  # measure every graph for the memory planner
    tiled_vae: bool = True  # also export the VAE decoder with shared GroupNorm statistics, for tiled decoding
    threads: int | None = None  # onnxruntime threads for the memory probes
    targets: tuple[str, ...] = ("onnx",)  # graphs to write: onnx, coreml, or both (converters/coreml)
    coreml: Any = None  # edge.converters.coreml.convert.CoreMLOptions for the coreml target (None: its defaults)
    tiny_vae: str | None = None  # a local diffusers AutoencoderTiny folder (TAESD): previews, --decoder tiny
    deep_cache: bool = False  # cut the UNet where DeepCache skips its deep part (generate --cache-interval N)
    token_merging: float | None = None  # ToMe ratio in (0, 0.75]: merge tokens before highest-resolution attn1
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA file, scale) fused into the weights before export
    controlnets: tuple[str, ...] = ()  # ControlNet folders / files (`SOURCE:NAME`): a graph each, the UNet takes them
    # export the UNet in pieces of at most this many MB of fp32 weights, each its own graph and chunk
    # (converters/pieces.py); None: whole, unless its fp32 weights exceed PIECES_OVER
    unet_pieces_mb: float | None = None

    def __post_init__(self) -> None:
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise ConvertError(f"unknown target {','.join(self.targets)!r}; choose one or both of {TARGETS}")
        if self.attention not in ATTENTION_KERNELS:
            raise ConvertError(f"unknown attention kernel {self.attention!r}; choose one of {ATTENTION_KERNELS}")
        if self.attention == "sliced" and self.attention_chunk is None:
            object.__setattr__(self, "attention_chunk", DEFAULT_CHUNK)  # frozen: set once, here
        if self.attention == "sliced" and self.attention_chunk < 1:
            raise ConvertError(f"--attention-chunk {self.attention_chunk}: expected query rows per slice >= 1")
        if self.attention != "sliced" and self.attention_chunk is not None:
            raise ConvertError(f"--attention-chunk applies to --attention sliced, not {self.attention!r}")
        if self.precision not in PRECISIONS:
            raise ConvertError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.activations not in ACTIVATIONS:
            raise ConvertError(f"unknown activations {self.activations!r}; choose one of {ACTIVATIONS}")
        if self.activations == "static" and self.precision != "int8":
            raise ConvertError(f"--activations static applies to --precision int8, not {self.precision!r}")
        if self.activations == "static" and self.quantize_ops is not None and "Conv" not in self.quantize_ops:
            raise ConvertError(f"--activations static calibrates convolutions; --quantize-ops "
                               f"{','.join(self.quantize_ops)} has no Conv")
        if self.split_unet is not None and self.max_chunk_mb is not None:
            raise ConvertError("give --split-unet N or --max-chunk-mb M, not both")
        if self.deep_cache and self.split_unet is not None and self.split_unet < 3:
            raise ConvertError(f"--split-unet {self.split_unet} with --deep-cache: DeepCache cuts the UNet in 3 "
                               "parts (head, deep part, tail) of its own; expected 3 chunks or more")
        if self.split_unet is not None and self.split_unet < 1:
            raise ConvertError(f"--split-unet {self.split_unet}: expected a number of chunks >= 1")
        if self.max_chunk_mb is not None and self.max_chunk_mb <= 0:
            raise ConvertError(f"--max-chunk-mb {self.max_chunk_mb}: expected a positive size")
        tm = self.token_merging
        if tm is not None and (isinstance(tm, bool) or not isinstance(tm, (int, float)) or not 0 < tm <= MAX_RATIO):
            raise ConvertError(f"--token-merging {tm!r}: expected {RATIO_RULE}")
        if self.controlnets and (self.deep_cache or "coreml" in self.targets):
            raise ConvertError("--controlnet is built for the ONNX target without --deep-cache so far")
        pieces = self.unet_pieces_mb
        if pieces is not None and (isinstance(pieces, bool) or not isinstance(pieces, (int, float)) or pieces <= 0):
            raise ConvertError(f"--unet-pieces-mb {pieces!r}: expected a positive size in MB")
        if pieces is not None and (self.split_unet or self.max_chunk_mb or self.deep_cache or tm is not None or
                                   self.controlnets or self.activations == "static" or "coreml" in self.targets):
            raise ConvertError("--unet-pieces-mb exports the UNet as its own chunks; --split-unet, --max-chunk-mb, "
                               "--deep-cache, --token-merging, --controlnet, --activations static and --target coreml "
                               "are not built for a UNet exported in pieces yet")
        if tm is not None and "coreml" in self.targets:
            raise ConvertError("--token-merging is made into the ONNX UNet; the Core ML target does not take it")


def convert(
    source: str,
    out: Path | str,
    *,
    config: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    external_data_over: int = ONE_FILE_LIMIT,
    options: Options = Options(),
    score: bool = False,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Convert `source` into a bundle at `out`; graphs whose weights exceed `external_data_over` bytes keep
    them in a `.data` file beside the graph (ONNX protobufs cannot exceed 2 GiB). `options` picks the attention
    kernel, precision and UNet split; `score` runs the default model's fidelity evaluation on the result and
    records it in the manifest (meaningful for models trained on edge.eval's scenes)."""
    out = Path(out)
    with exclusive(out):  # to the final rename: a second convert to `out` stops here, and nothing is lost
        if out.exists() and not overwrite:
            raise ConvertError(f"{out} already exists; choose another -o or pass --overwrite")
        t0 = time.perf_counter()
        src = open_source(source, config=config, allow_pickle=allow_pickle)
        log(f"loaded {source} ({src.kind}) in {time.perf_counter() - t0:.1f}s")
        why = unet_refusal(src.pipe, options) or (xl_refusal(src.pipe, options) if is_xl(src.pipe) else None)
        if why:
            raise ConvertError(why)

        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        remove_stale_partials(out)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / ".scratch").mkdir(parents=True)
        try:
            data = _build_bundle(src, tmp, external_data_over, options, log)
            if "coreml" in options.targets:
                from edge.converters.coreml.convert import CoreMLOptions, add_coreml

                coreml = CoreMLOptions() if options.coreml is None else options.coreml
                data = add_coreml(src.pipe, tmp, data, coreml, log)
            shutil.rmtree(tmp / ".scratch")
            data["files"] = _hash_every_file(tmp, data)
            manifest = write_manifest(tmp, data)
            if score:
                data["fidelity"] = _score(tmp, log)
                manifest = write_manifest(tmp, data)
            move_into_place(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return manifest


def _build_bundle(src: Source, tmp: Path, external_data_over: int, options: Options,
                  log: Callable[[str], None]) -> dict[str, Any]:
    pipe = src.pipe
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size_multiple = vae_scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    m = size_multiple // vae_scale  # latent pixels per UNet-compatible step
    export_hw = (2 * m, 2 * m)  # small example: dynamic axes make the graphs size-independent
    parity_hw = (2 * m, 3 * m)  # checked at another, non-square size
    g = torch.Generator().manual_seed(0)
    attention = {"kernel": options.attention, "chunk": options.attention_chunk}
    sample = pipe.unet.config.sample_size
    default_image = tuple(d * vae_scale for d in ((sample, sample) if isinstance(sample, int) else sample))

    components: dict[str, Any] = {}
    loras = fuse_loras(pipe, list(options.loras), log) if options.loras else []
    weight_map: dict[str, dict] = {}  # component -> where each Linear/Conv weight is (runtime LoRA)
    tiny = _tiny_vae(src, options)
    xl = is_xl(pipe)  # two text encoders, the added conditions riding in the context (converters/sdxl.py)
    specs = (xl_specs(pipe) if xl else component_specs(pipe)) + (tiled_vae_specs(pipe) if options.tiled_vae else [])
    specs += [] if tiny is None else [tiny_vae_spec(tiny[1])]
    specs = specs if "onnx" in options.targets else []  # a Core ML-only bundle: metadata and tokenizer here
    specs, controls = with_controlnets(specs, pipe.unet, options.controlnets, vae_scale)
    specs, unet_spec = _in_pieces(specs, pipe, options, [export_hw, parity_hw], xl, log)
    calibrations: dict[str, tuple] = {}  # static int8: per graph, (calibration feeds, held-out feed)
    for spec in specs:
        t = time.perf_counter()
        path = tmp / f"{spec.name}.onnx"
        model = _attention_model(pipe, spec)
        tome = None
        if spec.name == "unet" and options.token_merging is not None:  # exported and checked with it installed
            tome = install_token_merging(pipe.unet, options.token_merging)
        if model is not None:
            default_processors = model.attn_processors
            use_attention(model, options.attention, options.attention_chunk)
        files, parameters = export(spec, path, spec.example(g, *export_hw), tmp / ".scratch", external_data_over)
        if model is not None:
            model.set_attn_processor(default_processors)  # parity against diffusers' own attention
        parity_inputs = spec.example(g, *parity_hw)
        check = parity(spec, files[0], parity_inputs)
        if check["psnr_db"] < PARITY_MIN_PSNR_DB:
            raise ConvertError(
                f"{spec.name}: the ONNX graph does not match torch (PSNR {check['psnr_db']:.1f} dB < "
                f"{PARITY_MIN_PSNR_DB} dB, max-abs-diff {check['max_abs_diff']:.3g})"
            )
        merging = {} if tome is None else {"token_merging": versus_unmerged(spec.module, parity_inputs, tome)}
        if tome is not None:
            check["reference"] = "torch fp32 with the same token merging"
            log(f"  {spec.name:<12} token merging {tome.ratio:g} in {len(tome.blocks)} blocks: "
                f"{merging['token_merging']['psnr_vs_unmerged_db']:.1f} dB vs the unmerged UNet")
        feeds = {i["name"]: x.numpy() for i, x in zip(spec.inputs, parity_inputs)}
        matched = match_weights(getattr(pipe, spec.name), files[0]) if spec.name in LORA_COMPONENTS else None
        if spec.name == "unet" and "coreml" not in options.targets:
            pipe.unet.to("meta")  # exported and checked: free its weights (3.4 GB for SD 1.5) before quantizing
        if spec.name.startswith(PIECE):
            spec.module.to("meta")  # this piece's weights: the next piece is exported without them
        record: dict[str, Any] = {"precision": "fp32", "quantization": {}}
        lowered = QUANTIZED.get(options.precision, ())  # a ControlNet, a UNet piece, is stored as its UNet is
        if spec.name in lowered or (spec.name.startswith((CONTROLNET, PIECE)) and "unet" in lowered):
            calibration, check_feeds = None, feeds
            if options.activations == "static" and spec.name == "unet":  # the ControlNets' too, on its trajectories
                t_cal = time.perf_counter()
                calibrations = calibrate(pipe, path, controls=controls, threads=options.threads)
                log(f"  {spec.name:<12} {len(calibrations['unet'][0])} calibration inputs and 1 held-out "
                    f"trajectory from the fp32 graph's own denoising  {time.perf_counter() - t_cal:.1f}s")
            if options.activations == "static" and spec.name in calibrations:
                calibration, check_feeds = calibrations[spec.name]
            record = _lower_precision(path, check_feeds, options, external_data_over, tmp / ".scratch", log,
                                      calibration)
            files = [tmp / f for f in record["quantization"]["files"]]
        chunks = None
        if spec.name == "unet" and (options.split_unet or options.max_chunk_mb or options.deep_cache):
            at = deep_cache_scopes(pipe.unet.config) if options.deep_cache else None
            chunks, files = _split(path, feeds, options, at)
            record["split"] = {"chunks": len(chunks), "psnr_vs_whole_db": chunks[0].pop("psnr_vs_whole_db")}
            parts = [c.pop("part") for c in chunks]
            if at is not None:
                record["deep_cache"] = deep_cache_record(chunks, parts, at)
        elif sum(f.stat().st_size for f in files) > min(external_data_over, MAPPED_OVER):
            files = realign(files)  # weights page-aligned in a .data file: onnxruntime maps them (no copy)
        if matched is not None:
            weight_map[spec.name] = locate(matched, [tmp / c["file"] for c in chunks] if chunks else files[:1])
            weight_map[spec.name] |= unused_weights(pipe).get(spec.name, {}) if xl else {}
        components[spec.name] = {
            "file": files[0].name,
            "files": {f.name: sha256_file(f) for f in files},
            "bytes": sum(f.stat().st_size for f in files),
            "parameters": parameters,
            "inputs": spec.inputs,
            "outputs": spec.outputs,
            "parity": check,
            "attention": {**attention, **merging} if model is not None else {},
            **record,
            **({"chunks": chunks} if chunks else {}),
            **(_tiny_record(tiny, pipe.vae, default_image) if spec.name == TINY_VAE else {}),
            **(_control_record(spec, options.controlnets) if controls and spec.name.startswith(CONTROLNET) else {}),
            **({"control_inputs": control_inputs(pipe.unet.config)} if controls and spec.name == "unet" else {}),
        }
        extra = record["quantization"].get("psnr_vs_fp32_db")
        log(f"  {spec.name:<12} {parameters / 1e6:8.2f}M params  PSNR {check['psnr_db']:6.1f} dB  "
            f"max|diff| {check['max_abs_diff']:.2e}"
            + (f"  {record['precision']} {extra:.1f} dB vs fp32" if extra is not None else "")
            + (f"  {len(chunks)} chunks" if chunks else "") + f"  {time.perf_counter() - t:.1f}s")

    components = merge_pieces(components, unet_spec) if unet_spec is not None else components
    if options.profile_memory and components:
        sample = pipe.unet.config.sample_size
        latent_hw = (sample, sample) if isinstance(sample, int) else tuple(sample)
        for name in profiled(components):
            components[name]["memory"] = profile_component(tmp, {"name": name, **components[name]}, latent_hw,
                                                           m, options.threads, log, scale=vae_scale)

    text_encoder, tokenizer = text_parts(pipe)  # an SDXL refiner has only the second of each
    tok_dir = _write_tokenizer(tokenizer, tmp / "tokenizer", tmp / ".scratch")
    if weight_map:
        (tmp / WEIGHT_MAP).write_text(json.dumps(weight_map, indent=1) + "\n", encoding="utf-8")

    scheduler = stated_config(pipe.scheduler.config)  # what the model states; each sampler fills in the rest
    try:  # refuse now, not at the first `edge generate`
        scheduler_config_from_dict(scheduler)
    except ValueError as e:
        raise ConvertError(f"the model's scheduler config cannot be sampled by edge: {e}") from None

    hashes = "".join(c["files"][c["file"]] for c in components.values())
    sample = pipe.unet.config.sample_size
    sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return {
        "format_version": FORMAT_VERSION,
        "bundle_id": hashlib.sha256(hashes.encode()).hexdigest()[:12],
        "family": family(pipe) if xl else "sd2" if text_encoder.config.hidden_act == "gelu" else "sd1",
        **({"conditioning": conditioning_record(pipe)} if xl else {}),
        "recommended": recommended(pipe, dict(pipe.scheduler.config)),
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "scheduler": scheduler,
        "latent_channels": pipe.vae.config.latent_channels,
        "vae_scale_factor": vae_scale,
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "size_multiple": size_multiple,
        "default_size": [sample[0] * vae_scale, sample[1] * vae_scale],
        "text_max_length": int(tokenizer.model_max_length),
        "pad_token": str(tokenizer.pad_token),
        "tokenizer": {
            "vocab": "tokenizer/vocab.json",
            "merges": "tokenizer/merges.txt",
            "sha256": sha256_file(tok_dir / "vocab.json"),
        },
        "components": components,
        **({"weight_map": WEIGHT_MAP} if weight_map else {}),
        # the latent -> colour map does not depend on the size: fitted at 512 px at most (SDXL's 1024 px pictures
        # through the torch encoder took minutes)
        "preview": fit_preview(pipe.vae, tuple(min(512, s * vae_scale) for s in sample), vae_scale),
        "source": {
            "name": src.name,
            "kind": src.kind,
            "scheduler_class": pipe.scheduler.config.get("_class_name", type(pipe.scheduler).__name__),
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "onnx_opset": OPSET,
            **({"loras": loras} if loras else {}),
        },
    }


def _control_record(spec, sources: tuple[str, ...]) -> dict[str, Any]:
    name = spec.name.removeprefix(CONTROLNET)
    source = next(s for s in sources if load_name(s) == name)
    return {"controlnet": {"name": name, "source": source, "residuals": [t["name"] for t in spec.outputs]}}


def _tiny_vae(src: Source, options: Options) -> tuple[str, Any] | None:
    """(folder, AutoencoderTiny) to add as the tiny decoder: --tiny-vae, else one the source ships (the default
    model's), else none."""
    folder = options.tiny_vae if options.tiny_vae is not None else src.tiny_vae
    if folder is None:
        return None
    tiny = load_tiny_vae(folder)
    check_fits(tiny, src.pipe.vae)
    return str(folder), tiny


def _tiny_record(tiny: tuple[str, Any], vae, image: tuple[int, int]) -> dict[str, Any]:
    """What the manifest says of the tiny decoder besides its parity: where it came from, and how close it comes
    to the full VAE decoder at the model's default size."""
    folder, model = tiny
    return {"source": source_info(folder, model), "fidelity": versus_full_decoder(model, vae, image)}


def _attention_model(pipe, spec):
    """The diffusers model whose attention layers a component's graph contains (the VAE has one mid-block
    attention), or None (the text encoder's causal CLIP attention is transformers', and short)."""
    name = spec.name
    if name == "unet" or name.startswith(PIECE):
        return pipe.unet
    if name.startswith(CONTROLNET):
        return spec.module.controlnet
    if name.startswith("vae") and any(True for _ in _attention_layers(pipe.vae)):
        return pipe.vae
    return None


def _attention_layers(model):
    from diffusers.models.attention_processor import Attention

    return (m for m in model.modules() if isinstance(m, Attention))


def _in_pieces(specs: list, pipe, options: Options, sizes: list[tuple[int, int]], xl: bool,
               log: Callable[[str], None]) -> tuple[list, Any]:
    """The specs with the UNet's replaced by its pieces, exported first (so that each piece's weights are freed
    before the text encoders are exported), and the whole UNet's spec; or the specs as given and None."""
    whole = 4 * sum(p.numel() for p in pipe.unet.parameters())
    mb = options.unet_pieces_mb if options.unet_pieces_mb is not None else (
        PIECE_MB if whole > PIECES_OVER and not (options.split_unet or options.max_chunk_mb) else None)
    unet = next((s for s in specs if s.name == "unet"), None)
    if mb is None or unet is None:
        return specs, None
    pieces = piece_specs(unet, pipe.unet, added_widths(pipe) if xl else None, int(mb * 1e6), sizes)
    log(f"  unet         {whole / 1e9:.1f} GB of fp32 weights: exported in {len(pieces)} pieces of <= {mb:g} MB")
    return pieces + [s for s in specs if s.name != "unet"], unet


def _lower_precision(path: Path, feeds: dict, options: Options, external_data_over: int, scratch: Path,
                     log: Callable[[str], None], calibration: list[dict] | None = None) -> dict[str, Any]:
    """Replace the fp32 graph at `path` by its `options.precision` copy; keep layers at fp32 if needed.
    With `calibration` (int8, static activations) the Conv activation ranges are measured once on it."""
    fp32 = scratch / path.name
    for f in [path, path.with_name(path.name + ".data")]:
        if f.exists():
            os.replace(f, scratch / f.name)
    min_psnr = options.min_psnr_db if options.min_psnr_db is not None else MIN_PSNR_VS_FP32[options.precision]
    kwargs = {"external_data_over": external_data_over}
    if options.quantize_ops and options.precision in ("int8", "int4"):
        kwargs["ops"] = options.quantize_ops
    if calibration:
        kwargs.update(activations="static", calibration=calibration,
                      calibration_cache=scratch / f"{path.stem}.calibration.json")
    parity = psnr_parity(fp32, feeds)
    result = mixed_precision(fp32, path, options.precision, parity, min_psnr, log=log, **kwargs)
    report = result["quantize"]
    check = write_check(path.parent, path.stem, feeds, parity.expected, fp32)
    for f in scratch.iterdir():
        f.unlink()
    return {
        "precision": options.precision if not result["kept_groups"] else f"{options.precision}+fp32",
        "quantization": {
            "precision": options.precision,
            "psnr_vs_fp32_db": round(result["psnr_db"], 2),
            # static int8 is checked where its scales were fitted: on a held-out trajectory, not random inputs
            "psnr_inputs": "held-out denoising trajectory" if calibration else "random",
            "psnr_all_quantized_db": round(result["psnr_all_quantized_db"], 2),
            "min_psnr_db": min_psnr,
            "kept_fp32_groups": result["kept_groups"],  # mixed precision: the most sensitive layers
            "kept_fp32_nodes": len(result["kept_fp32"]),
            "check": check,  # the PSNR inputs and fp32 outputs: `edge check` re-measures on the device
            **{k: report[k] for k in ("ops", "weight_type", "activations", "calibration_samples", "boundary_fp32",
                                      "block_size", "nodes_converted", "bytes_before", "bytes_after", "files")
               if k in report},
        },
    }


def _split(path: Path, feeds: dict, options: Options,
           at: list[str] | None = None) -> tuple[list[dict], list[Path]]:
    """Cut the UNet graph at `path` into chunks beside it (at the scopes `at`, or balanced by weight), check the
    chain against it, drop the whole graph. Every chunk's weights are page-aligned in its own .data file."""
    max_bytes = None if options.max_chunk_mb is None else int(options.max_chunk_mb * 1e6)
    chunks = split_graph(path, path.parent, n=options.split_unet, max_chunk_bytes=max_bytes,
                         at=at, prefix="unet")
    from edge.sessions import open_session

    whole = open_session(path).run(None, feeds)[0]
    chained = run_chunks(chunks, feeds, path.parent)["noise_pred"]
    db = psnr(whole, chained)
    if db < CHUNKS_MIN_PSNR_DB:
        raise ConvertError(f"unet: the {len(chunks)} chained chunks do not match the whole graph "
                           f"(PSNR {db:.1f} dB < {CHUNKS_MIN_PSNR_DB} dB)")
    for f in [path, path.with_name(path.name + ".data")]:
        f.unlink(missing_ok=True)
    files = [path.parent / f for c in chunks for f in c["files"]]
    chunks[0]["psnr_vs_whole_db"] = round(db, 2)
    return chunks, files


def _score(bundle: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The default model's fidelity yardstick (edge.eval) on the finished bundle."""
    from edge.eval.fidelity import evaluate_bundle

    t = time.perf_counter()
    report = evaluate_bundle(bundle, scheduler="euler", guidance=5.0, steps=25)
    log(f"  fidelity: all-correct {100 * report['all']['all']:.1f}%, held-out {100 * report['held_out']['all']:.1f}% "
        f"({time.perf_counter() - t:.0f}s)")
    return {k: report[k] for k in ("steps", "guidance", "scheduler", "seed", "prompts", "all", "held_out", "seen",
                                   "two_object") if k in report}


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


def _hash_every_file(bundle: Path, data: dict[str, Any]) -> dict[str, str]:
    """sha256 of every file the bundle ships but the manifest, for the runtime to check before it reads any
    (tokenizer files and Core ML packages as well as graphs). Graphs hashed on export are not read again."""
    sections = [data["components"], data.get("coreml", {}).get("components", {})]
    known = {rel: digest for section in sections for c in section.values() for rel, digest in c["files"].items()}
    files = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle).as_posix()
        if rel not in (MANIFEST, MANIFEST + ".tmp"):
            files[rel] = known[rel] if rel in known else sha256_file(path)
    return files


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
