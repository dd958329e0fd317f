"""Peak activation memory of exported attention graphs under onnxruntime, per kernel: measured, not estimated.

Two graphs, each exported the way the converter exports (legacy tracer, opset 17, dynamic spatial axes)
at a small size and then run at a large one, so the figures also show that a kernel's memory bound
survives tracing:

  layer  one SD 1.5 top-level self-attention layer: 320 channels, 8 heads, traced at 16×16, run at 64×64
         (sequence 4096, a 512 px image): original holds a (8, 4096, 4096) fp32 score tensor, 512 MiB
  unet   the tiny random SD UNet (converters/tiny.py), traced at 8×8, run at a 64×64 latent, batch 2

Each graph runs once in a fresh process, with onnxruntime's CPU arena and memory pattern off (both would
hold on to freed blocks and hide what the graph itself needs). The figure is VmHWM after the run minus
VmRSS just before it, with the high-water mark reset (/proc/self/clear_refs) after session creation and
input allocation: the memory the run itself added. Linux only.

    OMP_NUM_THREADS=1 python benchmarks/attention_memory.py [--graphs layer unet] [--kernels original sliced]
        [--chunk 1024 ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

MIB = 2**20
LAYER = {"channels": 320, "heads": 8, "trace_side": 16, "run_side": 64, "batch": 1}  # SD 1.5, first block
UNET = {"trace_side": 8, "run_side": 64, "batch": 2}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(path: str, feeds: dict[str, list[int]], threads: int) -> dict:
    """Run `path` once on random float32 feeds; the memory the run added, in bytes. Call in a fresh process."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in feeds.items()}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now, so the mark below is this run's alone
    before = _status_kib("VmRSS")
    t = time.perf_counter()
    session.run(None, arrays)
    seconds = time.perf_counter() - t
    return {"peak_bytes": (_status_kib("VmHWM") - before) * 1024, "seconds": seconds}


def _export(module, example: tuple, path: Path, names: list[str], dynamic: dict[str, dict[int, str]]) -> None:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), input_names=names, output_names=["out"],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)


def export_layer(kernel: str, chunk: int | None, path: Path) -> tuple[dict[str, list[int]], int]:
    """One SD 1.5-sized self-attention layer; returns the run feeds and the largest score tensor in bytes."""
    import torch
    from diffusers.models.attention_processor import Attention
    from edge.kernels.processor import KernelAttnProcessor

    c, heads, b = LAYER["channels"], LAYER["heads"], LAYER["batch"]
    torch.manual_seed(0)
    attn = Attention(query_dim=c, heads=heads, dim_head=c // heads)
    attn.set_processor(KernelAttnProcessor(kernel, chunk))
    trace_seq, run_seq = LAYER["trace_side"] ** 2, LAYER["run_side"] ** 2
    _export(attn, (torch.randn(b, trace_seq, c),), path, ["hidden_states"],
            {"hidden_states": {1: "sequence"}, "out": {1: "sequence"}})
    rows = run_seq if chunk is None else min(chunk, run_seq)
    return {"hidden_states": [b, run_seq, c]}, b * heads * rows * run_seq * 4


def export_unet(kernel: str, chunk: int | None, path: Path) -> tuple[dict[str, list[int]], int]:
    """The tiny SD UNet through the converter's own export; returns the run feeds and the largest score tensor."""
    import torch
    from edge.converters.onnx_export import component_specs, export
    from edge.converters.tiny import tiny_pipeline
    from edge.kernels.processor import use_attention

    pipe = tiny_pipeline()
    use_attention(pipe.unet, kernel, chunk)
    spec = next(s for s in component_specs(pipe) if s.name == "unet")
    scratch = path.parent / "scratch"
    scratch.mkdir(exist_ok=True)
    side, b = UNET["trace_side"], UNET["batch"]
    export(spec, path, spec.example(torch.Generator().manual_seed(0), side, side), scratch)
    cfg, side = pipe.unet.config, UNET["run_side"]
    feeds = {"sample": [b, cfg.in_channels, side, side], "timestep": [b],
             "encoder_hidden_states": [b, pipe.text_encoder.config.max_position_embeddings, cfg.cross_attention_dim]}
    seq = side * side  # the top level holds the longest sequence
    heads = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads
    rows = seq if chunk is None else min(chunk, seq)
    return feeds, b * heads * rows * seq * 4


def _in_fresh_process(path: Path, feeds: dict[str, list[int]], threads: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--measure", str(path), json.dumps(feeds), str(threads)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {path.name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graphs", nargs="+", choices=["layer", "unet"], default=["layer", "unet"])
    parser.add_argument("--kernels", nargs="+", choices=["original", "sliced", "split_einsum", "fused"],
                        default=["original", "sliced", "fused"],
                        help="split_einsum is left out by default: onnxruntime's CPU Einsum makes it ~10x slower")
    parser.add_argument("--chunk", type=int, nargs="+", default=[1024], help="query rows per slice for 'sliced'")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--measure", nargs=3, metavar=("ONNX", "FEEDS", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:  # the child
        path, feeds, threads = args.measure
        print(json.dumps(measure(path, json.loads(feeds), int(threads))))
        return

    exporters = {"layer": export_layer, "unet": export_unet}
    variants = [(k, c) for k in args.kernels for c in (args.chunk if k == "sliced" else [None])]
    print(f"{'graph':<6} {'kernel':<13} {'chunk':>5} {'largest scores':>15} {'measured peak':>14} {'run':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for graph in args.graphs:
            for kernel, chunk in variants:
                path = Path(tmp) / f"{graph}-{kernel}-{chunk}.onnx"
                feeds, scores = exporters[graph](kernel, chunk, path)
                got = _in_fresh_process(path, feeds, args.threads)
                print(f"{graph:<6} {kernel:<13} {chunk if chunk is not None else '-':>5} "
                      f"{scores / MIB:>11.0f} MiB {got['peak_bytes'] / MIB:>10.0f} MiB {got['seconds']:>6.2f}s",
                      flush=True)


if __name__ == "__main__":
    main()
