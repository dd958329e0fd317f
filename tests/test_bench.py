"""`edge bench` on tiny bundles: the files it writes, the figures in them, the peers, the torch-free rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

BENCH = [sys.executable, "-m", "edge.bench"]
HEAVY = ("torch", "diffusers", "transformers", "optimum")

# Runs `edge bench` in a fresh interpreter and reports which host libraries it imported.
NO_TORCH_SCRIPT = """
import json, sys
from edge.bench import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print(json.dumps({{"code": code, "heavy": heavy}}))
""".format(heavy=HEAVY)


def run_bench(*args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=env)


@pytest.fixture(scope="module")
def edge_only(bundles, tmp_path_factory) -> tuple[Path, dict]:
    """One `edge bench BUNDLE --no-peers` in a fresh interpreter: (results folder, what the script printed)."""
    out = tmp_path_factory.mktemp("bench") / "edge-only"
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, str(bundles["folder-epsilon"]), "--steps", "3", "--repeat", "2",
         "--no-peers", "--memory-budget", "4GB", "--label", "tiny", "-o", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_writes_json_markdown_and_png(edge_only):
    out, printed = edge_only
    assert printed["code"] == 0
    r = json.loads((out / "results.json").read_text())
    assert r["schema_version"] == 1 and r["kind"] == "edge-bench" and r["label"] == "tiny"
    for key in ("config", "system", "bundle", "runs", "ratios", "fidelity", "memory_budget", "skipped_peers"):
        assert key in r
    for key in ("cpu_model", "logical_cpus", "os", "architecture"):
        assert r["system"][key]
    from edge.cpu import features

    assert r["system"]["cpu_features"] == features().as_dict()  # which int8 kernels the figures were taken with
    assert f"int8: {features().int8_path}" in (out / "results.md").read_text()
    assert r["bundle"]["bytes_on_disk"] > 0 and set(r["bundle"]["components"]) >= {"unet", "text_encoder"}
    assert r["config"]["steps"] == 3 and r["config"]["repeat"] == 2
    assert r["memory_budget"]["within"] is True
    assert r["fidelity"]["bundle_parity"]["unet"]["psnr_db"] > 40

    (run,) = r["runs"]
    assert run["name"] == "edge" and run["ok"] and run["execution_provider"] == "CPUExecutionProvider"
    assert run["versions"]["onnxruntime"]
    assert run["cold_start_s"] > 0 and all(v > 0 for v in run["sessions_s"].values())
    unet = run["unet_call_s"]
    assert unet["n"] == 2 * 3 and run["unet_calls_per_generation"] == 3 and run["unet_batch"] == 2
    assert 0 < unet["min"] <= unet["median"] <= unet["p90"] <= unet["max"]
    for stage in ("text_encoder_s", "vae_decode_s", "end_to_end_s"):
        assert run[stage]["n"] == 2 and run[stage]["median"] > 0, stage
    assert run["end_to_end_s"]["median"] >= run["unet_call_s"]["median"] * 3

    timeline = run["memory_timeline"]
    assert len(timeline["t_s"]) == len(timeline["rss_bytes"]) >= 2
    peak = run["peak_rss_bytes"]
    # The kernel's peak: at least every sample, and plausible for python + onnxruntime + a tiny model.
    assert timeline["max_sampled_bytes"] <= peak < 2 * 2**30
    assert 30 * 2**20 < peak and run["baseline_rss_bytes"] < peak
    assert {s["stage"] for s in run["stages"]} == {"load", "text_encoder", "unet", "vae_decoder"}

    md = (out / "results.md").read_text()
    assert "| edge (onnxruntime" in md and "UNet s/call median" in md and "fits" in md
    with Image.open(out / "results.png") as im:
        assert im.format == "PNG" and im.width >= 800
    with Image.open(out / "edge.png") as im:
        assert im.size == (64, 64)
    assert (out / "latents.npy").is_file()


def test_bench_without_peers_never_imports_torch(edge_only):
    _, printed = edge_only
    assert printed["heavy"] == []


def test_compare_two_results(edge_only, tmp_path):
    out, _ = edge_only
    other = json.loads((out / "results.json").read_text())
    other["label"] = "tiny-again"
    (tmp_path / "b.json").write_text(json.dumps(other))
    proc = run_bench("compare", out / "results.json", tmp_path / "b.json", "-o", tmp_path / "cmp")
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "tiny-again" in md and md.count("| tiny") == 2
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["schema_version"] == 1
    with Image.open(tmp_path / "cmp" / "compare.png") as im:
        assert im.format == "PNG"


def test_diffusers_peer_gives_ratios_and_fidelity(bundles, tmp_path):
    out = tmp_path / "peers"
    proc = run_bench(bundles["folder-epsilon"], "--steps", "2", "--peers", "diffusers", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "[diffusers]" in proc.stderr  # progress, as it runs
    r = json.loads((out / "results.json").read_text())
    names = [run["name"] for run in r["runs"]]
    assert names == ["edge", "diffusers"]
    peer = r["runs"][1]
    assert peer["ok"] and "torch" in peer["versions"] and peer["unet_call_s"]["n"] == 2
    assert peer["peak_rss_bytes"] > 100 * 2**20  # torch alone is more than that
    assert len(peer["memory_timeline"]["t_s"]) >= 2
    q = r["ratios"]["diffusers"]
    for key in ("unet_call", "end_to_end", "peak_rss", "cold_start"):
        assert q[key] > 0, key
    assert q["peak_rss"] == pytest.approx(r["runs"][0]["peak_rss_bytes"] / peer["peak_rss_bytes"])
    assert r["fidelity"]["image_vs_peers"]["diffusers"]["psnr_db"] > 30  # same latents, same scheduler


def test_diffusers_int8_peer_runs_torch_dynamic_quantization(bundles, tmp_path):
    proc = run_bench(bundles["folder-epsilon"], "--steps", "2", "--peers", "diffusers-int8", "-o", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [run["name"] for run in r["runs"]] == ["edge", "diffusers-int8"]
    peer = r["runs"][1]
    assert peer["ok"] and "int8 dynamic Linear" in peer["runtime"] and peer["unet_call_s"]["n"] == 2
    assert r["ratios"]["diffusers-int8"]["unet_call"] > 0
    # int8 weights change the image, but the same latents still give nearly the same picture (measured 40.9 dB)
    assert 15 < r["fidelity"]["image_vs_peers"]["diffusers-int8"]["psnr_db"] < 80


def peer_cache(peer: str, cache: Path) -> dict:
    """An environment for `edge bench` whose cache `cache` has the peer environment `peer` the harness made
    (skip where it has not), and nothing else: the test's exports are its own."""
    from edge.bench_host import cache_dir

    venv = cache_dir() / "peers" / peer
    if not (venv / ".installed").is_file():
        pytest.skip(f"the {peer} peer's environment {venv} does not exist (creating it takes minutes and "
                    f"~1.6 GB: `edge bench BUNDLE --peers {peer}` does it once)")
    (cache / "peers").mkdir(parents=True)
    (cache / "peers" / peer).symlink_to(venv)
    return {**os.environ, "EDGE_CACHE_DIR": str(cache)}


