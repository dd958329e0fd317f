"""Running a bundle's Core ML graphs (its `coreml/` folder) through coremltools, on macOS.

`Pipeline.load(bundle, backend="coreml", compute_units="cpu_and_ne")` returns a `CoreMLPipeline`: the same
pipeline — tokenizer, schedulers, denoising generator, memory plan, chunk-by-chunk UNet — with each graph
an `MLModel` behind a small adapter that speaks the ONNX sessions' interface. The adapter translates the
few places where Apple's graphs differ: float token ids, (B, D, 1, 77) text states, the VAE decoder's `z`
input, and fixed shapes (batch 2 for the UNet: other batches are split or padded).

No torch: coremltools imports torch at its own import when torch is installed, so it is imported here with
torch blocked (coremltools then only lacks its converters, which a runtime does not use).
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import MANIFEST, BundleError, Component, parse_manifest
from edge.pipeline import Pipeline
from edge.plan import BudgetError, Plan, parse_bytes

COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE"}
RENAMED = {"latent_sample": "z"}  # ONNX feed name -> Apple's graph input


class CoreMLBackendError(ValueError):
    """The Core ML backend cannot run here, or was asked for something it does not do."""


def check_platform(compute_units: str) -> None:
    """Refuse a bad argument, then a machine without Core ML, with one message each."""
    if compute_units not in COMPUTE_UNITS:
        raise CoreMLBackendError(f"unknown compute_units {compute_units!r}; choose one of {', '.join(COMPUTE_UNITS)}")
    if platform.system() != "Darwin":
        raise CoreMLBackendError(
            f"the Core ML backend runs only on macOS (Core ML is Apple's framework); this is {platform.system()}. "
            "Run this bundle's ONNX graphs with backend='onnx' (convert with --target onnx,coreml), or use a Mac")


def import_coremltools():
    """coremltools without torch: a None entry in sys.modules makes `import torch` fail, which coremltools
    handles (it then has no PyTorch converter). The entry is removed afterwards."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import coremltools
    except ImportError as e:
        raise CoreMLBackendError(f"the Core ML backend needs coremltools ({e}): pip install coremltools") from None
    finally:
        if blocked:
            del sys.modules["torch"]
    return coremltools


@dataclass(frozen=True)
class _Port:
    name: str  # what the ONNX-style caller uses


class _CoreMLGraph:
    """An MLModel with the `get_inputs` / `get_outputs` / `run` interface the pipeline drives sessions by."""

    def __init__(self, model, component: str):
        self.model, self.component = model, component
        spec = model.get_spec().description
        self.input_shapes = {i.name: tuple(i.type.multiArrayType.shape) for i in spec.input}
        self.output_names = [o.name for o in spec.output]
        inverse = {v: k for k, v in RENAMED.items()}
        self._inputs = [_Port(inverse.get(n, n)) for n in self.input_shapes]

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return [_Port("sample" if n == "image" else n) for n in self.output_names]

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {RENAMED.get(k, k): self._layout(RENAMED.get(k, k), np.asarray(v)) for k, v in feeds.items()}
        n = next(iter(feeds.values())).shape[0]
        batch = next(iter(self.input_shapes.values()))[0]
        pieces = []
        for start in range(0, n, batch):  # fixed batch: split, padding the last piece by repeating its rows
            part = {k: _pad(v[start:start + batch], batch) for k, v in feeds.items()}
            got = self.model.predict(part)
            pieces.append([np.asarray(got[o], np.float32)[: min(batch, n - start)] for o in self.output_names])
        result = [np.concatenate(column) for column in zip(*pieces)]
        if outputs is None:
            return result
        names = [p.name for p in self.get_outputs()]
        return [result[names.index(o)] for o in outputs]

    def _layout(self, name: str, x: np.ndarray) -> np.ndarray:
        if name == "input_ids":
            x = x.astype(np.float32)  # Apple's text encoder takes token ids as floats
        if name == "encoder_hidden_states" and x.ndim == 3:
            x = x.transpose(0, 2, 1)[:, :, None, :]  # (B, 77, D) -> (B, D, 1, 77)
        want = self.input_shapes[name]
        if x.shape[1:] != want[1:]:
            raise CoreMLBackendError(f"{self.component}: input {name} has shape {x.shape}, but this Core ML graph "
                                     f"was converted for {want} (Core ML graphs have fixed shapes: generate at the "
                                     "bundle's default size, or re-convert)")
        return np.ascontiguousarray(x, dtype=np.float32)


