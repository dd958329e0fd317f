"""Few-step models say how they are sampled: the bundle records the model's recommended steps, guidance and
scheduler (LCM: lcm, 4 steps, no guidance; Turbo: Euler with trailing timesteps, 1 step, guidance off), `edge
generate` uses them where the user gives none, and an LCM-distilled UNet with a guidance embedding is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def _lcm_distilled(tmp_path):
    """A tiny LCM-distilled model: its UNet takes the guidance scale as an embedding (time_cond_proj_dim)."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    from edge.converters.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=3)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 32})
    torch.manual_seed(5)
    for p in unet.time_embedding.cond_proj.parameters():  # diffusers starts it at zero: make guidance count
        torch.nn.init.normal_(p, std=0.5)
    pipe.unet = unet
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "lcm", safe_serialization=True)
    return tmp_path / "lcm"


def test_an_lcm_distilled_unet_matches_diffusers(tmp_path):
    """The guidance embedding is the graph's input, computed in numpy as diffusers computes it; one pass per
    step, no unconditional one; images as LatentConsistencyModelPipeline draws them (1 step: no noise between
    steps, which each side draws from its own generator) at two guidance scales; each UNet call of a 4-step run
    matches diffusers' UNet on the same inputs. What is not built with it is refused by name."""
    from diffusers import LatentConsistencyModelPipeline

    from edge import Pipeline
    from edge.metrics import psnr
    from edge.stages.guidance_embedding import guidance_embedding

    model, bundle = _lcm_distilled(tmp_path), tmp_path / "bundle"
    run_edge("convert", model, "-o", bundle, "--no-tiled-vae")
    m = read_manifest(bundle)
    assert m.generation_defaults() == {"steps": 4, "guidance": 8.5, "scheduler": "lcm"}
    plan = run_edge("plan", bundle, "--memory-budget", "64GB").stdout  # planned as it runs: 8.5, one pass per step
    assert "1 image(s), guidance 8.5\n" in plan and "one call per step" in plan, plan
    assert [t.name for t in m.components["unet"].inputs][-1] == "timestep_cond"
    reference = LatentConsistencyModelPipeline.from_pretrained(model, safety_checker=None, local_files_only=True,
                                                               requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    w = torch.tensor([7.5, 0.0])
    assert np.allclose(guidance_embedding(8.5, 32, 1)[0], reference.get_guidance_scale_embedding(w, 32)[0], atol=1e-4)
    ours = Pipeline.load(bundle)
    latents = np.random.default_rng(4).standard_normal((1, 4, 8, 8), dtype=np.float32)
    for guidance in (8.5, 3.0):
        with torch.no_grad():
            want = reference("a red circle", num_inference_steps=1, guidance_scale=guidance, height=64, width=64,
                             latents=torch.from_numpy(latents), output_type="np").images[0]
        want = (want * 255).round()
        got = np.asarray(ours.generate("a red circle", steps=1, guidance=guidance, latents=latents).images[0],
                         np.float64)
        assert psnr(want, got, peak=255.0) >= 40
    calls = []
    real_unet = reference.unet.forward

    def recorded(sample, t, encoder_hidden_states, timestep_cond=None, **kw):
        out = real_unet(sample, t, encoder_hidden_states, timestep_cond=timestep_cond, **kw)
        calls.append((sample.numpy().copy(), float(t), encoder_hidden_states.numpy().copy(), out[0].numpy().copy()))
        return out

    reference.unet.forward = recorded  # records what diffusers' UNet sees and says, at every step
    with torch.no_grad():
        reference("a red circle", num_inference_steps=4, guidance_scale=8.5, height=64, width=64,
                  latents=torch.from_numpy(latents), output_type="np")
    assert len(calls) == 4 and all(c[0].shape[0] == 1 for c in calls)  # one conditional pass per step
    for sample, t, context, noise in calls:
        mine = ours.unet(sample, t, context, inputs={"timestep_cond": guidance_embedding(8.5, 32, 1)})
        assert psnr(noise.astype(np.float64), mine.astype(np.float64)) >= 40
        other = ours.unet(sample, t, context, inputs={"timestep_cond": guidance_embedding(3.0, 32, 1)})
        assert np.abs(mine - other).max() > 10 * np.abs(noise - mine).max()  # the guidance scale counts
    proc = run_edge("convert", model, "-o", tmp_path / "b", "--deep-cache", check=False)
    assert proc.returncode != 0 and "--deep-cache with an LCM-distilled UNet" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_edge_serve_samples_a_turbo_bundle_as_it_recommends(tmp_path):
    """A request that leaves out steps, guidance and the sampler gets the bundle's recommendation on both APIs
    (SD-Turbo: 1 Euler step without guidance), and the page is told it; given values win."""
    import json
    import time

    httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")
    pytest.importorskip("uvicorn", reason="edge serve needs the serve extra (pip install -e '.[serve]')")
    from servers import start, stop

    bundle = tmp_path / "turbo"
    run_edge("convert", _model(tmp_path, "EulerDiscreteScheduler", timestep_spacing="trailing"), "-o", bundle,
             "--no-memory-profile", "--no-tiled-vae")
    proc, url = start([bundle], tmp_path / "outputs", tmp_path / "server.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            recommended = {"steps": 1, "guidance": 0.0, "scheduler": "euler"}
            assert c.get("/api/info").json()["bundles"][0]["defaults"] == recommended

            def page_job(**fields) -> dict:
                job_id = c.post("/api/jobs", json={"prompt": "a red circle", **fields}).json()["id"]
                deadline = time.monotonic() + 60
                while (job := c.get(f"/api/jobs/{job_id}").json())["state"] not in ("done", "failed"):
                    assert time.monotonic() < deadline, job
                    time.sleep(0.05)
                assert job["state"] == "done", job
                return job["image"]["params"]

            params = page_job()
            assert {k: params[k] for k in recommended} == recommended
            params = page_job(steps=2, guidance=3.0, scheduler="ddim")
            assert {k: params[k] for k in recommended} == {"steps": 2, "guidance": 3.0, "scheduler": "ddim"}
            info = json.loads(c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle"}).json()["info"])
            assert (info["steps"], info["cfg_scale"], info["sampler_name"]) == (1, 0.0, "Euler")
            info = json.loads(c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "cfg_scale": 4,
                                                               "sampler_name": "DDIM"}).json()["info"])
            assert (info["steps"], info["cfg_scale"], info["sampler_name"]) == (2, 4.0, "DDIM")
    finally:
        stop(proc, tmp_path / "server.log")
