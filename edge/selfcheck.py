"""Does this device reach the accuracy the bundle's manifest states? `edge check BUNDLE` measures it.

A quantized component's manifest figure (PSNR against its fp32 graph) was measured on the machine that
converted it. The converter also stores what it measured on (`checks/<component>.npz`: the inputs and the
fp32 graph's outputs), so any device can run its own kernels on the same inputs and compare. A device whose
int8 kernels differ (x86 without VNNI before edge.cpu's fix: 34 dB where the manifest said 55) fails here
loudly instead of drawing a worse picture quietly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge.bundle import BundleError, Component, read_manifest, sha256_file, verify_bundle
from edge.cpu import features
from edge.metrics import psnr

CHECKS = "checks"
TOLERANCE_DB = 1.0  # a device passes within this much of the manifest's figure


def write_check(folder: Path, name: str, feeds: dict[str, np.ndarray], expected: list[np.ndarray],
                reference: Path) -> dict[str, Any]:
    """Store `feeds` and the fp32 graph's outputs `expected` beside the bundle's graphs; returns the manifest
    entry. `reference` is the fp32 graph whose output names the outputs are stored under."""
    import onnx  # converter side only

    outputs = [o.name for o in onnx.load(str(reference), load_external_data=False).graph.output]
    path = folder / CHECKS / f"{name}.npz"
    path.parent.mkdir(exist_ok=True)
    arrays = {**{f"input:{k}": v for k, v in feeds.items()}, **{f"output:{k}": v for k, v in zip(outputs, expected)}}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return {"file": f"{CHECKS}/{path.name}", "sha256": sha256_file(path), "outputs": outputs}


def check_bundle(bundle: Path | str, threads: int | None = None, options=None,
                 verify: bool = True) -> list[dict[str, Any]]:
    """Every file against its sha256 (unless `verify=False`), then every component with check data run here:
    its PSNR against fp32 on this CPU beside the manifest's. `options`: onnxruntime SessionOptions to run
    with instead of the runtime's (e.g. onnxruntime's defaults, to see what a device got without edge.cpu)."""
    from edge.sessions import open_session, session_options

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if verify:
        verify_bundle(bundle, manifest)  # graphs and check data included: nothing below hashes again
    options = session_options(threads) if options is None else options
    rows = []
    for component in manifest.components.values():
        entry = component.quantization.get("check")
        if not entry:
            continue
        feeds, expected = load_check(bundle, component, entry)
        env = dict(feeds)
        for graph in component.graphs:  # a split graph runs chunk by chunk; each reads what it needs
            session = open_session(bundle / graph, options)
            names = [o.name for o in session.get_outputs()]
            env.update(zip(names, session.run(names, {i.name: env[i.name] for i in session.get_inputs()})))
            del session
        measured = min(psnr(ref, env[name]) for name, ref in expected.items())
        recorded = float(component.quantization["psnr_vs_fp32_db"])
        rows.append({"component": component.name, "precision": component.precision, "recorded_db": recorded,
                     "measured_db": round(measured, 2), "ok": measured >= recorded - TOLERANCE_DB})
    return rows


def load_check(bundle: Path, component: Component, entry: dict) -> tuple[dict, dict]:
    """A component's check data: its input feeds and the fp32 outputs, by name (checksummed with the bundle)."""
    path = bundle / entry["file"]
    if not path.is_file():
        raise BundleError(f"{component.name}: check data {path} named in the manifest is missing")
    with np.load(path) as data:
        feeds = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
        expected = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("output:")}
    return feeds, expected


def report(rows: list[dict[str, Any]]) -> list[str]:
    """Lines for the CLI: the CPU, then one per component."""
    lines = [f"cpu: {features().describe()}"]
    if not rows:
        return lines + ["no component has check data (fp32 bundle, or converted before edge check existed)"]
    lines.append(f"{'component':<14}{'precision':>12}{'manifest dB':>13}{'here dB':>9}  result")
    for r in rows:
        verdict = "ok" if r["ok"] else f"FAIL: more than {TOLERANCE_DB:g} dB below the manifest"
        lines.append(f"{r['component']:<14}{r['precision']:>12}{r['recorded_db']:>13.2f}{r['measured_db']:>9.2f}  "
                     f"{verdict}")
    return lines
