"""Measure a bundle's graphs in memory (edge.memprobe, one child process per sample) for the manifest.

`edge convert` runs it on the host; `edge profile BUNDLE` runs it again on a device and rewrites the
manifest's measurements, so `edge plan` there adds up that device's own numbers. No torch here.

The runtime's planner (edge.plan) turns these numbers into a plan for a budget, so they are taken
the way the runtime runs: onnxruntime on CPU, arena off, the graphs chained as the pipeline chains
them. UNet and VAE decoder are measured at three (latent size, batch) points and their activations
fitted as c + B * (a * P + b * P^2); the text encoder runs at one fixed shape.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Callable

from edge.cpu import features
from edge.memprobe import fit_activation, probe

# What `edge generate` loads; the head of the cut VAE decoder (tiled decoding) where the bundle has one.
# The encoder: img2img; the tiny decoder: previews and --decoder tiny.
PROFILED = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_decoder_head", "vae_decoder_tiled", "vae_encoder",
            "tiny_vae_decoder")


def profiled(components) -> list[str]:
    """The components of a bundle that are measured: PROFILED's and every ControlNet."""
    return [n for n in components if n in PROFILED or n.startswith("controlnet_")]
TAIL_TILES = (32, 24, 16)  # latent tile sides the tiled decoder's tail is measured at (its activations are
# large even per tile: SD 1.5's tail on a 64x64 latent tile takes ~2 GB, on 16x16 ~0.3 GB)
HIDDEN_SCALE = 2  # the tail reads the head's output: 2 ** converters/tiled_vae.HEAD_UP_BLOCKS x the latent's side
MIN_SIDE = 32  # latent pixels


def samples_for(name: str, latent_hw: tuple[int, int], multiple: int) -> list[tuple[int, int, int]]:
    """(latent h, latent w, batch) points to measure a component at; `multiple` keeps UNet sizes valid.

    At the model's default size and smaller, but never below 32 latent pixels a side: activations of a tiny
    model at its own size are within RSS noise, and a fit through noise extrapolates to nonsense."""
    h, w = (max(d, MIN_SIDE) for d in latent_hw)

    def scaled(f: float) -> tuple[int, int]:
        return max(multiple, round(h * f / multiple) * multiple), max(multiple, round(w * f / multiple) * multiple)

    if name.startswith("text_encoder"):  # SDXL's text_encoder_2 too: no latent input
        return [(h, w, 1)]
    if name == "unet" or name.startswith("controlnet_"):
        return [(h, w, 1), (h, w, 2), (*scaled(0.5), 1)]
    if name == "vae_decoder_tiled":  # it runs per tile, and only under budgets: measured at the tiles they choose
        return [(t, t, 1) for t in TAIL_TILES]
    return [(h, w, 1), (*scaled(0.75), 1), (*scaled(0.5), 1)]


def profile_component(bundle: Path, component: dict, latent_hw: tuple[int, int], multiple: int,
                      threads: int | None = None, log: Callable[[str], None] = print, scale: int = 8) -> dict:
    """The `memory` entry of a component's manifest record."""
    name = component["name"]
    chunks = component.get("chunks") or [{"file": component["file"],
                                          "inputs": component["inputs"]}]
    files = [bundle / c["file"] for c in chunks]
    reads = [[t["name"] for t in c["inputs"]] for c in chunks]
    runs = []
    for h, w, batch in samples_for(name, latent_hw, multiple):
        dims = {"batch": batch, "height": h, "width": w, "context": 77,  # one prompt window
                "image_height": h * scale, "image_width": w * scale,  # the VAE encoder's input picture
                "hidden_height": h * HIDDEN_SCALE, "hidden_width": w * HIDDEN_SCALE,  # the tail, per latent tile
                **{f"{side}_{s}": -(-n // s) for s in (1, 2, 4, 8, 16) for side, n in (("height", h), ("width", w))}}
        # ^ ControlNet residuals: the latent's side over their stride, rounded up
        inputs = {t["name"]: {"dtype": t["dtype"], "shape": [dims.get(d, d) if isinstance(d, str) else d
                                                             for d in t["shape"]]}
                  for t in component["inputs"]}
        runs.append(((0 if name.startswith("text_encoder") else h * w), batch, probe(files, inputs, reads, threads)))
        log(f"    memory {name} {h}x{w} latent, batch {batch}: " + ", ".join(
            f"resident {g['resident'] / 2**20:.0f} MiB, activation {g['activation'] / 2**20:.0f} MiB"
            for g in runs[-1][2]))
    graphs = []
    for k, f in enumerate(files):
        measured = [(pixels, batch, r[k]) for pixels, batch, r in runs]
        largest = max(measured, key=lambda m: max(m[0], 1) * m[1])
        graphs.append({
            "file": f.name,
            "load_peak": max(m[2]["load_peak"] for m in measured),
            "resident": max(m[2]["resident"] for m in measured),
            "held": max(m[2]["held"] for m in measured),  # what it holds once it has run (edge.memprobe)
            "activation": fit_activation([{"pixels": p, "batch": b, "bytes": m["activation"]} for p, b, m in measured]),
            "carry_fit": {"a": largest[2]["carry"] / max(largest[0] * largest[1], 1)},  # bytes per pixel and batch
            "samples": [{"pixels": p, "batch": b, **{k2: m[k2] for k2 in ("load_peak", "resident", "activation",
                                                                            "held", "carry")}}
                        for p, b, m in measured],
        })
    return {"graphs": graphs, "probe": {"threads": threads, "machine": platform.machine(),
                                        "system": platform.system(), "onnxruntime": _ort_version(),
                                        "cpu_features": features().as_dict()}}


def reprofile(bundle: Path | str, threads: int | None = None, log: Callable[[str], None] = print,
              components: list[str] | None = None) -> None:
    """Measure a finished bundle on this machine and rewrite its manifest's `memory` entries (atomically):
    all the measured components, or only `components` (the others keep their figures)."""
    import json

    from edge.bundle import MANIFEST, read_manifest, write_manifest

    bundle = Path(bundle)
    m = read_manifest(bundle)
    data = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    names = profiled(data["components"])
    unknown = [n for n in components or () if n not in names]
    if unknown:
        raise ValueError(f"{bundle} has no measured component {unknown[0]!r}; choose from {', '.join(names)}")
    latent = tuple(d // m.vae_scale_factor for d in m.default_size)
    multiple = m.size_multiple // m.vae_scale_factor
    for name in components or names:
        record = data["components"][name]
        record["memory"] = profile_component(bundle, {"name": name, **record}, latent, multiple, threads, log,
                                             scale=m.vae_scale_factor)
    write_manifest(bundle, data)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
