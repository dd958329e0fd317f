"""Does the default model's mask ControlNet put the object where its control image does? With and without it.

    python benchmarks/controlnet_proof.py [--controlnet converters/assets/controlnets/mask] [--bundle DIR]
        [--out DIR] [--grid benchmarks/images/controlnet_proof.png] [--threads 1]

Converts the default model with the ControlNet (`edge convert default --controlnet DIR:mask`; --bundle reuses a
bundle so converted), then generates on the edge runtime (euler, 20 steps, guidance 5, case k with seed k, the
same seed with and without the control) two deterministic sets:

- `no_word`: every colour x shape (24 prompts, a background and size each, no position word) at 9 places: the 5
  named positions of edge/eval/scenes.py and 4 off the grid (216 cases);
- `wrong_word`: the same 24 prompts naming a position, the control at another named one (120 cases).

The control image is the object's filled mask at that place (train_controlnet.mask_image). Reported per set and
condition: hit rate (the read object's centre within HIT of the control's centre, fractions of the side), mean
centre distance, and the scorer's background / colour / shape accuracy (the prompt still obeyed); `wrong_word`
also how often the object went where the words said. Prints one JSON report.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edge import Pipeline
from edge.converters.convert import Options, convert
from edge.converters.default_model.train_controlnet import centre, mask_image, place
from edge.cpu import cpu_model
from edge.eval.scenes import COLORS, POSITIONS, SHAPES, SIZES, Scene, SceneObject
from edge.eval.scorer import read_scene, score
from edge.stages.control import Control

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "converters" / "assets" / "controlnets" / "mask"
HIT = 0.1  # largest distance, fraction of the side, between read and control centre that counts as a hit
OFF_GRID = ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7))  # >= 0.2 from every named position
WHERE = {"centre": "in the centre", "left": "on the left", "right": "on the right", "top": "at the top",
         "bottom": "at the bottom"}
STEPS, GUIDANCE, SCHEDULER = 20, 5.0, "euler"


@dataclass(frozen=True)
class Case:
    prompt: str
    target: Scene  # the object where the control puts it
    word: tuple[float, float] | None = None  # where the prompt's position word puts it, if it names one
    named: bool = True  # the control's place is one of the named positions (else off the grid)


def _prompt_objects() -> list[tuple[str, str, str, str]]:
    """(colour, shape, size, background) for every colour x shape, the rest chosen by their index."""
    out = []
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        backgrounds = [c for c in COLORS if c != color]
        out.append((color, shape, tuple(SIZES)[i % 2], backgrounds[i % len(backgrounds)]))
    return out


def no_word_cases() -> list[Case]:
    places = [(xy, True) for xy in POSITIONS.values()] + [(xy, False) for xy in OFF_GRID]
    return [Case(f"a {size} {color} {shape} on a {bg} background",
                 Scene(bg, (place(SceneObject(shape, color, size, "centre"), *xy),)), named=named)
            for color, shape, size, bg in _prompt_objects() for xy, named in places]


def wrong_word_cases() -> list[Case]:
    names = list(POSITIONS)
    cases = []
    for i, (color, shape, size, bg) in enumerate(_prompt_objects()):
        for j, at in enumerate(names):
            said = names[(j + 1 + i % 4) % len(names)]  # never `at`
            cases.append(Case(f"a {size} {color} {shape} {WHERE[said]}, {bg} background",
                              Scene(bg, (SceneObject(shape, color, size, at),)), POSITIONS[said]))
    return cases


def run_case(pipe: Pipeline, case: Case, seed: int, controlled: bool) -> tuple[np.ndarray, dict]:
    """The generated (64, 64, 3) image and what the scorer reads of it against the case."""
    obj = case.target.objects[0]
    controls = [Control("mask", mask_image(obj).transpose(2, 0, 1)[None].astype(np.float32) / 255.0)]
    image = np.asarray(pipe.generate(case.prompt, steps=STEPS, guidance=GUIDANCE, scheduler=SCHEDULER, seed=seed,
                                     controls=controls if controlled else ()).images[0])
    objects = read_scene(image)["objects"]
    found = objects[0]["center"] if objects else None
    dist = None if found is None else float(np.hypot(*np.subtract(found, centre(obj))))
    to_word = None if found is None or case.word is None else float(np.hypot(*np.subtract(found, case.word)))
    return image, {"distance": dist, "to_word": to_word, **score(image, case.target)}


def summarize(rows: list[dict]) -> dict:
    """Hit rate, mean centre distance (over images with an object read), scorer accuracies."""
    dists = [r["distance"] for r in rows if r["distance"] is not None]
    out = {"n": len(rows), "hit_rate": float(np.mean([d is not None and d <= HIT for d in
                                                       (r["distance"] for r in rows)])),
           "mean_distance": float(np.mean(dists)) if dists else None, "object_found": len(dists) / len(rows)}
    out |= {k: float(np.mean([r[k] for r in rows])) for k in ("background", "color", "shape")}
    if any(r["to_word"] is not None for r in rows):
        out["at_word_rate"] = float(np.mean([r["to_word"] is not None and r["to_word"] <= HIT for r in rows]))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def evaluate(pipe: Pipeline, cases: list[Case]) -> tuple[dict, list[tuple[np.ndarray, str]]]:
    """Per condition, the summary over all cases, over named and off-grid places; and each case's (control,
    without, with) images side by side (64, 192, 3) with its prompt."""
    rows: dict[str, list[dict]] = {"without": [], "with": []}
    triples = []
    for k, case in enumerate(cases):
        images = [mask_image(case.target.objects[0])]
        for condition in rows:
            image, row = run_case(pipe, case, seed=k, controlled=condition == "with")
            rows[condition].append(row)
            images.append(image)
        triples.append((np.concatenate(images, axis=1), case.prompt))  # (64, 192, 3)
    named = [c.named for c in cases]
    report = {}
    for condition, r in rows.items():
        report[condition] = summarize(r)
        if not all(named):
            report[condition]["named_places"] = summarize([x for x, n in zip(r, named) if n])
            report[condition]["off_grid"] = summarize([x for x, n in zip(r, named) if not n])
    return report, triples


def save_grid(triples: list[tuple[np.ndarray, str]], path: Path, per_row: int = 4, zoom: int = 2) -> None:
    """(control | without | with) images, `per_row` to a row, enlarged `zoom` times, each over its prompt."""
    gap, text = 8, 14
    h, w, _ = triples[0][0].shape
    cell_w, cell_h = w * zoom + gap, text + h * zoom + text + gap
    grid = Image.new("RGB", (per_row * cell_w - gap, -(-len(triples) // per_row) * cell_h - gap), "white")
    draw = ImageDraw.Draw(grid)
    for i, (t, prompt) in enumerate(triples):
        x, y = (i % per_row) * cell_w, (i // per_row) * cell_h
        for k, label in enumerate(("control", "without", "with")):
            draw.text((x + k * w * zoom // 3 + 4, y + 1), label, fill="black")
        grid.paste(Image.fromarray(t).resize((w * zoom, h * zoom), Image.Resampling.NEAREST), (x, y + text))
        draw.text((x + 2, y + text + h * zoom + 1), prompt, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)


def make_bundle(controlnet: Path, out: Path) -> Path:
    convert("default", out, options=Options(controlnets=(f"{controlnet}:mask",), profile_memory=False,
                                            tiled_vae=False), log=lambda s: None)
    return out


def run(bundle: Path, threads: int, grid: Path | None) -> dict:
    pipe = Pipeline.load(bundle, threads=threads)
    t0 = time.perf_counter()
    report = {"cpu": cpu_model(), "threads": threads, "steps": STEPS, "guidance": GUIDANCE, "scheduler": SCHEDULER,
              "hit_threshold": HIT, "bundle_id": pipe.manifest.bundle_id}
    picks = []
    for name, cases in (("no_word", no_word_cases()), ("wrong_word", wrong_word_cases())):
        report[name], triples = evaluate(pipe, cases)
        places = len(cases) // len(_prompt_objects())
        picks += [triples[(5 * i % 24) * places + i % places] for i in range(6)]  # a spread of prompts and places
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if grid is not None:
        save_grid(picks, grid)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--controlnet", type=Path, default=SHIPPED, help="diffusers ControlNetModel folder")
    ap.add_argument("--bundle", type=Path, help="a bundle already converted with this ControlNet as 'mask'")
    ap.add_argument("--out", type=Path, help="convert into this folder (default: a temporary one)")
    ap.add_argument("--grid", type=Path, help="write a PNG of (control | without | with) for 12 cases")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default 1)")
    ap.add_argument("-o", "--output", type=Path, help="also write the report as JSON")
    a = ap.parse_args()
    if a.bundle is None and not (a.controlnet / "config.json").is_file():
        ap.error(f"--controlnet {a.controlnet}: no config.json there; expected a diffusers ControlNetModel folder")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = a.bundle if a.bundle is not None else make_bundle(a.controlnet, a.out or Path(tmp) / "bundle")
        report = run(bundle, a.threads, a.grid)
    text = json.dumps(report, indent=1)
    print(text)
    if a.output is not None:
        a.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
