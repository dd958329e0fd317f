"""SDXL base through the same converter and runtime: a tiny model with SDXL's structure (two text encoders, the
second padding with "!" and giving the pooled embedding, text-and-time added conditions, Euler "leading")
converts and draws what diffusers' StableDiffusionXLPipeline draws from the same latents."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from edge import Pipeline
from edge.metrics import psnr
from test_parity_diffusers import _diffusers_scheduler

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(the diffusers folder, its bundle, diffusers' pipeline loaded from the folder)."""
    from diffusers import StableDiffusionXLPipeline

    from edge.converters.convert import Options, convert
    from edge.converters.tiny import tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("sdxl")
    tiny_sdxl_pipeline(seed=4).save_pretrained(root / "model", safe_serialization=True)
    convert(str(root / "model"), root / "bundle", options=Options(profile_memory=False, tiled_vae=False),
            log=lambda s: None)
    pipe = StableDiffusionXLPipeline.from_pretrained(root / "model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return root / "model", root / "bundle", pipe


def _diffusers_image(pipe, scheduler: str, latents: np.ndarray, negative: str | None, h: int, w: int, steps: int,
                     prompt: str = PROMPT):
    source = pipe.scheduler
    pipe.scheduler = _diffusers_scheduler(scheduler, source.config)
    try:
        with torch.no_grad():
            out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=6.0, height=h,
                       width=w, latents=torch.from_numpy(latents), output_type="np")
    finally:
        pipe.scheduler = source
    return (out.images[0] * 255).round().astype(np.uint8)


def test_the_bundle_says_it_is_sdxl(sdxl):
    from edge.bundle import read_manifest

    m = read_manifest(sdxl[1])
    assert m.family == "sdxl" and {"text_encoder", "text_encoder_2", "unet", "vae_decoder"} <= set(m.components)
    assert m.conditioning == {"kind": "sdxl", "encoders": ["text_encoder", "text_encoder_2"], "rows": 2, "pooled_dim": 32, "time_ids": 6, "pad_token_2": "!",
                              "pad_id_2": 0, "force_zeros_for_empty_prompt": True}
    assert min(c.parity["psnr_db"] for c in m.components.values()) >= 40


