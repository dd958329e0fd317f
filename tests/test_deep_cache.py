"""DeepCache: the UNet cut where its deep part can be skipped, and `cache_interval` N running that part every N steps
only. Checked against the diffusers UNet in torch (the deep feature entering its last up block, reused), against
the uncut bundle, and on the default model by the scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REPO, run_edge
from edge import Pipeline
from edge.eval.scenes import Scene, SceneObject
from edge.eval.scorer import score
from edge.metrics import psnr
from edge.plan import Plan

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def cut(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("deep-cache") / "bundle"
    run_edge("convert", models["folder-epsilon"], "--deep-cache", "-o", out)
    return out


def test_manifest_records_the_cut(cut):
    unet = json.loads((cut / "manifest.json").read_text())["components"]["unet"]
    assert len(unet["chunks"]) == 3 and unet["split"]["psnr_vs_whole_db"] >= 60
    deep = unet["deep_cache"]
    assert deep["skip_chunk"] == 1 and deep["cut_before"] == ["/unet/down_blocks.1/", "/unet/up_blocks.1/"]
    assert deep["cached"] and all(n in {t["name"] for t in unet["chunks"][2]["inputs"]} for n in deep["cached"])


def test_interval_one_is_the_uncut_unet(cut, bundles):
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    plain = Pipeline.load(bundles["folder-epsilon"]).generate(PROMPT, steps=6, latents=latents)
    ours = Pipeline.load(cut).generate(PROMPT, steps=6, latents=latents, cache_interval=1)
    assert psnr(plain.latents, ours.latents) >= 100


def _shallow_reference(unet, sample, t, context, deep):
    """The outermost level of diffusers' UNet2DConditionModel with `deep` as the hidden state entering its last up
    block: what a cached step computes (DeepCache's skip branch)."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t))
    h = unet.conv_in(sample)
    skips = [h]
    block = unet.down_blocks[0]
    for resnet, attention in zip(block.resnets, block.attentions):
        h = attention(resnet(h, emb), encoder_hidden_states=context, return_dict=False)[0]
        skips.append(h)
    h = unet.up_blocks[-1](hidden_states=deep, temb=emb, res_hidden_states_tuple=tuple(skips),
                           encoder_hidden_states=context)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def test_cached_call_matches_the_diffusers_unet(cut, models):
    """A full call fills the cache with the deep feature; a later call at another sample and timestep reuses it,
    as the torch reference does with the feature its own full call captured."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(models["folder-epsilon"] / "unet").eval()
    pipe = Pipeline.load(cut)
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((2, 4, 8, 12), dtype=np.float32) for _ in range(2))
    context = rng.standard_normal((2, 77, unet.config.cross_attention_dim), dtype=np.float32)
    cache: dict = {}
    full = pipe.unet(a, 700.0, context, cache, reuse=False)
    cached = pipe.unet(b, 420.0, context, cache, reuse=True)

    captured = {}
    hook = unet.up_blocks[-1].register_forward_pre_hook(
        lambda m, args, kwargs: captured.update(deep=kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        ref_full = unet(torch.from_numpy(a), torch.tensor([700.0, 700.0]), torch.from_numpy(context)).sample
        hook.remove()
        ref_cached = _shallow_reference(unet, torch.from_numpy(b), torch.tensor([420.0, 420.0]),
                                        torch.from_numpy(context), captured["deep"])
    assert psnr(ref_full.numpy(), full) >= 60
    assert psnr(ref_cached.numpy(), cached) >= 60
    assert psnr(pipe.unet(b, 420.0, context), cached) < 60  # the reuse changed the answer: the cache was used


def test_two_batch_one_calls_keep_a_cache_each(cut):
    """Where the memory plan runs guidance as two batch-1 calls, each half keeps its own deep feature: the same
    image as the one batch-2 call."""
    class TwoCalls(Pipeline):
        def plan_for(self, height, width, num_images=1, guided=True, image=False, decoder="full"):
            return Plan(None, resident=True, guidance_batch=1, unet_per_call=False, vae_tile=None, vae_overlap=0,
                        base=0)

    one = Pipeline.load(cut).generate(PROMPT, steps=7, seed=2, cache_interval=3)
    two = TwoCalls.load(cut).generate(PROMPT, steps=7, seed=2, cache_interval=3)
    assert psnr(one.latents, two.latents) >= 100
    assert one.params["cache_interval"] == 3


def test_bad_cache_arguments(cut, bundles, models, tmp_path):
    proc = run_edge("generate", bundles["folder-epsilon"], PROMPT, "--cache-interval", "3", "-o", tmp_path / "a.png",
                    check=False)
    assert proc.returncode == 2 and "--deep-cache" in proc.stderr and not (tmp_path / "a.png").exists()
    proc = run_edge("generate", cut, PROMPT, "--cache-interval", "0", "-o", tmp_path / "b.png", check=False)
    assert proc.returncode == 2 and "--cache-interval" in proc.stderr
    proc = run_edge("convert", models["folder-epsilon"], "--deep-cache", "--split-unet", "2", "-o", tmp_path / "c",
                    check=False)
    assert proc.returncode == 2 and "cannot be combined" in proc.stderr and not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="cache_interval must be a whole number"):
        Pipeline.load(cut, preload=False).generate(PROMPT, steps=2, cache_interval=1.5)


@pytest.mark.skipif(not (REPO / "converters/assets/default_model/model_index.json").is_file(),
                    reason="no trained default model shipped")
def test_default_model_draws_the_same_scenes_with_the_cache(tmp_path):
    out = tmp_path / "default-dc"
    run_edge("convert", "default", "--deep-cache", "--no-tiled-vae", "-o", out)
    pipe = Pipeline.load(out)
    cases = [("a red circle on a blue background", Scene("blue", (SceneObject("circle", "red", "large", "centre"),))),
             ("a large yellow square on a black background",
              Scene("black", (SceneObject("square", "yellow", "large", "centre"),)))]
    for interval in (2, 3):
        for prompt, scene in cases:
            hits = 0
            for seed in range(3):
                fast = pipe.generate(prompt, steps=20, guidance=5.0, seed=seed, cache_interval=interval)
                s = score(np.asarray(fast.images[0]), scene)
                hits += s["background"] and s["color"] and s["shape"]
            assert hits >= 2, f"{prompt!r}, interval {interval}: {hits}/3 seeds drawn as asked"