def _pad(x: np.ndarray, batch: int) -> np.ndarray:
    return x if x.shape[0] == batch else np.concatenate([x, np.repeat(x[-1:], batch - x.shape[0], axis=0)])


def coreml_manifest(bundle: Path):
    """The bundle's manifest with its Core ML graphs as the components."""
    data = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    if "coreml" not in data:
        raise BundleError(f"{bundle} has no Core ML graphs; convert with `edge convert ... --target coreml`")
    return parse_manifest({**data, "components": data["coreml"]["components"]}, str(bundle / MANIFEST))


def describe(bundle: Path | str) -> list[str]:
    """`edge info`'s lines for the bundle's Core ML graphs (none when it has none)."""
    data = json.loads((Path(bundle) / MANIFEST).read_text(encoding="utf-8"))
    section = data.get("coreml")
    if section is None:
        return []
    lines = [f"Core ML ({section['deployment_target']}, compression {section['compression'] or 'none'}, "
             f"{section['latent_size'][0]}x{section['latent_size'][1]} latents) in {section['folder']}/",
             f"{'graph':<13}{'precision':>16}{'weights':>11}{'rewrite dB':>11}{'Core ML dB':>11}  chunks (weights)"]
    for c in section["components"].values():
        chunks = ", ".join(f"{k['weight_bytes'] / 1e6:.0f} MB" for k in c.get("chunks", ())) or "1"
        coreml = c["parity"].get("coreml_psnr_db")
        lines.append(f"{c['apple_name']:<13}{c['precision']:>16}{c['weight_bytes'] / 1e6:>9.1f}MB"
                     f"{c['parity']['rewrite_psnr_db']:>11.1f}{'-' if coreml is None else f'{coreml:.1f}':>11}  {chunks}")
    return lines


class CoreMLPipeline(Pipeline):
    """Pipeline whose graphs are Core ML models; everything else is the ONNX pipeline's."""

    compute_units = "cpu_and_ne"

    @classmethod
    def load_coreml(cls, bundle: Path | str, *, compute_units: str = "cpu_and_ne", verify: bool = True,
                    memory_budget: str | int | None = None, preload: bool = True) -> "CoreMLPipeline":
        check_platform(compute_units)
        bundle = Path(bundle)
        if not (bundle / MANIFEST).is_file():
            raise BundleError(f"{bundle} is not an edge bundle: it has no {MANIFEST}")
        manifest = coreml_manifest(bundle)
        budget = None if memory_budget is None else parse_bytes(memory_budget)
        return cls._start(bundle, manifest, None, [], budget, verify, preload, compute_units=compute_units)

    def plan_for(self, height: int, width: int, num_images: int = 1, guided: bool = True,
                 image: bool = False, decoder: str = "full", controlnets: tuple[str, ...] = ()) -> Plan:
        plan = super().plan_for(height, width, num_images, guided, image, decoder, controlnets)
        if plan.vae_tile is not None:
            raise BudgetError(f"the budget fits only a tiled VAE decode, which fixed-shape Core ML graphs cannot do; "
                              f"the whole-latent decode needs a larger budget (plan: {plan.describe()})")
        return plan

    def use_loras(self, loras: list) -> list:
        if loras:
            raise CoreMLBackendError("LoRA at run time is not built for Core ML graphs; fuse it into the bundle with "
                                     "`edge convert MODEL --lora FILE:SCALE --target coreml`")
        return []

    def _new_session(self, component: Component, k: int) -> Any:
        """Graph k as an MLModel behind the sessions' interface (edge.graphs checks its files first)."""
        ct = import_coremltools()
        model = ct.models.MLModel(str(self.bundle / component.graphs[k]),
                                  compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[self.compute_units]))
        return _CoreMLGraph(model, component.name)
