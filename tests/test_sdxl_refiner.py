"""The SDXL refiner: a bundle of its own (the second text encoder only, aesthetic-score time ids) that works alone as
img2img, and finishes what the base started (`edge generate BASE --refiner REFINER --high-noise-frac F`), against
diffusers' StableDiffusionXLImg2ImgPipeline on the same latents and noise."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_edge
from edge import Pipeline
from edge.bundle import read_manifest
from edge.images import to_tensor
from edge.memprobe import rss_bytes
from edge.metrics import psnr
from edge.refiner import generate_refined
from edge.schedulers import make_scheduler, scheduler_config_from_dict
from edge.stages.start import encode_image, image_latents
from test_img2img import TorchDraws
from test_parity_diffusers import _diffusers_scheduler

PROMPT, H, W, STEPS, GUIDANCE = "a red circle on a blue background", 64, 64, 10, 6.0
LATENTS = np.random.default_rng(5).standard_normal((1, 4, H // 8, W // 8), dtype=np.float32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """{"base", "refiner"}: (diffusers folder, bundle, diffusers pipeline)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from edge.converters.convert import Options, convert
    from edge.converters.tiny import tiny_sdxl_pipeline, tiny_sdxl_refiner_pipeline

    root = tmp_path_factory.mktemp("refiner")
    out = {}
    for name, make, cls in (("base", tiny_sdxl_pipeline, StableDiffusionXLPipeline),
                            ("refiner", tiny_sdxl_refiner_pipeline, StableDiffusionXLImg2ImgPipeline)):
        make(seed=4).save_pretrained(root / name, safe_serialization=True)
        convert(str(root / name), root / f"{name}-bundle", options=Options(tiled_vae=False), log=lambda s: None)
        pipe = cls.from_pretrained(root / name, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        out[name] = (root / name, root / f"{name}-bundle", pipe)
    return out


def test_the_refiner_bundle_says_what_it_is(pair):
    m = read_manifest(pair["refiner"][1])
    assert m.family == "sdxl-refiner"
    assert {"text_encoder_2", "unet", "vae_decoder", "vae_encoder"} <= set(m.components)
    assert "text_encoder" not in m.components
    assert m.conditioning == {"kind": "sdxl", "encoders": ["text_encoder_2"], "rows": 2, "pooled_dim": 32,
                              "time_ids": 5, "aesthetic_score": 6.0, "negative_aesthetic_score": 2.5,
                              "pad_token_2": "!", "pad_id_2": 0, "force_zeros_for_empty_prompt": False}
    assert m.pad_token == "!" and min(c.parity["psnr_db"] for c in m.components.values()) >= 40
    assert read_manifest(pair["base"][1]).conditioning["encoders"] == ["text_encoder", "text_encoder_2"]


def _with_scheduler(pipe, scheduler: str):
    pipe.scheduler = _diffusers_scheduler(scheduler, pipe.scheduler.config)
    return pipe


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m"])
def test_the_refiner_alone_is_sdxl_img2img(pair, scheduler, strength):
    _, bundle, reference = pair["refiner"]
    pipe = Pipeline.load(bundle)
    y, x = np.mgrid[0:H, 0:W] / H
    picture = Image.fromarray((np.stack([np.sin(6 * x), np.cos(4 * y), x * y], -1) * 127 + 128).astype(np.uint8))
    x0 = encode_image(pipe.graphs, to_tensor(picture), np.random.default_rng(0))
    with torch.no_grad():
        expected = _with_scheduler(reference, scheduler)(
            PROMPT, negative_prompt="blurry", image=torch.from_numpy(x0), strength=strength, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, output_type="np", generator=torch.Generator().manual_seed(3)).images[0]
    draws = TorchDraws(torch.Generator().manual_seed(3))
    sched = make_scheduler(scheduler, scheduler_config_from_dict(pipe.manifest.scheduler))
    sched.set_timesteps(STEPS, strength)
    latents = image_latents(x0, draws.standard_normal(x0.shape), sched)
    context = pipe.encode_text(PROMPT, "blurry", guided=True, copies=1, size=(H, W))
    for latents in pipe.denoise(latents, context, sched, GUIDANCE, draws, start=sched.start):
        pass
    ours = np.asarray(pipe.decode(latents), np.float64)
    assert psnr((expected * 255).round(), ours, peak=255.0) >= 40
    # and as a user runs it: the picture in, the refined picture out
    image = pipe.generate(PROMPT, image=picture, strength=strength, steps=STEPS, scheduler=scheduler).images[0]
    assert image.size == (W, H)


def _diffusers_handoff(pair, scheduler: str, negative: str | None, frac: float) -> np.ndarray:
    base, refiner = (_with_scheduler(pair[n][2], scheduler) for n in ("base", "refiner"))
    with torch.no_grad():
        latents = base(PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=H,
                       width=W, latents=torch.from_numpy(LATENTS), denoising_end=frac, output_type="latent").images
        out = refiner(PROMPT, negative_prompt=negative, image=latents, num_inference_steps=STEPS, denoising_start=frac,
                      guidance_scale=GUIDANCE, output_type="np")
    return (out.images[0] * 255).round()


@pytest.mark.parametrize("negative", ["blurry", None], ids=["negative", "no-negative"])
@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m"])
def test_base_then_refiner_matches_diffusers(pair, scheduler, negative):
    frac = 0.7
    expected = _diffusers_handoff(pair, scheduler, negative, frac)
    base, refiner = (Pipeline.load(pair[n][1]) for n in ("base", "refiner"))
    seen = []
    result = generate_refined(base, refiner, PROMPT, negative or "", high_noise_frac=frac, steps=STEPS,
                              guidance=GUIDANCE, scheduler=scheduler, latents=LATENTS,
                              callback=lambda i, n, x: seen.append(i))
    assert seen == list(range(STEPS))
    assert psnr(expected, np.asarray(result.images[0], np.float64), peak=255.0) >= 40
    alone = base.generate(PROMPT, negative or "", steps=STEPS, guidance=GUIDANCE, scheduler=scheduler,
                          latents=LATENTS).images[0]
    assert psnr(expected, np.asarray(alone, np.float64), peak=255.0) < 35  # the refiner changed the picture


def test_a_lora_on_the_base_then_the_refiner(pair, tmp_path):
    """The refiner-plus-LoRA workflow: a LoRA made for the base (kohya layout, UNet and both text encoders) applied
    by edge at run time to the base, the refiner finishing, against diffusers' load_lora_weights on the base."""
    from lora_files import write_kohya_lora

    path = write_kohya_lora(pair["base"][2], tmp_path / "style.safetensors")
    plain = _diffusers_handoff(pair, "euler", "blurry", 0.8)
    reference = pair["base"][2]
    reference.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="style")
    reference.set_adapters(["style"], adapter_weights=[0.7])
    try:
        expected = _diffusers_handoff(pair, "euler", "blurry", 0.8)
    finally:
        reference.unload_lora_weights()
    base, refiner = (Pipeline.load(pair[n][1]) for n in ("base", "refiner"))
    result = generate_refined(base, refiner, f"{PROMPT} <lora:style:0.7>", "blurry", steps=STEPS, guidance=GUIDANCE,
                              scheduler="euler", latents=LATENTS, lora_dir=tmp_path)
    assert psnr(plain, expected, peak=255.0) < 30  # the LoRA changes the picture
    assert psnr(expected, np.asarray(result.images[0], np.float64), peak=255.0) >= 40
    assert result.params["loras"][0]["scale"] == 0.7 and result.params["prompt"].endswith("<lora:style:0.7>")


