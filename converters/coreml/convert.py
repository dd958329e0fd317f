"""`edge convert --target coreml`: the bundle's `coreml/` folder, with Apple's names, and its manifest section.

Every graph goes: rewrite parity (torch, ANE modules vs diffusers, >= 60 dB) -> compute precision (fp16
unless measured below 35 dB, then fp32) -> trace -> coremltools ML program -> optional compression
(torch-side PSNR of the decompressed weights) -> save under a temporary name, renamed when written ->
Core ML parity vs torch where Core ML runs (macOS; >= 35 dB). The UNet is cut into chunks whose weight
files each stay under a size limit (1 GB by default): Apple's Neural Engine deployment on iOS/iPadOS needs
UNet models under about 1 GB of weights each (ml-stable-diffusion's --chunk-unet).
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from edge.bundle import sha256_file
from edge.converters.coreml import compress as cmp
from edge.converters.coreml.ane import ATTENTION
from edge.converters.coreml.components import APPLE_NAMES, UNET_BATCH, Graph, graphs
from edge.converters.coreml.unet import make_chunks, plan_chunks
from edge.metrics import max_abs_diff, psnr

DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
PRECISIONS = ("auto", "fp16", "fp32")
REWRITE_MIN_PSNR_DB = 60.0  # ANE modules vs diffusers, fp32 torch
FP16_MIN_PSNR_DB = 35.0  # fp16 compute vs fp32 below this: the graph computes in fp32 (Apple's floor too)
COREML_MIN_PSNR_DB = 35.0  # Core ML output vs torch, where Core ML runs
CHUNK_LIMIT_MB = 1000.0  # default UNet chunk weight limit
COMPRESSION_WARN_PSNR_DB = 30.0  # compressed weights' torch-side output PSNR below this is reported


class CoreMLError(ValueError):
    """The Core ML conversion cannot go ahead, or produced a graph that does not match torch."""


@dataclass(frozen=True)
class CoreMLOptions:
    """What the Core ML graphs should be, beyond a faithful conversion."""

    deployment_target: str = "iOS17"  # minimum OS: iOS16/17/18, macOS13/14/15 (iOS18/macOS15: finer compression)
    compression: str | None = None  # None, int8, palettize6, palettize4
    split_unet: int | None = None  # UNet chunks; default: the fewest under max_chunk_mb each
    max_chunk_mb: float | None = None  # weight limit per UNet chunk (default 1000 MB)
    compute_precision: str = "auto"  # auto (fp16, fp32 where fp16 measures below 35 dB), fp16, fp32
    compile: bool = False  # also write .mlmodelc with xcrun coremlcompiler (macOS only)
    attention: str = "split_einsum"  # split_einsum (Neural Engine) or original (GPU): ane.ATTENTION

    def __post_init__(self) -> None:
        if self.deployment_target not in DEPLOYMENT_TARGETS:
            raise CoreMLError(f"unknown deployment target {self.deployment_target!r}; choose one of {DEPLOYMENT_TARGETS}")
        if self.compression is not None and self.compression not in cmp.COMPRESSIONS:
            raise CoreMLError(f"unknown Core ML compression {self.compression!r}; choose one of {cmp.COMPRESSIONS}")
        if self.compute_precision not in PRECISIONS:
            raise CoreMLError(f"unknown compute precision {self.compute_precision!r}; choose one of {PRECISIONS}")
        if self.split_unet is not None and self.max_chunk_mb is not None:
            raise CoreMLError("give --split-unet N or --max-chunk-mb M, not both")
        if self.split_unet is not None and self.split_unet < 1:
            raise CoreMLError(f"--split-unet {self.split_unet}: expected a number of chunks >= 1")
        if self.max_chunk_mb is not None and self.max_chunk_mb <= 0:
            raise CoreMLError(f"--max-chunk-mb {self.max_chunk_mb}: expected a positive size")
        if self.attention not in ATTENTION:
            raise CoreMLError(f"Core ML attention {self.attention!r}: choose split_einsum (Neural Engine) or "
                              f"original (GPU)")
        if self.compile:
            compiler()  # refuse now, before an hour of conversion


def compiler() -> list[str]:
    """The command that compiles .mlpackage -> .mlmodelc; one clear error where there is none."""
    if platform.system() != "Darwin" or shutil.which("xcrun") is None:
        raise CoreMLError(f"--compile needs Xcode's coremlcompiler (xcrun), which exists on macOS only; this is "
                          f"{platform.system()}. Convert without --compile and compile on a Mac, or let Core ML "
                          "compile the .mlpackage at first load")
    return ["xcrun", "coremlcompiler", "compile"]


def can_run_coreml() -> bool:
    return platform.system() == "Darwin"


def add_coreml(pipe, bundle: Path, data: dict[str, Any], options: CoreMLOptions,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """The bundle's manifest data with a `coreml` section, its graphs written under `bundle`/coreml/."""
    import hashlib

    section = build_coreml(pipe, bundle, options, log)
    hashes = "".join(c["files"][c["file"]] for c in data["components"].values())
    hashes += "".join(sha256 for c in section["components"].values() for sha256 in c["files"].values())
    return {**data, "bundle_id": hashlib.sha256(hashes.encode()).hexdigest()[:12], "coreml": section}