@pytest.mark.parametrize("negative", ["blurry", None], ids=["negative", "zeros"])
@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("size", [(64, 64), (64, 96)], ids=["square", "wide"])
def test_sdxl_matches_diffusers(sdxl, scheduler, negative, size):
    h, w = size
    latents = np.random.default_rng(5).standard_normal((1, 4, h // 8, w // 8), dtype=np.float32)
    reference = _diffusers_image(sdxl[2], scheduler, latents, negative, h, w, steps=6)
    ours = Pipeline.load(sdxl[1]).generate(PROMPT, negative_prompt=negative or "", steps=6, guidance=6.0,
                                           scheduler=scheduler, height=h, width=w, latents=latents).images[0]
    assert reference.std() > 1.0
    assert psnr(reference.astype(np.float64), np.asarray(ours, np.float64), peak=255.0) >= 40


def test_what_sdxl_does_not_take_yet_is_refused(sdxl, tmp_path):
    from edge.converters.convert import ConvertError, Options, convert

    with pytest.raises(ConvertError, match="--deep-cache with an SDXL model"):
        convert(str(sdxl[0]), tmp_path / "b", options=Options(deep_cache=True), log=lambda s: None)
    with pytest.raises(ConvertError, match="--target coreml with an SDXL model"):
        convert(str(sdxl[0]), tmp_path / "b", options=Options(targets=("coreml",)), log=lambda s: None)
    assert not (tmp_path / "b").exists()


def test_sdxl_under_a_memory_budget_runs_stage_by_stage(sdxl, tmp_path):
    """Both text encoders are measured and planned as one stage; a budget just under the all-resident plan's peak
    frees each stage after it runs, and the picture stays the same."""
    from edge.bundle import read_manifest
    from edge.converters.convert import Options, convert
    from edge.plan import HEADROOM

    bundle = tmp_path / "measured"
    convert(str(sdxl[0]), bundle, options=Options(tiled_vae=False), log=lambda s: None)
    m = read_manifest(bundle)
    assert m.components["text_encoder_2"].memory["graphs"][0]["resident"] > 0
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8), dtype=np.float32)
    plain = np.asarray(Pipeline.load(bundle).generate(PROMPT, steps=4, latents=latents).images[0])
    pipe = Pipeline.load(bundle, memory_budget=10**12, preload=False)
    everything = pipe.plan  # all resident: what this process would peak at
    assert everything.resident
    pipe.memory_budget = int(everything.peak / (1 - HEADROOM)) - 1  # just under it
    lean = np.asarray(pipe.generate(PROMPT, steps=4, latents=latents).images[0])
    assert not pipe.plan.resident and "text_encoder_2" not in pipe.sessions
    # ("extended" graph optimisation under a budget, "all" without: the same picture to rounding)
    assert psnr(plain.astype(np.float64), lean.astype(np.float64), peak=255.0) >= 40


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_sdxl_lora_at_run_time_matches_diffusers(sdxl, tmp_path, layout):
    """UNet and both text encoders (diffusers' text_encoder_2, kohya's lora_te1_ / lora_te2_), applied by edge at
    run time, against diffusers' load_lora_weights on the same latents."""
    from lora_files import write_diffusers_lora, write_kohya_lora

    model, bundle, pipe = sdxl
    path = (write_diffusers_lora(pipe, tmp_path / "d", alpha=4.0) if layout == "diffusers"
            else write_kohya_lora(pipe, tmp_path / "k.safetensors"))
    latents = np.random.default_rng(9).standard_normal((1, 4, 8, 8), dtype=np.float32)
    plain = _diffusers_image(pipe, "euler", latents, "blurry", 64, 64, steps=5)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    try:
        reference = _diffusers_image(pipe, "euler", latents, "blurry", 64, 64, steps=5)
    finally:
        pipe.unload_lora_weights()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = Pipeline.load(bundle).generate(PROMPT, negative_prompt="blurry", steps=5, guidance=6.0,
                                              scheduler="euler", latents=latents, loras=[(path, 0.7)]).images[0]
    # the first text encoder's last layer is not in the graph (SDXL reads the penultimate): not a mismatch
    assert not [w for w in caught if "match no weight" in str(w.message)]
    assert psnr(plain.astype(np.float64), reference.astype(np.float64), peak=255.0) < 30  # the LoRA changes it
    assert psnr(reference.astype(np.float64), np.asarray(ours, np.float64), peak=255.0) >= 40


def test_an_sdxl_lora_on_an_sd1_bundle_is_refused(sdxl, bundles, tmp_path):
    from lora_files import write_kohya_lora

    from edge.lora import LoraError

    path = write_kohya_lora(sdxl[2], tmp_path / "xl.safetensors")
    with pytest.raises(LoraError, match="xl.safetensors"):
        Pipeline.load(bundles["folder-epsilon"]).generate(PROMPT, steps=2, loras=[(path, 1.0)])


