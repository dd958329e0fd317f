"""The Mac check: convert a model to Core ML, run every graph with Core ML, and compare with torch.

    make coreml-check                      # the default model, on macOS
    .venv/bin/python apps/apple/coreml_check.py --source default --out build/coreml-check [--compute-units all]

1. `edge convert SOURCE --target onnx,coreml` (the converter itself runs each package once with Core ML
   and refuses one below 35 dB against torch),
2. each graph again on fresh inputs, Core ML vs the diffusers torch module: PSNR >= 35 dB,
3. end to end: the same prompt, seed and scheduler through edge's pipeline with Core ML graphs and with
   the torch modules: final latents and image PSNR >= 35 dB.

Off macOS only `--reference-only` runs: it checks the torch reference pipeline of step 3 against the ONNX
runtime, so the yardstick itself is known good before a Mac uses it.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch

MIN_PSNR_DB = 35.0
PROMPT = "a red circle on a blue background"


def convert_bundle(source: str, out: Path) -> Path:
    from edge.converters.convert import Options, convert
    from edge.converters.coreml.convert import CoreMLOptions

    convert(source, out, overwrite=True, options=Options(targets=("onnx", "coreml"), profile_memory=False,
                                                         tiled_vae=False, coreml=CoreMLOptions()))
    return out


def check_graphs(bundle: Path, source: str, compute_units: str) -> dict[str, float]:
    """Core ML vs torch for every graph (a chunked UNet chained as Apple's Swift chains it)."""
    from edge.bundle import read_manifest
    from edge.converters.coreml.components import graphs
    from edge.converters.sources import open_source
    from edge.coreml_backend import COMPUTE_UNITS, import_coremltools
    from edge.coreml_backend import coreml_manifest
    from edge.metrics import psnr

    ct = import_coremltools()
    units = getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units])
    manifest, pipe = coreml_manifest(bundle), open_source(source).pipe
    latent_hw = tuple(read_manifest(bundle).default_size[i] // manifest.vae_scale_factor for i in (0, 1))
    g = torch.Generator().manual_seed(123)  # not the converter's inputs
    out = {}
    for graph in graphs(pipe, latent_hw):
        inputs = graph.example(g)
        with torch.no_grad():
            ref = [r.numpy() for r in graph.reference(*inputs)]
        env = {s["name"]: x.numpy() for s, x in zip(graph.inputs, inputs)}
        for file in manifest.components[graph.name].graphs:
            model = ct.models.MLModel(str(bundle / file), compute_units=units)
            names = [i.name for i in model.get_spec().description.input]
            env.update(model.predict({n: env[n] for n in names}))
        out[graph.name] = min(psnr(r, env[s["name"]]) for r, s in zip(ref, graph.outputs))
        print(f"  {graph.name:<13} Core ML vs torch {out[graph.name]:6.1f} dB")
    return out


def check_end_to_end(bundle: Path, source: str, backend: str, compute_units: str, steps: int) -> dict[str, float]:
    """The same generation with `backend`'s graphs and with torch's: latents and image PSNR."""
    from edge.converters.coreml.reference import pipelines
    from edge.metrics import psnr
    from edge.pipeline import Pipeline

    torch_pipe = pipelines(bundle, source)["original"]
    other = Pipeline.load(bundle, backend=backend, compute_units=compute_units)
    a = torch_pipe.generate(PROMPT, steps=steps, guidance=5.0, scheduler="euler", seed=0)
    b = other.generate(PROMPT, steps=steps, guidance=5.0, scheduler="euler", seed=0)
    image_a, image_b = (np.asarray(r.images[0], np.float32) for r in (a, b))
    out = {"latents": psnr(a.latents, b.latents), "image": psnr(image_a, image_b, peak=255.0)}
    print(f"  end to end ({backend} vs torch, {steps} steps): latents {out['latents']:.1f} dB, "
          f"image {out['image']:.1f} dB")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="default")
    ap.add_argument("--out", type=Path, default=Path("build/coreml-check"))
    ap.add_argument("--compute-units", default="cpu_and_ne", help="all, cpu_only, cpu_and_gpu, cpu_and_ne")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reference-only", action="store_true", help="check the torch reference against ONNX (any OS)")
    a = ap.parse_args()
    if not a.reference_only and platform.system() != "Darwin":
        print(f"error: the Core ML check runs only on macOS (this is {platform.system()}); "
              "--reference-only checks its torch reference here", file=sys.stderr)
        return 2
    bundle = convert_bundle(a.source, a.out)
    results = {}
    if a.reference_only:
        results = check_end_to_end(bundle, a.source, "onnx", a.compute_units, a.steps)
    else:
        results.update(check_graphs(bundle, a.source, a.compute_units))
        results.update({f"end_to_end_{k}": v for k, v in
                        check_end_to_end(bundle, a.source, "coreml", a.compute_units, a.steps).items()})
    failed = {k: round(v, 1) for k, v in results.items() if v < MIN_PSNR_DB}
    if failed:
        print(f"FAILED: below {MIN_PSNR_DB} dB: {failed}", file=sys.stderr)
        return 1
    print(f"OK: every figure >= {MIN_PSNR_DB} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
