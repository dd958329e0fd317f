"""Few-step models say how they are sampled: the bundle records the model's recommended steps, guidance and
scheduler (LCM: lcm, 4 steps, no guidance; Turbo: Euler with trailing timesteps, 1 step, guidance off), `edge
generate` uses them where the user gives none, and an LCM-distilled UNet with a guidance embedding is refused."""

from __future__ import annotations

import pytest

from conftest import run_edge
from edge.bundle import read_manifest
from edge.png import read_params


def _model(tmp_path, scheduler_cls: str, **config):
    import diffusers

    from edge.converters.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=3)
    pipe.scheduler = getattr(diffusers, scheduler_cls).from_config(pipe.scheduler.config, **config)
    pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    return tmp_path / "model"


@pytest.mark.parametrize("cls, config, expected", [
    ("LCMScheduler", {}, {"steps": 4, "guidance": 1.0, "scheduler": "lcm"}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, {"steps": 1, "guidance": 0.0,
                                                                          "scheduler": "euler_a"}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {"steps": 1, "guidance": 0.0, "scheduler": "euler"}),
    ("PNDMScheduler", {}, {"steps": 20, "guidance": 7.5, "scheduler": "euler"}),
], ids=["lcm", "turbo-ancestral", "turbo", "plain"])
def test_the_bundle_recommends_how_to_sample_it(tmp_path, cls, config, expected):
    bundle = tmp_path / "bundle"
    run_edge("convert", _model(tmp_path, cls, **config), "-o", bundle, "--no-memory-profile", "--no-tiled-vae")
    m = read_manifest(bundle)
    assert {k: m.recommended[k] for k in expected} == expected and m.generation_defaults() == expected
    info = run_edge("info", bundle).stdout
    assert f"recommended: {expected['steps']} steps" in info
    out = tmp_path / "o.png"
    run_edge("generate", bundle, "a red circle", "-o", out)
    params = read_params(out)
    assert {k: params[k] for k in expected} == expected  # what the CLI used, written into the picture
    run_edge("generate", bundle, "a red circle", "--steps", "3", "--guidance", "2", "--scheduler", "ddim", "-o", out)
    assert {k: read_params(out)[k] for k in expected} == {"steps": 3, "guidance": 2.0, "scheduler": "ddim"}


def test_an_lcm_distilled_unet_with_a_guidance_embedding_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from edge.converters.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=3)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    pipe.unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 16})
    pipe.save_pretrained(tmp_path / "m", safe_serialization=True)
    proc = run_edge("convert", tmp_path / "m", "-o", tmp_path / "b", check=False)
    assert proc.returncode != 0 and "guidance embedding (time_cond_proj_dim) is not built yet" in proc.stderr
    assert not (tmp_path / "b").exists()