def test_sdxl_textual_inversion_matches_diffusers(sdxl, tmp_path):
    """SDXL embeddings (clip_l and clip_g vectors; 2 vectors for one token) in the prompt and the negative prompt:
    both encoders' token tables grown at run time, against diffusers' load_textual_inversion into each encoder."""
    from safetensors.torch import load_file, save_file

    from edge.embeddings import EmbeddingError

    _, bundle, pipe = sdxl
    g = torch.Generator().manual_seed(3)
    for name, n in (("sparkle", 2), ("grainy", 1)):  # word embeddings are ~0.01-scale: these move the picture
        save_file({"clip_l": torch.randn(n, 32, generator=g) * 0.5, "clip_g": torch.randn(n, 32, generator=g) * 0.5},
                  str(tmp_path / f"{name}.safetensors"))
    latents = np.random.default_rng(9).standard_normal((1, 4, 8, 8), dtype=np.float32)
    prompt = "a sparkle circle on a blue background"
    plain = _diffusers_image(pipe, "euler", latents, "grainy", 64, 64, steps=5, prompt=prompt)
    for name in ("sparkle", "grainy"):
        tensors = load_file(str(tmp_path / f"{name}.safetensors"))
        pipe.load_textual_inversion(tensors["clip_l"], token=name, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(tensors["clip_g"], token=name, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    try:
        reference = _diffusers_image(pipe, "euler", latents, "grainy", 64, 64, steps=5, prompt=prompt)
    finally:
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            pipe.unload_textual_inversion(["sparkle", "sparkle_1", "grainy"], tokenizer=tokenizer,
                                          text_encoder=encoder)
    ours = Pipeline.load(bundle)
    for name in ("sparkle", "grainy"):
        ours.load_embedding(tmp_path / f"{name}.safetensors")
    image = ours.generate(prompt, negative_prompt="grainy", steps=5, guidance=6.0, scheduler="euler",
                          latents=latents).images[0]
    assert psnr(plain.astype(np.float64), reference.astype(np.float64), peak=255.0) < 35  # the embeddings count
    assert psnr(reference.astype(np.float64), np.asarray(image, np.float64), peak=255.0) >= 40
    save_file({"<one>": torch.randn(1, 32)}, str(tmp_path / "learned_embeds.safetensors"))
    with pytest.raises(EmbeddingError, match="learned_embeds.safetensors: one set of vectors, but this sdxl bundle's "
                                             "text encoders need an SDXL embedding"):
        Pipeline.load(bundle).load_embedding(tmp_path / "learned_embeds.safetensors")


def _sdxl_image_from_embeds(pipe, latents: np.ndarray, embeds, steps: int = 5) -> np.ndarray:
    """diffusers' SDXL pipeline on given (prompt, pooled, negative, negative pooled) embeddings."""
    pipe.scheduler = _diffusers_scheduler("euler", pipe.scheduler.config)
    with torch.no_grad():
        out = pipe(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], negative_prompt_embeds=embeds[2],
                   negative_pooled_prompt_embeds=embeds[3], num_inference_steps=steps, guidance_scale=6.0,
                   height=64, width=64, latents=torch.from_numpy(latents), output_type="np")
    return (out.images[0] * 255).round().astype(np.uint8)


def _check_weighted(bundle, pipe, prompt: str, syntax: str, embeds, plain_embeds, seed: int) -> None:
    """The context edge builds for `prompt` (negative "blurry") holds the reference `embeds` (prompt, pooled,
    negative, negative pooled), which differ from the unweighted prompt's; the picture matches diffusers'."""
    ours = Pipeline.load(bundle).encode_text(prompt, "blurry", guided=True, copies=1, syntax=syntax)
    width = embeds[1].shape[-1]
    for got, want in ((ours[1, :77], embeds[0][0]), (ours[1, 77, :width], embeds[1][0]),
                      (ours[0, :77], embeds[2][0]), (ours[0, 77, :width], embeds[3][0])):
        assert psnr(want.numpy().astype(np.float64), got.astype(np.float64)) >= 70  # fp32 encoders: ~130 dB apart
    moved = np.abs(plain_embeds[0].numpy() - embeds[0].numpy()).max()  # what the weights do to the states
    assert moved > 10 * np.abs(ours[1, :77] - embeds[0][0].numpy()).max()
    latents = np.random.default_rng(seed).standard_normal((1, 4, 8, 8), dtype=np.float32)
    reference = _sdxl_image_from_embeds(pipe, latents, embeds)
    image = Pipeline.load(bundle).generate(prompt, negative_prompt="blurry", steps=5, guidance=6.0, scheduler="euler",
                                           latents=latents, prompt_syntax=syntax).images[0]
    assert psnr(reference.astype(np.float64), np.asarray(image, np.float64), peak=255.0) >= 40


@pytest.mark.parametrize("prompt", ["a (red circle)1.4 on a blue++ background", "a red circle, (blue background)--"])
def test_sdxl_compel_weighting_matches_compel(sdxl, prompt):
    """compel's weighting on SDXL's two encoders (compel's own SDXL set-up: penultimate states, the second encoder
    pooled, of the prompt as written), down-weighting by masking included."""
    from compel import Compel, ReturnedEmbeddingsType

    _, bundle, pipe = sdxl
    compel = Compel(tokenizer=[pipe.tokenizer, pipe.tokenizer_2], text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
                    returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                    requires_pooled=[False, True])
    with torch.no_grad():
        embeds = (*compel(prompt), *compel("blurry"))
        plain = compel(re.sub(r"[()]|1\.4|\+\+|--", "", prompt))
    _check_weighted(bundle, pipe, prompt, "compel", embeds, plain, seed=12)


def _a1111_states(tokenizer, encoder, pieces) -> torch.Tensor:
    """A1111's rule on one encoder (modules/sd_hijack_clip.py, which SDXL runs once per encoder): each piece
    tokenised on its own, every token's penultimate state scaled by its weight, then the window's mean restored."""
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for text, weight in pieces:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids, weights = ids + piece, weights + [weight] * len(piece)
    ids, weights = ids + [tokenizer.eos_token_id], weights + [1.0]
    pad = tokenizer.pad_token_id
    ids, weights = ids + [pad] * (77 - len(ids)), weights + [1.0] * (77 - len(weights))
    z = encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2]
    weighted = z * torch.tensor(weights)[None, :, None]
    return weighted * (z.mean() / weighted.mean())