def build_coreml(pipe, bundle: Path, options: CoreMLOptions, log: Callable[[str], None] = print,
                 only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Write `bundle`/coreml/ from a diffusers pipeline; return the manifest's `coreml` section.
    `only` names the graphs to make (default all four; benchmarks and tests make fewer)."""
    import coremltools as ct

    folder = bundle / "coreml"
    folder.mkdir()
    sample = pipe.unet.config.sample_size
    latent_hw = (sample, sample) if isinstance(sample, int) else tuple(sample)
    g = torch.Generator().manual_seed(0)
    components = {}
    for graph in graphs(pipe, latent_hw, only, options.attention):
        t = time.perf_counter()
        inputs = graph.example(g)
        if graph.name == "unet":
            components["unet"] = _convert_unet(graph, inputs, folder, options)
        else:
            components[graph.name] = _convert_graph(graph, inputs, folder, options)
        c = components[graph.name]
        c["convert_seconds"] = round(time.perf_counter() - t, 1)
        del graph, inputs  # free this graph's example tensors and activations before the next is built
        gc.collect()
        log(f"  coreml {c['apple_name']:<12} {c['parameters'] / 1e6:8.2f}M params  {c['precision']}  "
            f"rewrite {c['parity']['rewrite_psnr_db']:.1f} dB  {c['bytes'] / 1e6:.1f} MB"
            + (f"  {len(c['chunks'])} chunks" if c.get("chunks") else "") + f"  {c['convert_seconds']}s")
        if len(c.get("chunks", ())) > 2:
            log(f"  note: Apple's StableDiffusionPipeline(resourcesAt:) loads Unet or UnetChunk1+2; build "
                f"Unet(chunksAt:) with all {len(c['chunks'])} chunks in Swift (README: Core ML)")
        lossy = c["quantization"].get("output_psnr_db")
        if lossy is not None and lossy < COMPRESSION_WARN_PSNR_DB:
            log(f"  warning: {options.compression} {c['apple_name']} output is {lossy:.1f} dB from fp32 in torch "
                f"(< {COMPRESSION_WARN_PSNR_DB} dB); a milder compression may be needed")
    for f in ("vocab.json", "merges.txt"):  # Apple's Resources folder: models and tokenizer side by side
        if (bundle / "tokenizer" / f).is_file():
            shutil.copy(bundle / "tokenizer" / f, folder / f)
    compiled = _compile(folder, components, log) if options.compile else []
    return {
        "folder": "coreml",
        "deployment_target": options.deployment_target,
        "compression": options.compression,
        "latent_size": list(latent_hw),
        "compiled": compiled,
        "coremltools": ct.__version__,
        "components": components,
    }


def _precision(graph: Graph, inputs: tuple[torch.Tensor, ...], reference: list[np.ndarray],
               options: CoreMLOptions) -> tuple[str, float | None]:
    """fp16 unless fp16 arithmetic (torch, CPU) measures below FP16_MIN_PSNR_DB against fp32."""
    if options.compute_precision != "auto":
        return options.compute_precision, None
    half = copy.deepcopy(graph.module).half()
    names = [s["name"] for s in graph.inputs]
    with torch.no_grad():  # token ids stay float32: the graph casts them to integers before any arithmetic
        out = half(*(x if n == "input_ids" else x.half() for n, x in zip(names, inputs)))
    db = min(psnr(r, o.float().numpy()) for r, o in zip(reference, _tuple(out)))
    return ("fp16" if db >= FP16_MIN_PSNR_DB else "fp32"), round(db, 2)


def _rewrite_parity(graph: Graph, module: torch.nn.Module, inputs) -> tuple[dict, list[np.ndarray]]:
    with torch.no_grad():
        ref = [r.numpy() for r in graph.reference(*inputs)]
        got = [o.numpy() for o in _tuple(module(*inputs))]
    db = min(psnr(r, o) for r, o in zip(ref, got))
    if db < REWRITE_MIN_PSNR_DB:
        raise CoreMLError(f"{graph.name}: the Core ML torch module does not match diffusers (PSNR {db:.1f} dB < "
                          f"{REWRITE_MIN_PSNR_DB} dB)")
    return {"reference": "diffusers fp32", "rewrite_psnr_db": round(db, 2),
            "rewrite_max_abs_diff": max(max_abs_diff(r, o) for r, o in zip(ref, got))}, ref


def _convert_graph(graph: Graph, inputs, folder: Path, options: CoreMLOptions,
                   checked: tuple | None = None) -> dict[str, Any]:
    """One package; `checked` is (parity, reference outputs, precision, fp16 PSNR) when already measured."""
    parity, ref, precision, fp16_db = _checks(graph, inputs, options) if checked is None else checked
    path = folder / f"{APPLE_NAMES[graph.name]}.mlpackage"

    def make(precision: str) -> tuple[dict, dict]:
        record = _to_package(graph.module, inputs, graph.inputs, graph.outputs, path, precision, options)
        return record, _coreml_parity([path], [graph.inputs], graph, inputs, ref)

    precision, (record, coreml) = _with_fallback(graph.name, precision, options, make)
    parity |= {"fp16_vs_fp32_psnr_db": fp16_db, **coreml}
    return _component(graph, [path], precision, parity, record, options)


def _convert_unet(graph: Graph, inputs, folder: Path, options: CoreMLOptions) -> dict[str, Any]:
    parity, ref, precision, fp16_db = checked = _checks(graph, inputs, options)
    stages = list(graph.module.stages)
    limit_mb = CHUNK_LIMIT_MB if options.max_chunk_mb is None else options.max_chunk_mb

    def ranges(precision: str) -> list[tuple[int, int]]:
        """The chunks' stage ranges for the bytes a weight takes at `precision` (or compressed)."""
        per_weight = cmp.BITS[options.compression] / 8 if options.compression else (2 if precision == "fp16" else 4)
        try:
            return plan_chunks(stages, per_weight, n=options.split_unet, max_bytes=int(limit_mb * 1e6))
        except ValueError as e:
            raise CoreMLError(str(e)) from None

    if len(ranges(precision)) == 1:
        return _convert_graph(graph, inputs, folder, options, checked)

    def make(precision: str) -> tuple[list[dict], dict]:
        chunks, chained = _write_chunks(stages, ranges(precision), graph, inputs, folder, precision, options,
                                        limit_mb)
        paths = [folder / Path(c["file"]).name for c in chunks]
        coreml = _coreml_parity(paths, [c["inputs"] for c in chunks], graph, inputs, ref)
        return chunks, {"chunks_vs_diffusers_psnr_db": round(psnr(ref[0], chained), 2), **coreml}

    precision, (chunks, coreml) = _with_fallback("unet", precision, options, make)
    parity |= {"fp16_vs_fp32_psnr_db": fp16_db, **coreml}
    paths = [folder / Path(c["file"]).name for c in chunks]
    component = _component(graph, paths, precision, parity, _merge(chunks), options)
    component["chunks"] = chunks
    return component


def _checks(graph: Graph, inputs, options: CoreMLOptions) -> tuple[dict, list[np.ndarray], str, float | None]:
    """Rewrite parity against diffusers, then the compute precision: (parity, reference, precision, fp16 dB)."""
    parity, ref = _rewrite_parity(graph, graph.module, inputs)
    precision, fp16_db = _precision(graph, inputs, ref, options)
    return parity, ref, precision, fp16_db


def _write_chunks(stages: list, ranges: list[tuple[int, int]], graph: Graph, inputs, folder: Path, precision: str,
                  options: CoreMLOptions, limit_mb: float) -> tuple[list[dict], np.ndarray]:
    """UnetChunk1..N, each traced on the tensors the chunks before it produce and checked against the size
    limit; returns their records and the chained torch output (the rewrite's, run chunk by chunk)."""
    env = dict(zip((t["name"] for t in graph.inputs), inputs))  # tensor name -> example value
    records = []
    for k, chunk in enumerate(make_chunks(stages, ranges)):
        with torch.no_grad():
            outs = chunk(*(env[n] for n in chunk.inputs))
        specs_in = [_spec(f, env[n]) for f, n in zip(chunk.input_features, chunk.inputs)]
        specs_out = [_spec(f, o) for f, o in zip(chunk.output_features, outs)]
        path = folder / f"UnetChunk{k + 1}.mlpackage"
        record = _to_package(chunk, tuple(env[n] for n in chunk.inputs), specs_in, specs_out, path, precision, options)
        weight_bytes = _weight_bytes(path)
        if options.split_unet is None and weight_bytes > limit_mb * 1e6:
            raise CoreMLError(f"UnetChunk{k + 1} holds {weight_bytes / 1e6:.0f} MB of weights, over the "
                              f"{limit_mb:.0f} MB limit; pass a larger --split-unet")
        env.update(zip(chunk.outputs, outs))
        records.append({"file": f"coreml/{path.name}", "inputs": specs_in, "outputs": specs_out,
                        "weight_bytes": weight_bytes, "stages": [s.output for s in chunk.stages], **record})
    return records, env["noise_pred"].numpy()


def _with_fallback(name: str, precision: str, options: CoreMLOptions, make: Callable[[str], tuple[Any, dict]]):
    """make(precision); where Core ML runs and an fp16 graph measures below the floor, make it again at fp32
    (with --coreml-precision auto). Returns (precision used, what make returned)."""
    made = make(precision)
    db = made[1]["coreml_psnr_db"]
    if db is not None and db < COREML_MIN_PSNR_DB and precision == "fp16" and options.compute_precision == "auto":
        precision, made = "fp32", make("fp32")
        made[1]["fp16_coreml_psnr_db"] = round(db, 2)
        db = made[1]["coreml_psnr_db"]
    if db is not None and db < COREML_MIN_PSNR_DB:
        raise CoreMLError(f"{name}: the Core ML graph does not match torch (PSNR {db:.1f} dB < {COREML_MIN_PSNR_DB} dB "
                          f"at {precision})")
    return precision, made


def _to_package(module: torch.nn.Module, inputs, specs_in: list[dict], specs_out: list[dict], path: Path,
                precision: str, options: CoreMLOptions) -> dict[str, Any]:
    """Trace, convert, compress, save at `path` (written beside it, then renamed)."""
    import coremltools as ct

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python ints from shapes: the shapes are fixed here
        traced = torch.jit.trace(module.eval(), tuple(inputs), check_trace=False)
    mlmodel = ct.convert(
        traced, convert_to="mlprogram",
        inputs=[ct.TensorType(name=s["name"], shape=tuple(s["shape"]), dtype=np.float32) for s in specs_in],
        outputs=[ct.TensorType(name=s["name"], dtype=np.float32) for s in specs_out],  # what Swift reads
        minimum_deployment_target=getattr(ct.target, options.deployment_target),
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        skip_model_load=True,
    )
    del traced
    record: dict[str, Any] = {}
    if options.compression:
        mlmodel = cmp.compress(mlmodel, options.compression, options.deployment_target, _block_size(module))
        with torch.no_grad():
            record = {"compression": options.compression, "weight_ops": cmp.weight_op_types(mlmodel),
                      **cmp.torch_side_psnr(module, mlmodel, tuple(inputs))}
    partial = path.with_name(f".partial-{path.name}")  # coremltools insists on the .mlpackage suffix
    shutil.rmtree(partial, ignore_errors=True)
    mlmodel.save(str(partial))
    shutil.rmtree(path, ignore_errors=True)  # a graph remade at fp32 replaces its fp16 package
    os.replace(partial, path)
    return record


def _block_size(module: torch.nn.Module) -> int:
    """Per-block quantisation blocks run along input channels and must divide them: 32, else 16."""
    dims = [p.shape[1] for p in module.parameters() if p.ndim >= 2 and p.numel() >= cmp.MIN_WEIGHT_ELEMENTS]
    return 32 if all(d % 32 == 0 for d in dims) else 16


def _coreml_parity(paths: list[Path], inputs_of: list[list[dict]], graph: Graph, inputs, ref) -> dict[str, Any]:
    """Run the saved package(s) in order, as Swift chains UNet chunks, where Core ML exists (macOS); elsewhere
    say why not. Each package reads its inputs from the graph inputs and the packages before it."""
    if not can_run_coreml():
        return {"coreml_psnr_db": None, "coreml_not_run": f"Core ML runs only on macOS (this is {platform.system()})"}
    import coremltools as ct

    env = {s["name"]: x.numpy() for s, x in zip(graph.inputs, inputs)}
    for path, specs in zip(paths, inputs_of):
        model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_AND_NE)
        env.update(model.predict({s["name"]: env[s["name"]] for s in specs}))
    return {"coreml_psnr_db": round(min(psnr(r, env[s["name"]]) for r, s in zip(ref, graph.outputs)), 2)}


