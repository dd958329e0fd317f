"""`edge bench` results on disk: versioned JSON, a markdown table and a PNG plot (drawn with Pillow, so the
device needs nothing new). `compare` renders several result files as one table and one plot.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from edge.memory import format_bytes

SCHEMA_VERSION = 1
STAGE_COLORS = {"load": "#9a9a9a", "text_encoder": "#4e79a7", "unet": "#f28e2b", "vae_decoder": "#59a14f"}
STAGES = (("cold start", "#9a9a9a"), ("text encoder", "#4e79a7"), ("UNet (all steps)", "#f28e2b"),
          ("VAE decode", "#59a14f"))
LINE_COLORS = ("#e15759", "#4e79a7", "#59a14f", "#b07aa1", "#9c755f", "#76b7b2", "#edc948", "#ff9da7")


def write_results(results: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(results), encoding="utf-8")
    plot([(results["label"], r) for r in results["runs"] if r.get("ok")], results["label"]).save(paths["plot"])
    return paths


def read_results(path: Path) -> dict[str, Any]:
    """A results.json, checked to be one this version can read."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no bench results at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(version, int) or "runs" not in data:
        raise ValueError(f"{path}: not an edge bench results file (no schema_version / runs)")
    if version > SCHEMA_VERSION:
        raise ValueError(f"{path}: results schema version {version} is newer than this edge reads "
                         f"({SCHEMA_VERSION}); upgrade edge-diffusion")
    return data


def compare(paths: list[Path], out: Path) -> dict[str, Path]:
    """One table and one plot of every run in the result files at `paths`."""
    if len(paths) < 2:
        raise ValueError(f"compare needs at least two result files, got {len(paths)}")
    files = [(Path(p), read_results(p)) for p in paths]
    runs = [(f"{d['label']}", r) for _, d in files for r in d["runs"] if r.get("ok")]
    out.mkdir(parents=True, exist_ok=True)
    paths_out = {"json": out / "compare.json", "markdown": out / "compare.md", "plot": out / "compare.png"}
    lines = ["# edge bench compare", ""]
    for p, d in files:
        lines.append(f"- **{d['label']}** ({p}): {_setup_line(d)}")
    lines += ["", *_table(runs, with_label=True), ""]
    paths_out["markdown"].write_text("\n".join(lines), encoding="utf-8")
    merged = {"schema_version": SCHEMA_VERSION, "kind": "edge-bench-compare",
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "sources": [str(p) for p, _ in files], "results": [d for _, d in files]}
    paths_out["json"].write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    plot(runs, "compare").save(paths_out["plot"])
    return paths_out


