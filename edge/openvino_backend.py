"""Running a bundle's ONNX graphs on OpenVINO instead of onnxruntime, where OpenVINO is installed.

`Pipeline.load(bundle, backend="openvino", inference_precision=None)` returns an `OpenVINOPipeline`: the same
pipeline, each graph compiled by OpenVINO's CPU plugin from the very .onnx file onnxruntime would load (its ONNX
front end reads onnxruntime's fused MultiHeadAttention too). OpenVINO picks its inference precision for the CPU:
bf16 where the CPU has AMX or AVX-512 BF16, f32 elsewhere; `inference_precision="f32"` keeps full precision.
On a CPU with AMX this is several times faster than onnxruntime's fp32 (benchmarks/RESULTS.md); bf16 changes the
picture by ~40 dB, as OpenVINO's own pipelines do.

The memory planner's figures are onnxruntime's measurements, so a memory budget is refused here rather than
planned with numbers that do not describe this engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import Component, read_manifest
from edge.pipeline import Pipeline

PRECISIONS = ("f32", "bf16", "f16")


class OpenVINOBackendError(ValueError):
    """OpenVINO is not installed, or was asked for something this backend does not do."""


@dataclass(frozen=True)
class _Port:
    name: str


class _OpenVINOGraph:
    """An OpenVINO model with the `get_inputs` / `get_outputs` / `run` interface of onnxruntime sessions.

    It is compiled for the exact input shapes of its first call, and again when they change (another size or
    batch): OpenVINO's CPU plugin runs a static-shape graph 14% faster than the dynamic one (SD 1.5 UNet,
    512x512 batch 2, bf16 on AMX: 1.38 s against 1.60 s a call), and a dynamic graph's first call at a new
    shape costs about as much as compiling a static one. One compiled shape is kept, so memory stays one graph.
    """

    def __init__(self, core, model, config: dict[str, Any], names: list[str], outputs: list[str], what: str):
        self.core, self.model, self.config, self.what = core, model, config, what
        self._inputs, self._outputs = [_Port(n) for n in names], [_Port(n) for n in outputs]
        self._ports = dict(zip(names, model.inputs))
        self.compiled, self._request, self._shapes = None, None, None

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs

    def _compile_for(self, feeds: dict[str, np.ndarray]) -> None:
        shapes = {name: tuple(v.shape) for name, v in feeds.items()}
        if shapes == self._shapes:
            return
        self.compiled = self._request = None  # the old shape's graph goes before the new one is built
        import openvino as ov

        self.model.reshape({self._ports[n]: ov.PartialShape(list(s)) for n, s in shapes.items()})
        try:
            self.compiled = self.core.compile_model(self.model, "CPU", self.config)
        except RuntimeError as e:
            raise OpenVINOBackendError(f"OpenVINO cannot compile {self.what} for inputs {shapes}: "
                                       f"{str(e).splitlines()[0][:300]}; run this bundle with backend='onnx'") from None
        self._request, self._shapes = self.compiled.create_infer_request(), shapes

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        self._compile_for(feeds)
        result = self._request.infer(feeds)
        wanted = [p.name for p in self._outputs] if outputs is None else outputs
        return [np.array(result[self.compiled.output(name)]) for name in wanted]  # copies: the request reuses


def import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise OpenVINOBackendError(f"the OpenVINO backend needs openvino ({e}): pip install "
                                   "'edge-diffusion[openvino]' (or pip install openvino)") from None
    return openvino


class OpenVINOPipeline(Pipeline):
    """Pipeline whose graphs OpenVINO compiles; everything else is the onnxruntime pipeline's."""

    inference_precision: str | None = None
    threads: int | None = None
    _core: Any = None

    @classmethod
    def load_openvino(cls, bundle: Path | str, *, threads: int | None = None, verify: bool = True,
                      memory_budget: str | int | None = None, preload: bool = True,
                      inference_precision: str | None = None) -> "OpenVINOPipeline":
        if inference_precision is not None and inference_precision not in PRECISIONS:
            raise OpenVINOBackendError(f"unknown inference_precision {inference_precision!r}; choose one of "
                                       f"{', '.join(PRECISIONS)}, or None (OpenVINO's choice for this CPU)")
        if memory_budget is not None:
            raise OpenVINOBackendError("a memory budget is planned with onnxruntime's measurements, which do not "
                                       "describe OpenVINO: use backend='onnx' with a budget, or no budget here")
        import_openvino()
        bundle = Path(bundle)
        manifest = read_manifest(bundle)
        if not manifest.components:
            raise OpenVINOBackendError(f"{bundle} holds only Core ML graphs; OpenVINO runs the ONNX ones")
        return cls._start(bundle, manifest, None, [], None, verify, preload, threads=threads,
                          inference_precision=inference_precision)

    def use_loras(self, loras: list) -> list:
        if loras:
            raise OpenVINOBackendError("LoRA at run time hands onnxruntime the changed weights; use backend='onnx', "
                                       "or fuse the LoRA into the bundle with `edge convert MODEL --lora FILE:SCALE`")
        return []

    def _new_session(self, component: Component, k: int) -> Any:
        """Graph k compiled for the CPU (edge.graphs checks its files first)."""
        if self._core is None:  # one Core for every graph: it holds the plugin and its thread pool
            self._core = import_openvino().Core()
        core = self._core
        config: dict[str, Any] = {}
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.threads
        if self.inference_precision is not None:
            config["INFERENCE_PRECISION_HINT"] = self.inference_precision
        path = self.bundle / component.graphs[k]
        try:  # read (and checked by OpenVINO's ONNX front end) now; compiled at the first call's shapes
            model = core.read_model(str(path))
        except RuntimeError as e:
            raise OpenVINOBackendError(f"OpenVINO cannot read {path.name} ({component.precision}): "
                                       f"{str(e).splitlines()[0][:300]}; run this bundle with backend='onnx'") from None
        names = [_onnx_name(p, component, "inputs") for p in model.inputs]
        outputs = [_onnx_name(p, component, "outputs") for p in model.outputs]
        return _OpenVINOGraph(core, model, config, names, outputs, f"{path.name} ({component.precision})")

    def precision_of(self, name: str) -> str:
        """The precision OpenVINO runs a loaded component at (e.g. 'bf16'): the compiled graph's, or before its
        first call the one it will be compiled with."""
        session = self.graphs.open(name)[0]
        if session.compiled is not None:
            return session.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        return self.inference_precision or self._core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


def _onnx_name(port, component: Component, side: str) -> str:
    """The tensor's name as the ONNX graph (and so the pipeline) calls it: OpenVINO keeps every alias."""
    names = port.get_names()
    known = [t.name for t in getattr(component, side)] + [n for c in component.chunks for n in getattr(c, side)]
    return next((n for n in known if n in names), port.get_any_name())
