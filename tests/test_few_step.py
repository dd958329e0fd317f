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
    plan = run_edge("plan", bundle, "--memory-budget", "64GB", check=False)  # planned for the guidance it runs at
    assert f"1 image(s), guidance {expected['guidance']:g}\n" in plan.stdout, plan.stdout + plan.stderr
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