def markdown(r: dict[str, Any]) -> str:
    s, b = r["system"], r["bundle"]
    edge_run = r["runs"][0]
    lines = [
        f"# edge bench: {r['label']}", "",
        f"{r['created_at']} · {s['cpu_model']} · {s['cpus_available']} of {s['logical_cpus']} CPUs · "
        f"{format_bytes(s['total_memory_bytes'] or 0)} RAM · {s['os']} · {s['architecture']} · "
        f"onnxruntime {edge_run['versions']['onnxruntime']} ({edge_run['execution_provider']}) · "
        f"threads {'default' if r['config']['threads'] is None else r['config']['threads']}"
        + (f" · int8: {s['cpu_features']['int8_path']}" if s.get("cpu_features") else ""), "",
        f"Bundle `{b['path']}` ({b['bundle_id']}, {b['family']}, {b['prediction_type']}; "
        f"{format_bytes(b['bytes_on_disk'])} on disk). {_setup_line(r)}", "",
        *_table([(r["label"], run) for run in r["runs"] if run.get("ok")], with_label=False), "",
        "Cold start = imports + loading (edge: onnxruntime session creation and sha256 checks; sessions: "
        + (", ".join(f"{k} {v:.2f} s" for k, v in edge_run["sessions_s"].items())
           or "none, a budget's stages open their graphs during generation")
        + f"; sha256 checks and the rest {edge_run['load_other_s']:.2f} s). "
        "Text encoder and VAE decode: per generation. End-to-end: one generation, model loaded (median "
        "over repeats). Peak RSS: whole process, the kernel's high-water mark.", "",
    ]
    fastest = r.get("fastest")
    if fastest:
        o, e = fastest["overall"], fastest["edge"]
        lines += [f"Fastest UNet call on this machine: **{o['name']}**, {o['runtime']}, {o['unet_call_s']:.3f} s"
                  + ("" if e is None or e["name"] == o["name"] else
                     f"; edge's fastest: **{e['name']}**, {e['runtime']}, {e['unet_call_s']:.3f} s") + ".", ""]
    if r["ratios"]:
        lines += ["## edge / peer (below 1: edge is faster or smaller)", "",
                  "| peer | UNet per call | end-to-end | peak RSS | cold start |", "|---|---:|---:|---:|---:|"]
        for peer, q in r["ratios"].items():
            lines.append(f"| {peer} | " + " | ".join(_x(q[k]) for k in ("unet_call", "end_to_end", "peak_rss",
                                                                         "cold_start")) + " |")
        lines.append("")
    lines += ["## Fidelity", "", "| component | PSNR dB vs torch | max abs diff |", "|---|---:|---:|"]
    for name, p in r["fidelity"]["bundle_parity"].items():
        lines.append(f"| {name} | {p.get('psnr_db', float('nan')):.1f} | {p.get('max_abs_diff', float('nan')):.2e} |")
    for peer, f in r["fidelity"]["image_vs_peers"].items():
        same = "identical pixels" if f["max_abs_diff"] == 0 else \
            f"PSNR {f['psnr_db']:.1f} dB, max |diff| {f['max_abs_diff']:.0f}/255"
        lines.append(f"\nImage against {peer} (same latents and scheduler): {same}.")
    budget = r["memory_budget"]
    if budget["bytes"] is not None:
        verdict = "fits" if budget["within"] else "DOES NOT FIT"
        lines.append(f"\nMemory budget {format_bytes(budget['bytes'])}: edge's peak "
                     f"{format_bytes(budget['peak_rss_bytes'])} {verdict}.")
    notes: dict[str, list[str]] = {}
    for run in r["runs"]:
        for note in run.get("notes") or []:
            notes.setdefault(note, []).append(run["name"])
    for note, names in notes.items():
        lines.append(f"\n{', '.join(names)}: {note}.")
    for peer, why in r["skipped_peers"].items():
        lines.append(f"\nPeer {peer} not run: {why}.")
    for run in r["runs"]:
        if not run.get("ok"):
            lines.append(f"\nPeer {run['name']} failed: {run['error']}.")
    return "\n".join(lines) + "\n"


def _setup_line(r: dict[str, Any]) -> str:
    c = r["config"]
    return (f"{c['width']}x{c['height']}, {c['steps']} steps, {c['scheduler']}, guidance {c['guidance']} "
            f"(UNet batch {2 if c['guidance'] > 1 else 1}), {c['repeat']} generation(s), "
            f"arch {c['arch'] or 'from bundle'}{' (random weights)' if c['random_weights'] else ''}")


def _table(runs: list[tuple[str, dict]], with_label: bool) -> list[str]:
    head = ("| " + ("results | " if with_label else "") + "runtime | cold start s | text encoder s | "
            "UNet s/call median | UNet s/call p90 | VAE decode s | end-to-end s | first image s | peak RSS |")
    rows = [head, "|" + "---|" * (1 + with_label) + "---:|" * 8]
    for label, run in runs:
        cells = ([label] if with_label else []) + [
            run["runtime"], _s(run["cold_start_s"]), _s(run["text_encoder_s"].get("median")),
            _s(run["unet_call_s"].get("median")), _s(run["unet_call_s"].get("p90")),
            _s(run["vae_decode_s"].get("median")), _s(run["end_to_end_s"].get("median")),
            _s(run["first_image_s"]), format_bytes(run["peak_rss_bytes"])]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _s(v: float | None) -> str:
    return "–" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


# ---- the plot: stage breakdown (stacked bars) above memory over time (lines) ----

def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _ticks(top: float, n: int = 5) -> list[float]:
    """Round tick values from 0 to at least `top`."""
    top = max(top, 1e-9)
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


