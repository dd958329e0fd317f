"""A UNet exported in pieces (converters/pieces.py: how full-size SDXL is converted on a 24 GB machine): the stages
reproduce diffusers' UNet forward exactly, the pieces become the bundle's UNet chunks, and the bundle draws what the
whole-UNet bundle draws, resident or streamed piece by piece under a budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_edge
from edge import Pipeline
from edge.bundle import read_manifest
from edge.metrics import psnr
from edge.plan import make_plan

PROMPT = "a red circle on a blue background"
LATENTS = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)


def _unet_spec(pipe, xl: bool):
    from edge.converters.onnx_export import component_specs
    from edge.converters.sdxl import xl_specs

    return next(s for s in (xl_specs(pipe) if xl else component_specs(pipe)) if s.name == "unet")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_stages_are_the_unet(family):
    """Chained in torch, the pieces give the whole UNet's output (SDXL's added conditions included), and hold
    every one of its weights once."""
    from edge.converters.pieces import piece_specs
    from edge.converters.sdxl import added_widths
    from edge.converters.tiny import tiny_pipeline, tiny_sdxl_pipeline

    xl = family == "sdxl"
    pipe = tiny_sdxl_pipeline(seed=4) if xl else tiny_pipeline()
    spec = _unet_spec(pipe, xl)
    pieces = piece_specs(spec, pipe.unet, added_widths(pipe) if xl else None, 400_000, [(8, 12)])
    assert len(pieces) >= 5
    held = [id(p) for s in pieces for p in s.module.parameters()]
    assert len(held) == len(set(held)) == len(list(pipe.unet.parameters()))
    inputs = spec.example(torch.Generator().manual_seed(0), 8, 12)
    with torch.no_grad():
        whole = spec.module(*inputs)
        env = dict(zip([t["name"] for t in spec.inputs], inputs))
        for piece in pieces:
            env.update(zip([t["name"] for t in piece.outputs], piece.module(*[env[t["name"]] for t in piece.inputs])))
    assert torch.equal(env["noise_pred"], whole)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The tiny SDXL model converted whole and in pieces of at most 0.5 MB (fp32); and its diffusers folder."""
    from edge.converters.tiny import tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("pieces")
    tiny_sdxl_pipeline(seed=4).save_pretrained(root / "model", safe_serialization=True)
    run_edge("convert", root / "model", "--unet-pieces-mb", "0.5", "--no-tiled-vae", "-o", root / "pieces")
    run_edge("convert", root / "model", "--no-tiled-vae", "--no-memory-profile", "-o", root / "whole")
    return root / "pieces", root / "whole", root / "model"


def test_the_pieces_are_the_bundles_unet_chunks(bundles):
    unet = read_manifest(bundles[0]).components["unet"]
    assert len(unet.chunks) >= 5 and len(unet.graphs) == len(unet.chunks)
    assert unet.chunks[0].inputs == ("sample", "timestep", "encoder_hidden_states")
    assert unet.chunks[-1].outputs == ("noise_pred",)
    pieces = json.loads((bundles[0] / "manifest.json").read_text())["components"]["unet"]["pieces"]
    assert unet.parity["psnr_db"] >= 60 and len(pieces) == len(unet.chunks)
    assert all(p["parity"]["psnr_db"] >= 60 for p in pieces)
    assert unet.memory["graphs"] and len(unet.memory["graphs"]) == len(unet.chunks)


def test_pieces_draw_what_the_whole_unet_draws(bundles):
    pictures = [np.asarray(Pipeline.load(b).generate(PROMPT, steps=4, latents=LATENTS, scheduler="euler")
                           .images[0], np.float64) for b in bundles[:2]]
    assert psnr(*pictures, peak=255.0) >= 60


def test_streamed_piece_by_piece_under_a_budget(bundles, tmp_path):
    """Under a budget that holds fewer pieces than there are, the rest are loaded for every UNet call; the picture
    does not change. (The tiny pieces' measured figures are scaled up past the decoder's, so that the UNet is what a
    budget decides, in a copy of the bundle.)"""
    import shutil

    copy = tmp_path / "scaled"
    shutil.copytree(bundles[0], copy)
    data = json.loads((copy / "manifest.json").read_text())
    for g in data["components"]["unet"]["memory"]["graphs"]:
        g["resident"], g["load_peak"] = 100 * g["resident"], 100 * g["load_peak"]
    (copy / "manifest.json").write_text(json.dumps(data))
    free = Pipeline.load(copy)
    plain = np.asarray(free.generate(PROMPT, steps=3, latents=LATENTS).images[0], np.float64)
    manifest, chunks = free.manifest, len(free.manifest.components["unet"].chunks)
    streamed = None
    for mb in range(int(make_plan(manifest, None, 64, 64, base=free._base_rss).peak / 0.75) // 2**20 + 2, 0, -1):
        try:
            plan = make_plan(manifest, mb * 2**20, 64, 64, base=free._base_rss)
        except ValueError:
            break
        if plan.unet_per_call and plan.unet_keep < chunks:
            streamed = mb
            break
    assert streamed is not None, "no budget streams the pieces"
    tight = Pipeline.load(copy, memory_budget=f"{streamed}MB")
    picture = np.asarray(tight.generate(PROMPT, steps=3, latents=LATENTS).images[0], np.float64)
    assert tight.plan.unet_per_call and tight.plan.unet_keep < chunks
    assert psnr(plain, picture, peak=255.0) >= 60


def test_int8_pieces_and_what_is_refused(bundles, tmp_path):
    model = bundles[2]
    run_edge("convert", model, "--unet-pieces-mb", "0.5", "--precision", "int8", "--no-tiled-vae",
             "--no-memory-profile", "-o", tmp_path / "int8")
    unet = read_manifest(tmp_path / "int8").components["unet"]
    assert unet.precision.startswith("int8") and unet.quantization["psnr_vs_fp32_db"] >= 30
    pieces = json.loads((tmp_path / "int8" / "manifest.json").read_text())["components"]["unet"]["pieces"]
    assert all(p["quantization"]["precision"] == "int8" for p in pieces)
    for args, expected in [(["--unet-pieces-mb", "0"], "--unet-pieces-mb must be a finite number > 0, got 0"),
                           (["--unet-pieces-mb", "1", "--split-unet", "2"], "are not built for a UNet exported in "
                                                                            "pieces yet")]:
        proc = run_edge("convert", model, *args, "-o", tmp_path / "x", check=False)
        assert proc.returncode != 0 and expected in proc.stderr.strip().splitlines()[-1], proc.stderr
        assert not (tmp_path / "x").exists()