def _component(graph: Graph, packages: list[Path], precision: str, parity: dict, record: dict,
               options: CoreMLOptions) -> dict[str, Any]:
    bundle = packages[0].parent.parent
    files = {str(f.relative_to(bundle)): sha256_file(f) for p in packages for f in sorted(p.rglob("*")) if f.is_file()}
    weight_bytes = sum(_weight_bytes(p) for p in packages)
    return {
        "file": f"coreml/{packages[0].name}",
        "apple_name": APPLE_NAMES[graph.name],
        "files": files,
        "bytes": sum((bundle / f).stat().st_size for f in files),
        "weight_bytes": weight_bytes,
        "parameters": sum(p.numel() for p in graph.module.parameters()),
        "precision": precision if not options.compression else f"{options.compression}+{precision}",
        "inputs": graph.inputs,
        "outputs": graph.outputs,
        "parity": parity,
        "attention": {} if graph.name == "text_encoder" else {"kernel": options.attention, "layout": "(B, C, 1, S)"},
        "quantization": record,
        "memory": _estimated_memory(graph, [_weight_bytes(p) for p in packages]),
    }


def _merge(chunk_records: list[dict]) -> dict[str, Any]:
    """The compression record of a chunked UNet: the worst chunk's figures."""
    if not chunk_records or "compression" not in chunk_records[0]:
        return {}
    keys = ("output_psnr_db", "min_weight_psnr_db")
    merged = {k: min(c[k] for c in chunk_records if c.get(k) is not None) for k in keys}
    ops: dict[str, int] = {}
    for c in chunk_records:
        for op, n in c["weight_ops"].items():
            ops[op] = ops.get(op, 0) + n
    return {"compression": chunk_records[0]["compression"], "weight_ops": ops, **merged,
            "weights_compressed": sum(c["weights_compressed"] for c in chunk_records),
            "weights_checked": sum(c["weights_checked"] for c in chunk_records)}