def plot(runs: list[tuple[str, dict]], title: str, width: int = 1100) -> Image.Image:
    names = [f"{label}: {run['name']}" if title == "compare" else run["name"] for label, run in runs]
    bar_names = [f"{label}: {run['runtime']}" if title == "compare" else run["runtime"] for label, run in runs]
    bar_h, left, right = 26, 330, 90
    top_a = 60
    height_a = top_a + 30 + len(runs) * (bar_h + 10)
    chart_top, chart_h = height_a + 60, 300
    strips = 6 * len(runs) + 4  # below the chart: one strip per run, coloured by the stage running
    img = Image.new("RGB", (width, chart_top + chart_h + strips + 70 + 22 * ((len(runs) + 2) // 3)), "white")
    d = ImageDraw.Draw(img)
    f_title, f, f_small = _font(18), _font(13), _font(11)
    d.text((16, 12), f"edge bench: {title}", fill="black", font=f_title)
    d.text((16, 38), "Where the time goes (cold start, then one generation; medians)", fill="#333", font=f)

    segments = [[run["cold_start_s"], run["text_encoder_s"].get("median") or 0,
                 (run["unet_call_s"].get("median") or 0) * run["unet_calls_per_generation"],
                 run["vae_decode_s"].get("median") or 0] for _, run in runs]
    scale_max = max((sum(s) for s in segments), default=1) or 1
    plot_w = width - left - right
    x = 16 + left
    for k, (label, seg) in enumerate(zip(bar_names, segments)):
        y = top_a + 30 + k * (bar_h + 10)
        d.text((16, y + 6), _fit(d, label, left - 10, f), fill="black", font=f)
        for (_, color), v in zip(STAGES, seg):
            w = plot_w * v / scale_max
            d.rectangle([x, y, x + w, y + bar_h], fill=color)
            x += w
        d.text((x + 6, y + 6), f"{sum(seg):.1f} s", fill="black", font=f)
        x = 16 + left
    lx = 16 + left
    for stage, color in STAGES:
        d.rectangle([lx, top_a + 8, lx + 12, top_a + 20], fill=color)
        d.text((lx + 16, top_a + 7), stage, fill="black", font=f_small)
        lx += 30 + int(d.textlength(stage, font=f_small))

    d.text((16, chart_top - 32), "Memory over time (resident set size, whole process, sampled every ~50 ms; "
           "below it, the stage running: grey load, blue text encoder, orange UNet, green VAE)",
           fill="#333", font=f)
    cx0, cx1, cy0, cy1 = 16 + 60, width - 30, chart_top, chart_top + chart_h
    t_max = max((max(r["memory_timeline"]["t_s"], default=0) for _, r in runs), default=1) or 1
    peak_max = max((r["peak_rss_bytes"] for _, r in runs), default=1) or 1
    gb, unit = (1024 ** 3, "GB") if peak_max >= 1024 ** 3 else (1024 ** 2, "MB")
    y_ticks, x_ticks = _ticks(peak_max / gb), _ticks(t_max, 8)
    y_top, x_top = y_ticks[-1] or 1, x_ticks[-1] or 1
    for v in y_ticks:
        y = cy1 - (cy1 - cy0) * v / y_top
        d.line([cx0, y, cx1, y], fill="#e4e4e4")
        d.text((16, y - 7), f"{v:g} {unit}", fill="#555", font=f_small)
    for v in x_ticks:
        xx = cx0 + (cx1 - cx0) * v / x_top
        d.line([xx, cy0, xx, cy1], fill="#f0f0f0")
        d.text((xx - 8, cy1 + strips + 2), f"{v:g}s", fill="#555", font=f_small)
    d.rectangle([cx0, cy0, cx1, cy1], outline="#888")
    for k, (_, run) in enumerate(runs):
        color = LINE_COLORS[k % len(LINE_COLORS)]
        tl = run["memory_timeline"]
        pts = [(cx0 + (cx1 - cx0) * t / x_top, cy1 - (cy1 - cy0) * (m / gb) / y_top)
               for t, m in zip(tl["t_s"], tl["rss_bytes"])]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        sy = cy1 + 4 + 6 * k
        d.rectangle([cx0 - 12, sy, cx0 - 4, sy + 4], fill=color)
        for st in run.get("stages", []):
            d.rectangle([cx0 + (cx1 - cx0) * st["start_s"] / x_top, sy,
                         max(cx0 + (cx1 - cx0) * st["end_s"] / x_top, cx0 + (cx1 - cx0) * st["start_s"] / x_top + 1),
                         sy + 4], fill=STAGE_COLORS.get(st["stage"], "#cccccc"))
        py = cy1 - (cy1 - cy0) * (run["peak_rss_bytes"] / gb) / y_top
        d.line([cx1 - 14, py, cx1, py], fill=color, width=3)  # the kernel's peak, at the right edge
        ly = cy1 + strips + 26 + 22 * (k // 3)
        lx = 16 + (k % 3) * ((width - 32) // 3)
        d.rectangle([lx, ly + 3, lx + 18, ly + 9], fill=color)
        d.text((lx + 24, ly), _fit(d, f"{names[k]}: peak {format_bytes(run['peak_rss_bytes'])} (mark at right edge)",
                                   (width - 32) // 3 - 30, f_small), fill="black", font=f_small)
    return img


def _fit(d: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    if d.textlength(text, font=font) <= width:
        return text
    while text and d.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
