"""LoRA: files in the diffusers/PEFT and kohya layouts, applied at run time (weights handed to onnxruntime in place
of the graph's) and fused at convert time, against diffusers' load_lora_weights on the same latents."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import euler_pipeline, run_edge
from edge import Pipeline
from edge.bundle import read_manifest, verify_bundle
from edge.lora import LoraError
from edge.metrics import psnr
from lora_files import write_diffusers_lora, write_kohya_lora

PROMPT, STEPS = "a red circle on a blue background", 4


@pytest.fixture(scope="module")
def reference(models):
    return euler_pipeline(models["folder-epsilon"])  # its own: the tests load adapters into it


@pytest.fixture(scope="module")
def loras(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"diffusers": write_diffusers_lora(reference, root / "d"),
            "kohya": write_kohya_lora(reference, root / "style.safetensors"),
            "unet-only": write_diffusers_lora(reference, root / "u", seed=5, text_encoder=False)}


LATENTS = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)


def _diffusers(pipe, adapters: list[tuple[str, float]]) -> np.ndarray:
    names = []
    for k, (path, scale) in enumerate(adapters):
        pipe.load_lora_weights(str(path), adapter_name=f"a{k}")
        names.append(f"a{k}")
    try:
        if names:
            pipe.set_adapters(names, [s for _, s in adapters])
        with torch.no_grad():
            out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64,
                       latents=torch.from_numpy(LATENTS), output_type="np")
    finally:
        if names:
            pipe.delete_adapters(names)
    return (out.images[0] * 255).round().astype(np.uint8)


def _edge(pipe: Pipeline, loras) -> np.ndarray:
    result = pipe.generate(PROMPT, steps=STEPS, latents=LATENTS, scheduler="euler", loras=loras)
    return np.asarray(result.images[0])


@pytest.mark.parametrize("which", [["diffusers"], ["kohya"], ["unet-only"], ["diffusers", "kohya"]],
                         ids=["diffusers-layout", "kohya-layout", "unet-only", "two-at-once"])
def test_run_time_lora_matches_diffusers(bundles, reference, loras, which):
    scales = {"diffusers": 0.8, "kohya": 0.6, "unet-only": 1.0}
    adapters = [(loras[w], scales[w]) for w in which]
    expected = _diffusers(reference, adapters)
    plain = _diffusers(reference, [])
    pipe = Pipeline.load(bundles["folder-epsilon"])
    ours = _edge(pipe, adapters)
    assert psnr(expected, plain) < 30  # the LoRA changes the picture
    assert psnr(expected, ours) >= 40
    assert psnr(_edge(pipe, []), plain) >= 40  # and switching it off gives the base model back


def test_fused_at_convert_time_is_the_run_time_result(bundles, models, loras, tmp_path):
    out = tmp_path / "fused"
    run_edge("convert", models["folder-epsilon"], "--lora", f"{loras['diffusers']}:0.8", "--lora",
             f"{loras['kohya']}:0.6", "--no-memory-profile", "-o", out)
    recorded = read_manifest(out).source["loras"]
    assert [(r["file"], r["scale"]) for r in recorded] == [(loras["diffusers"].name, 0.8), (loras["kohya"].name, 0.6)]
    assert all(len(r["sha256"]) == 64 and r["layers"] > 0 for r in recorded)
    fused = _edge(Pipeline.load(out), [])
    run_time = _edge(Pipeline.load(bundles["folder-epsilon"]), [(loras["diffusers"], 0.8), (loras["kohya"], 0.6)])
    assert psnr(fused, run_time) >= 50


def test_the_bundle_on_disk_is_never_changed(bundles, loras):
    bundle = bundles["folder-epsilon"]
    before = {p: p.stat().st_mtime_ns for p in bundle.rglob("*") if p.is_file()}
    _edge(Pipeline.load(bundle), [(loras["kohya"], 1.0)])
    assert {p: p.stat().st_mtime_ns for p in bundle.rglob("*") if p.is_file()} == before
    verify_bundle(bundle, read_manifest(bundle))


@pytest.fixture(scope="module")
def split(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "bundle"
    run_edge("convert", models["folder-epsilon"], "--split-unet", "3", "--no-memory-profile", "-o", out)
    return out


def test_switching_reloads_only_the_graphs_whose_weights_change(split, loras, tmp_path):
    """A LoRA on the last up block only: the UNet's last chunk is reloaded, the other chunks and the text encoder
    keep their sessions; going back to no LoRA reloads that chunk again, and nothing else."""
    state = load_file(str(loras["kohya"]))
    up = {k: v for k, v in state.items() if k.startswith("lora_unet_up_blocks_1")}
    path = tmp_path / "up.safetensors"
    save_file(up, str(path))
    pipe = Pipeline.load(split)
    before = {name: list(sessions) for name, sessions in pipe.sessions.items()}
    last = len(pipe.manifest.components["unet"].graphs) - 1
    assert pipe.use_loras([(pipe.adapters.read(path), 0.7)]) == [("unet", last)]
    assert pipe.use_loras([(pipe.adapters.read(path), 0.7)]) == []  # the same set again: nothing to do
    pipe.generate(PROMPT, steps=2, latents=LATENTS, loras=[(path, 0.7)])
    after = pipe.sessions
    assert all(after[n][k] is s for n, ss in before.items() for k, s in enumerate(ss) if (n, k) != ("unet", last))
    assert after["unet"][last] is not before["unet"][last]
    assert pipe.adapters.extra_bytes("unet") > 0 and pipe.adapters.extra_bytes("text_encoder") == 0
    assert pipe.use_loras([]) == [("unet", last)] and pipe.adapters.extra_bytes("unet") == 0


def test_int8_bundle_requantises_the_changed_weights(models, loras, tmp_path):
    """Run-time LoRA on an int8 bundle re-quantises the touched weights with the bundle's own scheme: the same
    picture as the LoRA fused before quantising, at convert time."""
    base, fused = tmp_path / "int8", tmp_path / "int8-fused"
    run_edge("convert", models["folder-epsilon"], "--precision", "int8", "--no-memory-profile", "-o", base)
    run_edge("convert", models["folder-epsilon"], "--precision", "int8", "--lora", f"{loras['kohya']}:0.6",
             "--no-memory-profile", "-o", fused)
    where = json.loads((base / "weights.json").read_text())
    assert {e["stored"] for e in where["unet"].values()} >= {"int8"}
    ours = _edge(Pipeline.load(base), [(loras["kohya"], 0.6)])
    theirs = _edge(Pipeline.load(fused), [])
    assert psnr(ours, theirs) >= 40


def test_prompt_tags_and_cli(bundles, loras, tmp_path):
    """`<lora:NAME:SCALE>` in the prompt, found in --lora-dir, is --lora FILE:SCALE; the PNG records it."""
    from PIL import Image

    bundle, folder = bundles["folder-epsilon"], loras["kohya"].parent
    run_edge("generate", bundle, f"{PROMPT} <lora:style:0.6>", "--lora-dir", folder, "--steps", "3",
             "-o", tmp_path / "tag.png")
    run_edge("generate", bundle, PROMPT, "--lora", f"{loras['kohya']}:0.6", "--steps", "3", "-o", tmp_path / "f.png")
    run_edge("generate", bundle, PROMPT, "--steps", "3", "-o", tmp_path / "plain.png")
    tag, flag, plain = (Image.open(tmp_path / f"{n}.png") for n in ("tag", "f", "plain"))
    assert np.array_equal(np.asarray(tag), np.asarray(flag)) and not np.array_equal(np.asarray(tag), np.asarray(plain))
    params = json.loads(tag.text["edge"])
    assert params["loras"] == [{"name": "style", "sha256": params["loras"][0]["sha256"], "scale": 0.6}]


@pytest.mark.parametrize("args, expected", [
    (["--lora", "X:nan"], "scale 'nan' is not a finite number"),
    (["--lora", "X:big"], "scale 'big' is not a number"),
    (["--lora", "/no/such.safetensors"], "LoRA file not found: /no/such.safetensors"),
    (["--lora", "PICKLE"], "are Python pickles"),
    (["PROMPT <lora:nothing:1>"], "no LoRA folder is set (--lora-dir)"),
])
def test_bad_lora_arguments_give_one_clear_error(bundles, loras, tmp_path, args, expected):
    pickle = tmp_path / "style.ckpt"
    pickle.write_bytes(b"\x80\x04")
    args = [a.replace("X", str(loras["kohya"])).replace("PICKLE", str(pickle)).replace("PROMPT", PROMPT)
            for a in args]
    prompt = [] if args[0].startswith(PROMPT) else [PROMPT]
    proc = run_edge("generate", bundles["folder-epsilon"], *prompt, *args, "--steps", "2", "-o", tmp_path / "x.png",
                    check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_lora_for_another_model_is_refused_and_a_partial_one_named(bundles, loras, tmp_path):
    state = load_file(str(loras["kohya"]))
    # SDXL's kohya names (its LDM-style blocks) match nothing in an SD 1.5-layout UNet
    sdxl = {k.replace("lora_unet_down_blocks_0", "lora_unet_input_blocks_4_1").replace("lora_te_", "lora_te2_"): v
            for k, v in state.items() if k.startswith(("lora_unet_down_blocks_0", "lora_te_"))}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    partial = dict(state)
    partial.update({"lora_unet_down_blocks_9_conv.lora_down.weight": torch.ones(4, 8),
                    "lora_unet_down_blocks_9_conv.lora_up.weight": torch.ones(8, 4)})
    save_file(partial, str(tmp_path / "partial.safetensors"))
    wrong_size = {k: torch.cat([v, v], dim=-1) if k.endswith("lora_down.weight") else v for k, v in state.items()}
    save_file(wrong_size, str(tmp_path / "wide.safetensors"))
    pipe = Pipeline.load(bundles["folder-epsilon"])
    with pytest.raises(LoraError, match=r"none of its \d+ layers matches a weight of this model"):
        _edge(pipe, [(tmp_path / "sdxl.safetensors", 1.0)])
    with pytest.warns(UserWarning, match=r"1 of its \d+ layers match no weight of this model"):
        partly = _edge(pipe, [(tmp_path / "partial.safetensors", 1.0)])
    with pytest.raises(LoraError, match="is this LoRA for another model"):
        _edge(pipe, [(tmp_path / "wide.safetensors", 1.0)])
    with pytest.warns(UserWarning):  # the failed switch changed nothing: the same weights, the same picture
        assert np.array_equal(_edge(pipe, [(tmp_path / "partial.safetensors", 1.0)]), partly)
    with pytest.raises(LoraError, match="not a finite number"):
        _edge(pipe, [(loras["kohya"], float("inf"))])


def test_older_bundles_and_other_engines_say_what_to_do(bundles, loras, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(bundles["folder-epsilon"], old)
    data = json.loads((old / "manifest.json").read_text())
    del data["weight_map"]
    (old / "manifest.json").write_text(json.dumps(data))
    os.remove(old / "weights.json")
    data["files"].pop("weights.json")
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(LoraError, match="re-convert it to apply LoRAs at run time"):
        _edge(Pipeline.load(old), [(loras["kohya"], 1.0)])
    pytest.importorskip("openvino")
    with pytest.raises(ValueError, match="use backend='onnx'"):
        _edge(Pipeline.load(bundles["folder-epsilon"], backend="openvino"), [(loras["kohya"], 1.0)])


def test_the_planner_counts_the_changed_weights(bundles, loras):
    pipe = Pipeline.load(bundles["folder-epsilon"], memory_budget="4GB")
    before = pipe.plan_for(64, 64).peak
    pipe.use_loras([(pipe.adapters.read(loras["kohya"]), 1.0)])
    held = pipe.adapters.extra_bytes()
    assert held > pipe.adapters.extra_bytes("unet") > 0 and pipe.adapters.extra_bytes("text_encoder") > 0
    assert pipe.plan_for(64, 64).peak == before + held


def test_edge_serve_takes_prompt_loras_and_lists_them(bundles, loras, tmp_path):
    """`edge serve --lora-dir`: an A1111 client's `<lora:NAME:SCALE>` applies NAME.safetensors (the image is
    `edge generate --lora`'s), /sdapi/v1/loras lists them, and a LoRA that is not there is a 422 naming it."""
    import base64
    import io

    import httpx
    from PIL import Image

    from servers import start, stop

    folder = loras["kohya"].parent
    proc, url = start([bundles["folder-epsilon"]], tmp_path / "out", tmp_path / "serve.log", "--lora-dir", folder)
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            assert [x["name"] for x in c.get("/sdapi/v1/loras").json()] == ["style"]
            body = {"prompt": f"{PROMPT} <lora:style:0.6>", "steps": 3, "seed": 1, "width": 64, "height": 64,
                    "sampler_name": "Euler", "cfg_scale": 7.5}
            r = c.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 200, r.text
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
            assert served.std() > 5, (served.mean(), r.json()["info"])  # a picture, not a blank
            plain = c.post("/sdapi/v1/txt2img", json={**body, "prompt": PROMPT})
            assert not np.array_equal(served, np.asarray(Image.open(io.BytesIO(base64.b64decode(
                plain.json()["images"][0])))))
            bad = c.post("/sdapi/v1/txt2img", json={**body, "prompt": "x <lora:nothing:1>"})
            assert bad.status_code == 422 and "no nothing.safetensors" in bad.text
            assert c.post("/sdapi/v1/txt2img", json=body).status_code == 200  # still serving
    finally:
        stop(proc, tmp_path / "serve.log")
    run_edge("generate", bundles["folder-epsilon"], PROMPT, "--lora", f"{loras['kohya']}:0.6", "--steps", "3",
             "--seed", "1", "--guidance", "7.5", "-o", tmp_path / "cli.png")
    assert np.array_equal(served, np.asarray(Image.open(tmp_path / "cli.png")))
