"""`edge bench --peers sdcpp-q8_0,sdcpp-q4_0`: stable-diffusion.cpp (ggml, through stable-diffusion-cpp-python),
compiled here into its own environment.

stable-diffusion.cpp builds SD 1.x's networks at their published sizes and refuses any other file ("get sd
version from file failed" for the tiny test models), so its real run takes SD 1.5's architecture with random
weights, at 64x64 and 2 steps: the bundle `edge bench --arch sd15 --random-weights` caches. It skips where the
sdcpp environment (CI does not build it) or that bundle is absent; the refusals run everywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from test_bench import run_bench


def test_uninstalled_sdcpp_is_skipped_with_the_install_command(tmp_path, monkeypatch):
    from edge.bench import _prepare_peers
    from edge.converters.arch import config_dir

    monkeypatch.setenv("EDGE_CACHE_DIR", str(tmp_path))  # no peer environments here
    skipped: dict[str, str] = {}
    # SD 1.5's published configs (no weights): the shapes sd.cpp builds, so only the environment is missing
    ready = _prepare_peers({"sdcpp-q8_0"}, False, config_dir("sd15"), {}, skipped, log=lambda s: None)
    assert ready == {} and list(skipped) == ["sdcpp-q8_0"]
    why = skipped["sdcpp-q8_0"]
    assert str(tmp_path / "peers" / "sdcpp") in why and "`edge bench --peers sdcpp-q8_0,sdcpp-q4_0` creates it" in why
    assert ("CMAKE_ARGS=-DGGML_NATIVE=ON CMAKE_BUILD_PARALLEL_LEVEL=2 pip install --no-binary "
            "stable-diffusion-cpp-python stable-diffusion-cpp-python==0.4.7") in why
    assert "\n" not in why
    assert not (tmp_path / "peers").exists()  # nothing built without being asked


@pytest.mark.parametrize("peers, expected", [
    ("sdcpp-q5_0", "unknown peer(s) sdcpp-q5_0; known: diffusers, optimum, openvino, openvino-f32, diffusers-int8, optimum-int8, "
                   "openvino-int8, sdcpp-q8_0, sdcpp-q4_0"),
    # named, but the tiny model is not SD 1.x-sized: refused before anything is built or converted
    ("sdcpp-q8_0", "peer sdcpp-q8_0 cannot run: stable-diffusion.cpp builds SD 1.x's networks at their published "
                   "sizes only"),
])
def test_sdcpp_requests_it_cannot_serve_give_one_clear_line(bundles, tmp_path, peers, expected):
    env = {**os.environ, "EDGE_CACHE_DIR": str(tmp_path)}
    proc = run_bench(bundles["folder-epsilon"], "--steps", "2", "--peers", peers, "-o", tmp_path / "o", env=env,
                     timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not (tmp_path / "peers").exists() and not (tmp_path / "sdcpp").exists()


def test_sdcpp_refuses_a_sampler_it_does_not_have():
    from edge.bench_host import sdcpp_problem
    from edge.converters.arch import config_dir

    assert sdcpp_problem(config_dir("sd15"), "euler") == ""
    assert sdcpp_problem(config_dir("sd15"), "pndm") == (
        "stable-diffusion.cpp has no sampler of edge's 'pndm' algorithm; use --scheduler euler, euler_a, dpmpp_2m, "
        "dpmpp_2m_karras, lcm")


def _sdcpp_cache(cache: Path) -> tuple[dict, Path, Path]:
    """An environment whose cache has only the sdcpp environment the harness made, and the cached SD 1.5
    random-weight bundle and model (skip where either is absent): the test's checkpoint and gguf files are its own."""
    from edge.bench_host import cache_dir

    venv = cache_dir() / "peers" / "sdcpp"
    if not (venv / ".installed").is_file():
        pytest.skip(f"the sdcpp peer's environment {venv} does not exist (it compiles stable-diffusion.cpp: ~3 min "
                    "on 2 cores; `edge bench --arch sd15 --random-weights --peers sdcpp-q8_0` builds it once)")
    bundle, model = cache_dir() / "bundles" / "sd15-random", cache_dir() / "models" / "sd15-random"
    if not ((bundle / "manifest.json").is_file() and (model / "model_index.json").is_file()):
        pytest.skip(f"stable-diffusion.cpp loads SD 1.x only at its published size, and {bundle} is not built "
                    "(`edge bench --arch sd15 --random-weights --no-peers --steps 1` builds it, ~6 min)")
    (cache / "peers").mkdir(parents=True)
    (cache / "peers" / "sdcpp").symlink_to(venv)
    return {**os.environ, "EDGE_CACHE_DIR": str(cache)}, bundle, model


