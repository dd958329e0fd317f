"""How every ONNX graph is opened, by the runtime, the converter's parity checks and the memory probes alike.

One place, so that a figure measured at convert time (PSNR against fp32, memory) is measured with the same
kernels the device will run: on x86 CPUs without VNNI that includes onnxruntime's exact U8U8 int8 path
(edge.cpu), which onnxruntime applies at the "extended" optimisation level and above: "basic" is refused
on those CPUs.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from edge.cpu import CpuFeatures, session_config

OPTIMIZATION_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


# onnxruntime's CPU arena: "off"; "per_run", given back at the end of every run (edge.graphs passes
# run_options); "kept" between runs, grown to the largest run's size. Without an arena every large buffer is a
# fresh mmap whose pages the kernel faults in and zeroes: the first SD 1.5 512x512 VAE decode, 2 threads
# (benchmarks/vae_first_decode.py, AMD EPYC Zen 4), took 18.6 s "off" (3.35 M page faults, 7.6 s in the kernel),
# 13.3 s "per_run" (peak 1.47 against 1.37 GB), 13.4 s "kept" (peak 2.36 GB). Under a memory budget the runtime
# keeps it off: the planner's figures are measured so, and "per_run" peaked higher there (int8, 1.37 vs 1.20 GB).
ARENA_MODES = ("off", "per_run", "kept")


def arena_mode(memory_arena: bool | str) -> str:
    """One of ARENA_MODES; True and False (older callers) mean "kept" and "off"."""
    if isinstance(memory_arena, bool):
        return "kept" if memory_arena else "off"
    if memory_arena not in ARENA_MODES:
        raise ValueError(f"memory_arena={memory_arena!r}; choose one of {', '.join(ARENA_MODES)}")
    return memory_arena


def run_options(memory_arena: bool | str) -> ort.RunOptions | None:
    """The options every run takes: with a "per_run" arena, the arena is shrunk back at the end of the run."""
    if arena_mode(memory_arena) != "per_run":
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def session_options(threads: int | None = None, memory_arena: bool | str = False, optimization: str = "extended",
                    cpu: CpuFeatures | None = None, int8: bool = True) -> ort.SessionOptions:
    """onnxruntime options for one graph on this CPU (`cpu`: its features; default: read from this one);
    `int8=False` for graphs without int8 weights, which then keep every fast kernel (see edge.cpu).

    `optimization` is onnxruntime's graph optimisation level. "all" adds the NCHWc layout rewrite: faster
    convolutions, for a second, re-laid-out copy of every convolution weight and a larger transient while
    loading. Measured on SD 1.5 (2-core x86, fused attention): UNet call ~15 % faster at "all" (interleaved
    in one process: 9.0 vs 10.7 s best, 17.4 vs 20.6 s CPU), ~0.2 GB more resident; VAE decoder resident
    390 vs 204 MB, UNet quarter load peak 1611 vs 943 MB. So: "all" when memory is not counted, "extended"
    under a budget (the planner's measurements are taken at "extended").
    The int8 entries of `edge.cpu.session_config` are added where the CPU needs them; they act at
    "extended" and above.
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown graph optimisation {optimization!r}; choose one of {', '.join(OPTIMIZATION_LEVELS)}")
    config = session_config(cpu, int8)
    if config and optimization == "basic":
        raise ValueError("graph optimisation 'basic' would run int8 graphs on this CPU's saturating U8S8 kernels "
                         "(x86 without VNNI); choose 'extended' or 'all'")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena_mode(memory_arena) != "off"  # "per_run": with run_options(...)
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return options


def with_initializers(args: dict, int8: bool, weights: dict, keep: list) -> ort.SessionOptions:
    """session_options(**args) that give the graph `weights` (initializer name -> numpy array) in place of its
    own initializers of those names (run-time LoRA). The arrays are shared, not copied: the OrtValues over them
    are appended to `keep`, which the caller holds as long as the session.

    At "all" onnxruntime's NCHWc rewrite lays out the convolution weights from the graph's own initializers
    before the given ones replace them (measured, onnxruntime 1.32: a LoRA'd tiny UNet 6.6 dB from torch at
    "all", 100 dB at "extended" and "basic"), so these sessions are opened at "extended" at most."""
    if args.get("optimization") == "all":
        args = {**args, "optimization": "extended"}
    options = session_options(**args, int8=int8)
    for name, array in weights.items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(array))
        options.add_initializer(name, keep[-1])
    return options


def open_session(path: Path | str, options: ort.SessionOptions | None = None,
                 providers: list[str] | None = None) -> ort.InferenceSession:
    """A session for the graph at `path`, by default as the runtime opens it on this CPU ("extended")."""
    options = session_options() if options is None else options
    return ort.InferenceSession(str(path), options,
                                providers=["CPUExecutionProvider"] if providers is None else providers)
