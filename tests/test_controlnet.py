"""ControlNet: each converted as its own graph, the UNet taking their residuals; run-time scales, several at once
and the guidance window, against diffusers' StableDiffusionControlNetPipeline on the same latents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_edge
from edge import Pipeline
from edge.bundle import read_manifest
from edge.metrics import psnr
from edge.bundle import parse_manifest
from edge.plan import make_plan
from edge.stages.control import Control, control_image, residuals

NET = ("controlnet_edges",)

PROMPT, STEPS, H, W = "a red circle on a blue background", 5, 64, 64
LATENTS = np.random.default_rng(5).standard_normal((1, 4, H // 8, W // 8), dtype=np.float32)


def _tiny_controlnet(unet, seed: int):
    """A ControlNet shaped for `unet` (diffusers' from_unet), random weights throughout: its zero convolutions too,
    so that its residuals move the picture."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.05))
    return net.eval()


@pytest.fixture(scope="module")
def setup(models, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("controlnet")
    pipe = StableDiffusionPipeline.from_pretrained(models["folder-epsilon"], safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    nets = {}
    for k, name in enumerate(("edges", "mask")):
        nets[name] = _tiny_controlnet(pipe.unet, seed=k)
        nets[name].save_pretrained(root / name)
    out = root / "bundle"
    run_edge("convert", models["folder-epsilon"], "--controlnet", root / "edges", "--controlnet",
             f"{root / 'mask'}:mask", "--no-memory-profile", "--no-tiled-vae", "-o", out, timeout=600)
    rng = np.random.default_rng(0)
    images = {n: Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for n in nets}
    return pipe, nets, out, images


def _diffusers(setup, names, scales, start=0.0, end=1.0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline

    pipe, nets, _, images = setup
    cn = [nets[n] for n in names]
    ref = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        controlnet=cn if len(cn) > 1 else cn[0], scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    image = [images[n] for n in names]
    with torch.no_grad():
        out = ref(PROMPT, image=image if len(cn) > 1 else image[0], num_inference_steps=STEPS, guidance_scale=7.5,
                  height=H, width=W, latents=torch.from_numpy(LATENTS), output_type="np",
                  controlnet_conditioning_scale=scales if len(cn) > 1 else scales[0],
                  control_guidance_start=start, control_guidance_end=end)
    return (out.images[0] * 255).round().astype(np.uint8)


def _edge(setup, names, scales, start=0.0, end=1.0, **kw):
    _, _, bundle, images = setup
    controls = [Control(n, control_image(images[n]), s, start, end) for n, s in zip(names, scales)]
    result = Pipeline.load(bundle).generate(PROMPT, steps=STEPS, latents=LATENTS, scheduler="euler", height=H,
                                            width=W, controls=controls, **kw)
    return np.asarray(result.images[0])


@pytest.mark.parametrize("names, scales, window", [
    (["edges"], [1.0], (0.0, 1.0)),
    (["mask"], [0.6], (0.0, 1.0)),
    (["edges", "mask"], [0.8, 0.5], (0.0, 1.0)),
    (["edges"], [1.0], (0.2, 0.6)),
], ids=["one", "scaled", "two-at-once", "guidance-window"])
def test_matches_diffusers_controlnet_pipeline(setup, names, scales, window):
    expected = _diffusers(setup, names, scales, *window)
    ours = _edge(setup, names, scales, *window)
    assert psnr(expected, ours) >= 40
    plain = np.asarray(Pipeline.load(setup[2]).generate(PROMPT, steps=STEPS, latents=LATENTS, scheduler="euler",
                                                        height=H, width=W).images[0])
    assert psnr(plain, ours) < 35  # the ControlNet moves the picture


def test_bundle_records_each_controlnet_and_the_unet_inputs(setup):
    manifest = read_manifest(setup[2])
    assert {"controlnet_edges", "controlnet_mask"} <= set(manifest.components)
    unet = manifest.components["unet"]
    names = [r["name"] for r in unet.control_inputs]
    assert names[-1] == "mid_residual" and names[0] == "down_residual_0"
    assert [t.name for t in manifest.components["controlnet_mask"].outputs] == names
    assert manifest.components["controlnet_mask"].controlnet["name"] == "mask"
    assert all(c.parity["psnr_db"] > 60 for c in manifest.components.values())


def test_cli_and_clear_errors(setup, tmp_path):
    _, _, bundle, images = setup
    images["edges"].save(tmp_path / "edges.png")
    images["edges"].resize((W * 2, H)).save(tmp_path / "wide.png")
    run_edge("generate", bundle, PROMPT, "--control", f"{tmp_path / 'edges.png'}:edges:0.7", "--steps", "3",
             "-o", tmp_path / "a.png")
    params = json.loads(Image.open(tmp_path / "a.png").text["edge"])
    assert params["controls"] == [{"name": "edges", "scale": 0.7, "start": 0.0, "end": 1.0}]
    for args, expected in [
        (["--control", f"{tmp_path / 'wide.png'}:edges"], "control image for edges is 128x64; this generation is "
                                                          "64x64"),
        (["--control", f"{tmp_path / 'edges.png'}"], "say which ControlNet (IMAGE:NAME[:SCALE]); this bundle has "
                                                     "edges, mask"),
        (["--control", f"{tmp_path / 'edges.png'}:edges:inf"], "scale inf is not a finite number"),
        (["--control", f"{tmp_path / 'edges.png'}:edges", "--control-start", "0.8", "--control-end", "0.5"],
         "expected 0 <= start < end <= 1"),
    ]:
        proc = run_edge("generate", bundle, PROMPT, *args, "--steps", "2", "-o", tmp_path / "x.png", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and expected in lines[0], (args, proc.stderr)
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def measured(setup, models, tmp_path_factory):
    """The same ControlNet in an int8 bundle with memory measurements and a split UNet (the planner's inputs)."""
    out = tmp_path_factory.mktemp("controlnet-measured") / "bundle"
    root = setup[2].parent
    run_edge("convert", models["folder-epsilon"], "--controlnet", root / "edges", "--split-unet", "2",
             "--precision", "int8", "--no-tiled-vae", "-o", out, timeout=900)
    return out


def test_int8_controlnet_and_the_memory_plan(setup, measured):
    """The ControlNet is stored at the UNet's precision; the planner counts it as a stage of the denoiser:
    resident when the budget allows, else loaded for every UNet call; the picture is the same either way."""
    manifest = read_manifest(measured)
    net = manifest.components["controlnet_edges"]
    assert net.precision.startswith("int8") and net.quantization["psnr_vs_fp32_db"] > 30
    assert net.memory["graphs"][0]["resident"] > 0
    control = [Control("edges", control_image(setup[3]["edges"]), 0.9)]
    free = Pipeline.load(measured)
    pictures = {"free": np.asarray(free.generate(PROMPT, steps=3, latents=LATENTS, height=H, width=W,
                                                 controls=control).images[0])}
    budget = f"{int(make_plan(manifest, None, H, W, base=free._base_rss, controlnets=NET).peak / 0.75) // 2**20}MB"
    tight = Pipeline.load(measured, memory_budget=budget)
    result = tight.generate(PROMPT, steps=3, latents=LATENTS, height=H, width=W, controls=control)
    assert psnr(np.asarray(result.images[0]), pictures["free"]) >= 60 and "ControlNets" in tight.plan.describe()
    # per call: the same residuals from a session made for the call as from the kept one
    x = np.random.default_rng(0).standard_normal((2, 4, H // 8, W // 8), dtype=np.float32)
    context = np.random.default_rng(1).standard_normal((2, 77, 32), dtype=np.float32)
    kept, loaded = (residuals(free.graphs, control, x, 500.0, context, 0, 3, per_call=p) for p in (False, True))
    assert kept.keys() == loaded.keys() and all(np.array_equal(kept[k], loaded[k]) for k in kept)


def test_the_planner_loads_controlnets_per_call_when_only_that_fits(measured):
    """With the ControlNet's measured figures scaled up past everything else (the stage it is in is then what a
    budget decides), the plans go from everything resident, to stages, to the ControlNet loaded for every call
    as the budget falls: for a UNet streamed chunk by chunk, a ControlNet loaded per call is not held beside the
    chunk being loaded."""
    data = json.loads((measured / "manifest.json").read_text())
    graphs = [g for c in data["components"].values() for g in c.get("memory", {}).get("graphs", ())]
    net = data["components"]["controlnet_edges"]["memory"]["graphs"][0]
    net["resident"] = net["load_peak"] = 10 * sum(g["resident"] for g in graphs)
    manifest = parse_manifest(data, "scaled")
    kinds = []
    top = make_plan(manifest, None, H, W, controlnets=NET).peak
    for mb in range(int(top / 0.75) // 2**20 + 2, 0, -1):
        try:
            plan = make_plan(manifest, mb * 2**20, H, W, controlnets=NET)
        except ValueError:
            break
        kind = "resident" if plan.resident else "per call" if plan.control_per_call else "staged"
        kinds += [kind] if not kinds or kinds[-1] != kind else []
    assert kinds[0] == "resident" and kinds[-1] == "per call", kinds
