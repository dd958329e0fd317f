"""The shipped mask ControlNet of the default model puts the object where its control image does, at places the
prompt does not name, clearly more often than the model alone (benchmarks/controlnet_proof.py measures it at
length); and it still draws the colour the prompt asks for."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import REPO, run_edge
from edge import Pipeline
from edge.bundle import read_manifest
from edge.converters.default_model.train_controlnet import centre, mask_image, place
from edge.eval.scenes import SceneObject
from edge.eval.scorer import read_scene
from edge.stages.control import Control

MODEL = REPO / "converters" / "assets" / "default_model"
SHIPPED = REPO / "converters" / "assets" / "controlnets" / "mask"
HIT = 0.1  # read centre within this of the control's, fractions of the side
# (colour, shape, size, background, control centre): no prompt names a position; none of the places is the
# centre, where the model alone puts most objects
CASES = [
    ("red", "circle", "small", "blue", (0.25, 0.5)), ("yellow", "square", "large", "black", (0.75, 0.5)),
    ("green", "triangle", "small", "white", (0.5, 0.25)), ("blue", "diamond", "large", "yellow", (0.5, 0.75)),
    ("white", "circle", "large", "red", (0.3, 0.3)), ("black", "square", "small", "green", (0.7, 0.7)),
    ("red", "diamond", "small", "white", (0.7, 0.3)), ("yellow", "triangle", "large", "blue", (0.3, 0.7)),
]


@pytest.fixture(scope="module", params=["fp32", "static-int8"])
def bundle(request, tmp_path_factory):
    """The default model's folder (the weights `edge convert default` converts, without its tiny autoencoder,
    which this test does not use: half the conversion time) with the shipped ControlNet; fp32, and int8 with
    static activations (the UNet and the ControlNet calibrated on trajectories the ControlNet steers)."""
    out = tmp_path_factory.mktemp("controlnet-proof") / "bundle"
    static = ["--precision", "int8", "--activations", "static"] if request.param == "static-int8" else []
    run_edge("convert", MODEL, "--controlnet", f"{SHIPPED}:mask", "--no-memory-profile", "--no-tiled-vae", *static,
             "-o", out)
    return out


def test_static_int8_calibrates_the_controlnet_too(bundle, tmp_path):
    components = read_manifest(bundle).components
    unet, net = (components[n].quantization for n in ("unet", "controlnet_mask"))
    if components["unet"].precision == "fp32":
        assert unet == net == {}
        return
    options = ort.SessionOptions()  # onnxruntime fuses the ControlNet's calibrated convolutions into QLinearConv
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(bundle / components["controlnet_mask"].file), options, providers=["CPUExecutionProvider"])
    assert sum(n.op_type == "QLinearConv" for n in onnx.load(options.optimized_model_filepath).graph.node) >= 10
    assert unet["activations"] == net["activations"] == "static"
    # 2 prompts x 4 Euler steps; the UNet on each step with the ControlNet's residuals and with zeros
    assert (unet["calibration_samples"], net["calibration_samples"]) == (16, 8)
    assert net["psnr_inputs"] == "held-out denoising trajectory" and net["psnr_vs_fp32_db"] >= 35.0
    assert unet["psnr_vs_fp32_db"] >= 35.0


def test_shipped_controlnet_is_small_and_says_how_it_was_trained():
    log = json.loads((SHIPPED / "train_log.json").read_text())
    assert {"seed", "steps", "recipe", "seconds", "losses"} <= set(log)
    assert sum(f.stat().st_size for f in SHIPPED.glob("*.safetensors")) < 5_000_000
    assert not list(SHIPPED.glob("*.bin"))


def test_the_object_lands_where_the_control_puts_it(bundle):
    pipe = Pipeline.load(bundle, threads=1)
    hits = {"without": 0, "with": 0}
    colours = 0
    for seed, (color, shape, size, background, xy) in enumerate(CASES):
        obj = place(SceneObject(shape, color, size, "centre"), *xy)
        control = Control("mask", mask_image(obj).transpose(2, 0, 1)[None].astype(np.float32) / 255.0)
        for condition, controls in (("without", []), ("with", [control])):
            image = pipe.generate(f"a {size} {color} {shape} on a {background} background", steps=20, guidance=5.0,
                                  scheduler="euler", seed=seed, controls=controls).images[0]
            objects = read_scene(np.asarray(image))["objects"]
            found = objects[0]["center"] if objects else (-1.0, -1.0)
            hits[condition] += float(np.hypot(*np.subtract(found, centre(obj)))) <= HIT
            colours += condition == "with" and bool(objects) and objects[0]["color"] == color
    assert hits["with"] >= 6 and hits["with"] >= hits["without"] + 4, hits
    assert colours >= 6, f"with the ControlNet the prompt's colour was drawn in {colours}/{len(CASES)}"