def test_optimum_peer_when_its_environment_exists(bundles, tmp_path):
    cache = tmp_path / "cache"
    env = peer_cache("optimum", cache)
    proc = run_bench(bundles["folder-epsilon"], "--steps", "2", "--peers", "optimum,optimum-int8", "-o",
                     tmp_path / "o", env=env)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [run["name"] for run in r["runs"]] == ["edge", "optimum", "optimum-int8"]
    assert r["runs"][1]["execution_provider"] == "CPUExecutionProvider" and r["ratios"]["optimum"]["unet_call"] > 0
    assert "int8" in r["runs"][2]["runtime"] and r["ratios"]["optimum-int8"]["unet_call"] > 0
    # optimum's own quantizer wrote the int8 UNet the peer ran: integer ops, weights a quarter of fp32's
    import onnx

    (export,) = [d for d in (cache / "optimum").iterdir() if d.name.endswith("-int8")]
    unet = onnx.load(str(export / "unet" / "model.onnx"), load_external_data=False).graph
    assert {"ConvInteger", "MatMulInteger"} <= {n.op_type for n in unet.node}


@pytest.mark.parametrize("args, expected", [
    (["/no/such/bundle"], "bundle not found"),
    (["BUNDLE", "--steps", "0"], "steps must be a whole number >= 1, got 0"),
    (["--arch", "sd99", "--random-weights"], "unknown arch 'sd99'; available: sd15, sd21, sd21-base, sdxl"),
    (["--arch", "sdxl", "--random-weights"], "the peers are not built for SDXL yet"),
    (["--arch", "sd15"], "needs --random-weights"),
    (["BUNDLE", "--peers", "onnx"],
     "unknown peer(s) onnx; known: diffusers, optimum, openvino, openvino-f32, diffusers-int8, optimum-int8, openvino-int8"),
    (["BUNDLE", "--memory-budget", "lots"], "is not a size"),
    (["compare", "nothing.json", "nothing2.json"], "no bench results at nothing.json"),
    (["BUNDLE", "--backends", "onnx,tensorrt"], "--backends 'onnx,tensorrt': expected a comma list of onnx, openvino"),
    (["BUNDLE", "--backends", "openvino", "--memory-budget", "2GB"], "bench it with --backends onnx"),
    (["BUNDLE", "--cache-interval", "2"], "not cut for DeepCache; re-convert it with --deep-cache"),
])
def test_bad_input_gives_one_clear_error(bundles, args, expected):
    args = [str(bundles["folder-epsilon"]) if a == "BUNDLE" else a for a in args]
    proc = run_bench(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr


def test_backends_are_measured_side_by_side_and_the_fastest_named(bundles, tmp_path):
    """`--backends onnx,openvino`: edge on each engine (OpenVINO in a fresh process, from the same latents), and
    the report names the fastest UNet call here."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino (pip install 'edge-diffusion[openvino]')")
    out = tmp_path / "o"
    proc = run_bench(bundles["folder-epsilon"], "--steps", "2", "--no-peers", "--backends", "onnx,openvino",
                     "-o", out)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    onnx_run, ov_run = r["runs"]
    assert (onnx_run["name"], ov_run["name"]) == ("edge", "edge-openvino") and ov_run["ok"]
    assert "OpenVINO" in ov_run["runtime"] and ov_run["versions"]["openvino"]
    assert ov_run["unet_calls_per_generation"] == onnx_run["unet_calls_per_generation"] == 2
    assert ov_run["peak_rss_bytes"] > 0 and ov_run["unet_call_s"]["median"] > 0
    assert np.array_equal(np.load(out / "latents.npy"), np.load(out / "latents-openvino.npy"))
    best = min(r["runs"], key=lambda run: run["unet_call_s"]["median"])
    assert r["fastest"]["overall"]["name"] == best["name"] == r["fastest"]["edge"]["name"]
    assert f"Fastest UNet call on this machine: **{best['name']}**" in (out / "results.md").read_text()


def test_edge_cli_registers_bench():
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "bench", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    if "invalid choice" in proc.stderr:
        pytest.skip("edge/cli.py does not register `edge bench` yet (add_bench_parser)")
    assert proc.returncode == 0 and "--random-weights" in proc.stdout


def test_size_and_statistics_helpers():
    from edge.bench import parse_size
    from edge.bench_probe import summarize

    assert parse_size("4GB") == parse_size("4 GiB") == 4 * 2**30
    assert parse_size("512MB") == 512 * 2**20 and parse_size("1000") == 1000
    s = summarize([5.0, 1.0, 2.0, 3.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 5.0, 5)
    assert s["p90"] == pytest.approx(4.6)  # numpy.percentile(..., 90)


@pytest.mark.parametrize("arch, counts", [
    ("sd15", {"unet": 859.52e6, "text_encoder": 123.06e6, "vae": 83.65e6}),
    ("sd21", {"unet": 865.91e6, "text_encoder": 340.39e6, "vae": 83.65e6}),
    ("sdxl", {"unet": 2567.46e6, "text_encoder": 123.06e6, "text_encoder_2": 694.66e6, "vae": 83.65e6}),
    ("sdxl-refiner", {"unet": 2259.53e6, "text_encoder_2": 694.66e6, "vae": 83.65e6}),
])
def test_build_random_has_the_published_parameter_counts(arch, counts):
    from edge.converters.arch import build_random, parameter_counts

    pipe = build_random(arch, device="meta")  # the modules, without allocating 4 GB of weights
    assert pipe.unet.device.type == "meta"
    got = parameter_counts(pipe)
    for name, n in counts.items():
        assert got[name] == pytest.approx(n, rel=1e-3), name


@pytest.mark.parametrize("arch, pad, prediction, size", [
    ("sd15", "<|endoftext|>", "epsilon", 64), ("sd21", "!", "v_prediction", 96), ("sd21-base", "!", "epsilon", 64),
])
def test_config_folders_are_diffusers_config_folders(arch, pad, prediction, size):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from edge.converters.arch import config_dir

    folder = config_dir(arch)
    index = StableDiffusionPipeline.load_config(folder)
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    assert UNet2DConditionModel.load_config(folder, subfolder="unet")["sample_size"] == size
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tok.pad_token == pad and len(tok) == 49408
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