def _estimated_memory(graph: Graph, weight_bytes: list[int]) -> dict[str, Any]:
    """What the planner needs, per graph (chunk), estimated from sizes: Core ML memory can be measured only on
    macOS. Resident: the weights; loading: twice that; activations: 8x the largest input/output tensor."""
    pixels = 1 if graph.name == "text_encoder" else int(np.prod(graph.inputs[0]["shape"][-2:]))
    batch = UNET_BATCH if graph.name == "unet" else 1
    largest = max(4 * int(np.prod(t["shape"])) for t in graph.outputs + graph.inputs)
    per_pixel = 8.0 * largest / (pixels * batch)
    return {"estimated": "from weight and tensor sizes; Core ML memory is measured only on macOS",
            "graphs": [{"load_peak": 2 * w, "resident": w, "activation": {"c": 0.0, "a": per_pixel, "b": 0.0},
                        "carry_fit": {"a": per_pixel / 8}} for w in weight_bytes]}


def _weight_bytes(package: Path) -> int:
    return sum(f.stat().st_size for f in (package / "Data" / "com.apple.CoreML" / "weights").glob("*") if f.is_file())


def _spec(name: str, x: torch.Tensor) -> dict:
    return {"name": name, "dtype": "float32", "shape": list(x.shape)}


def _tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _compile(folder: Path, components: dict, log: Callable[[str], None]) -> list[str]:
    """.mlpackage -> .mlmodelc beside it, as Apple's Swift CLI loads them (Resources/)."""
    command = compiler()
    out = []
    for c in components.values():
        for chunk in c.get("chunks") or [c]:
            package = folder / Path(chunk["file"]).name
            subprocess.run([*command, str(package), str(folder)], check=True, capture_output=True)
            out.append(package.with_suffix(".mlmodelc").name)
            log(f"  compiled {out[-1]}")
    return out