def test_sdcpp_peers_when_their_environment_exists(tmp_path):
    cache = tmp_path / "cache"
    env, bundle, model = _sdcpp_cache(cache)
    out = tmp_path / "o"
    proc = run_bench(bundle, "--peer-model", model, "--height", "64", "--width", "64", "--steps", "2",
                     "--threads", "2", "--peers", "sdcpp-q8_0,sdcpp-q4_0", "-o", out, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "[sdcpp-q8_0] converting" in proc.stderr and "step 2/2" in proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert [run["name"] for run in r["runs"]] == ["edge", "sdcpp-q8_0", "sdcpp-q4_0"]
    for run, wtype in zip(r["runs"][1:], ("q8_0", "q4_0")):
        assert run["ok"] and run["execution_provider"] == "ggml CPU" and run["threads"] == 2
        assert run["versions"]["stable-diffusion-cpp-python"] == "0.4.7"
        assert run["runtime"].startswith("stable-diffusion.cpp (stable-diffusion-cpp-python 0.4.7")
        assert f"{wtype} weights" in run["runtime"] and run["precision"]["weights"] == wtype
        assert run["precision"]["tensor_types"]["Diffusion model"][wtype] > 0
        assert run["precision"]["sample_method"] == "euler"
        # one UNet figure per step (both guidance passes), from sd.cpp's own progress callbacks
        unet = run["unet_call_s"]
        assert unet["n"] == 2 and run["unet_calls_per_generation"] == 2 and 0 < unet["min"] <= unet["max"]
        for stage in ("text_encoder_s", "vae_decode_s", "end_to_end_s"):
            assert run[stage]["n"] == 1 and run[stage]["median"] > 0, stage
        assert run["end_to_end_s"]["median"] > 2 * unet["median"] and run["load_s"] > 0
        # its own kernel high-water mark: at least the UNet's quantised weights, far below fp32's 4.3 GB of all
        assert 500 * 2**20 < run["peak_rss_bytes"] < 4 * 2**30
        assert len(run["memory_timeline"]["t_s"]) >= 2 and r["ratios"][run["name"]]["unet_call"] > 0
        assert run["same_latents"] is False and run["name"] not in r["fidelity"]["image_vs_peers"]
        with Image.open(out / run["image"]) as im:
            assert im.size == (64, 64)
    md = (out / "results.md").read_text()
    assert "| stable-diffusion.cpp (stable-diffusion-cpp-python 0.4.7, ggml CPU, q4_0 weights) |" in md
    assert "draws its own initial noise" in md and "| sdcpp-q8_0 |" in md
    # sd.cpp's own convert wrote both gguf files from one LDM checkpoint, cached beside the other exports
    (checkpoint,) = (cache / "sdcpp").glob("*.safetensors")
    q8, q4 = (checkpoint.with_name(checkpoint.stem + f"-{w}.gguf") for w in ("q8_0", "q4_0"))
    assert q4.stat().st_size < q8.stat().st_size < checkpoint.stat().st_size
    for f in (checkpoint, q8, q4):  # 10 GB of exports: not left in pytest's temporary folders
        f.unlink()