def test_sdxl_a1111_weighting_restores_each_encoders_mean(sdxl):
    """A1111's `(words:w)` on SDXL: each text encoder's window scaled and its own mean restored, the two then side
    by side, with the pooled embedding of the unweighted text."""
    _, bundle, pipe = sdxl

    def embeds(pieces):
        states = [_a1111_states(t, e, pieces) for t, e in ((pipe.tokenizer, pipe.text_encoder),
                                                           (pipe.tokenizer_2, pipe.text_encoder_2))]
        text = "".join(p for p, _ in pieces)
        ids = pipe.tokenizer_2(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return torch.cat(states, dim=-1), pipe.text_encoder_2(ids).text_embeds

    with torch.no_grad():
        weighted = (*embeds([("a ", 1.0), ("red circle", 1.8), (" on a ", 1.0), ("blue background", 0.5)]),
                    *embeds([("blurry", 1.0)]))
        plain = embeds([("a red circle on a blue background", 1.0)])
    _check_weighted(bundle, pipe, "a (red circle:1.8) on a (blue background:0.5)", "a1111", weighted, plain, seed=13)


def test_sdxl_text_encoders_load_one_at_a_time_under_a_budget(sdxl, tmp_path):
    """Under a budget the first text encoder is freed before the second loads, and the plan counts the larger of
    the two, not both; the conditioning is the same as with both resident."""
    from edge.bundle import read_manifest
    from edge.converters.convert import Options, convert
    from edge.plan import HEADROOM, make_plan

    bundle = tmp_path / "measured"
    convert(str(sdxl[0]), bundle, options=Options(tiled_vae=False), log=lambda s: None)
    m = read_manifest(bundle)
    graphs = {n: m.components[n].memory["graphs"][0] for n in ("text_encoder", "text_encoder_2")}
    assert all(g["held"] > 0 for g in graphs.values())
    resident = make_plan(m, None, 64, 64)
    staged = make_plan(m, int(resident.peak / (1 - HEADROOM)) - 1, 64, 64)
    assert not staged.resident and "one after the other" in staged.stages[0].detail
    pipe = Pipeline.load(bundle, memory_budget=10**12, preload=False)
    everything = pipe.encode_text("a (red:1.3) circle", "blurry", guided=True, copies=1, syntax="a1111")
    pipe.memory_budget = int(pipe.plan.peak / (1 - HEADROOM)) - 1
    opened, real_open = [], pipe.graphs.open

    def watched(name, count=None):  # which sessions are live each time a component is opened
        opened.append((name, sorted(pipe.graphs.sessions)))
        return real_open(name, count)

    pipe.graphs.open = watched
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8), dtype=np.float32)
    pipe.generate("a (red:1.3) circle", negative_prompt="blurry", steps=2, latents=latents, prompt_syntax="a1111")
    assert not pipe.plan.resident
    assert ("text_encoder_2", []) in opened and opened.index(("text_encoder_2", [])) > 0
    assert opened[0][0] == "text_encoder"
    one_at_a_time = pipe.encode_text("a (red:1.3) circle", "blurry", guided=True, copies=1, syntax="a1111")
    assert np.allclose(one_at_a_time, everything, atol=1e-4)