def test_cli_refiner_and_its_errors(pair, tmp_path):
    base, refiner = pair["base"][1], pair["refiner"][1]
    out = tmp_path / "r.png"
    run_edge("generate", base, PROMPT, "--refiner", refiner, "--high-noise-frac", "0.75", "--steps", "8", "-o", out)
    params = json.loads(Image.open(out).text["edge"])
    assert params["refiner"] == read_manifest(refiner).bundle_id and params["high_noise_frac"] == 0.75
    for args, expected in [
        ([base, "--refiner", refiner, "--high-noise-frac", "1.5"], "expected a number between 0 and 1"),
        ([base, "--refiner", refiner, "--high-noise-frac", "0.01", "--steps", "4"], "leaves the base no step"),
        ([refiner, "--refiner", refiner], "is itself an SDXL refiner: give the base model's bundle first"),
        ([base, "--refiner", base], "a sdxl bundle; expected an SDXL refiner bundle"),
        ([base, "--refiner", refiner, "--image", out], "--refiner finishes a text-to-image"),
    ]:
        proc = run_edge("generate", args[0], PROMPT, *args[1:], "-o", tmp_path / "x.png", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and expected in lines[-1], (args, proc.stderr)
    assert not (tmp_path / "x.png").exists()


def test_under_a_budget_base_and_refiner_are_never_resident_together(pair):
    free = generate_refined(*(Pipeline.load(pair[n][1]) for n in ("base", "refiner")), PROMPT, steps=STEPS,
                            guidance=GUIDANCE, scheduler="euler", latents=LATENTS)
    from edge.plan import smallest_budget

    gc.collect()  # the unconstrained pipelines' sessions gone: the budget is planned on what this process holds
    manifests = [read_manifest(pair[n][1]) for n in ("base", "refiner")]
    least = max(smallest_budget(m, H, W, base=rss_bytes())[0] for m in manifests)  # the staged plans, both
    base, refiner = (Pipeline.load(pair[n][1], memory_budget=least + 2**24, preload=False) for n in ("base", "refiner"))
    loaded, decoding = [], []
    decode = refiner.decode
    refiner.decode = lambda x: decoding.append(set(refiner.graphs.sessions)) or decode(x)  # what decoding holds
    result = generate_refined(base, refiner, PROMPT, steps=STEPS, guidance=GUIDANCE, scheduler="euler",
                              latents=LATENTS, callback=lambda i, n, x: loaded.append(
                                  (set(base.graphs.sessions), set(refiner.graphs.sessions))))
    k = 8  # the base's steps at 0.8 of 10 Euler steps (leading spacing: 901 ... 1, cut-off 200)
    assert all(theirs == set() for _, theirs in loaded[:k]) and all(mine == set() for mine, _ in loaded[k:])
    assert "unet" in loaded[0][0] and "unet" in loaded[-1][1]
    assert not refiner.plan.resident and decoding == [set()]  # staged: the UNet is freed before the decoder loads
    assert not base.graphs.sessions and not refiner.graphs.sessions
    assert psnr(np.asarray(free.images[0]), np.asarray(result.images[0])) >= 60
