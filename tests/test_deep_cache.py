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


CUTS = {"3 chunks": (), "5 chunks": ("--split-unet", "5")}  # DeepCache's own cut; its parts cut further


@pytest.fixture(scope="module", params=list(CUTS))
def cut(request, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("deep-cache") / "bundle"
    run_edge("convert", models["folder-epsilon"], "--deep-cache", *CUTS[request.param], "-o", out)
    return out


def test_manifest_records_the_cut(cut):
    unet = json.loads((cut / "manifest.json").read_text())["components"]["unet"]
    chunks, deep = unet["chunks"], unet["deep_cache"]
    assert len(chunks) in (3, 5) and unet["split"]["psnr_vs_whole_db"] >= 60
    assert deep["cut_before"] == ["/unet/down_blocks.1/", "/unet/up_blocks.1/"]
    skip = deep["skip_chunks"]
    assert skip == list(range(skip[0], skip[-1] + 1)) and 0 < skip[0] and skip[-1] < len(chunks) - 1
    if len(chunks) == 3:
        assert skip == [1] and deep["skip_chunk"] == 1  # what runtimes before skip_chunks read
    else:
        assert len(skip) >= 2 and "skip_chunk" not in deep  # the deep part holds most weights: most chunks
    # what a cached step reuses: every tensor the chunks after the deep part read from it, and nothing else
    after = {t["name"] for c in chunks[skip[-1] + 1:] for t in c["inputs"]}
    made = {t["name"] for k in skip for t in chunks[k]["outputs"]}
    assert deep["cached"] and set(deep["cached"]) == made & after


def _scopes(bundle, k):
    import onnx

    model = onnx.load(str(bundle / f"unet_chunk{k}.onnx"), load_external_data=False)
    return {n.name.split("/")[2] for n in model.graph.node if n.name.startswith("/unet/")}


@pytest.fixture(scope="module")
def int8_cut(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("deep-cache-int8") / "bundle"
    run_edge("convert", models["folder-epsilon"], "--deep-cache", "--precision", "int8", "--no-tiled-vae",
             "--no-memory-profile", "-o", out)
    return out


def test_int8_bundle_caches_the_deep_part(cut, int8_cut):
    """onnxruntime's quantizer moves every node that reads only encoder_hidden_states or the timestep (the
    cross-attention keys and values, the time projections) to the front of the graph; the cut still puts each
    block's work in its own part, and a cached int8 step is the cached fp32 step, quantised."""
    out = int8_cut
    head, deep, tail = _scopes(out, 0), _scopes(out, 1), _scopes(out, 2)
    assert "down_blocks.1" not in head and "mid_block" not in head and not any(s.startswith("up_") for s in head)
    assert "mid_block" in deep and "down_blocks.0" not in deep and "up_blocks.1" not in deep
    assert "mid_block" not in tail and "down_blocks.1" not in tail
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    int8 = Pipeline.load(out)
    plain = int8.generate(PROMPT, steps=9, latents=latents)
    cached = int8.generate(PROMPT, steps=9, latents=latents, cache_interval=3)
    assert psnr(plain.latents, cached.latents) < 80  # the cache was used
    fp32 = Pipeline.load(cut).generate(PROMPT, steps=9, latents=latents, cache_interval=3)
    assert psnr(fp32.latents, cached.latents) >= 35


def test_older_bundles_name_one_skipped_chunk(cut):
    """A manifest written before the deep part could be several chunks reads as the same cut."""
    from edge.bundle import parse_manifest

    data = json.loads((cut / "manifest.json").read_text())
    dc = data["components"]["unet"]["deep_cache"]
    if len(dc["skip_chunks"]) > 1:
        pytest.skip("only a single deep chunk was ever written as skip_chunk")
    del dc["skip_chunks"]
    assert parse_manifest(data, "old").components["unet"].deep_cache["skip_chunks"] == [1]


def test_interval_one_is_the_uncut_unet(cut, bundles):
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    plain = Pipeline.load(bundles["folder-epsilon"]).generate(PROMPT, steps=6, latents=latents)
    ours = Pipeline.load(cut).generate(PROMPT, steps=6, latents=latents, cache_interval=1)
    assert psnr(plain.latents, ours.latents) >= 100


def test_bench_measures_the_cached_run(cut, tmp_path):
    """`edge bench --cache-interval 2`: edge's run is the cached generation (its image is generate's at that
    interval, from the latents bench saved), and the report says so."""
    from PIL import Image

    from test_bench import run_bench

    proc = run_bench(cut, "--steps", "4", "--no-peers", "--cache-interval", "2", "-o", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    run = results["runs"][0]
    assert results["config"]["cache_interval"] == run["cache_interval"] == 2 and "DeepCache" in run["runtime"]
    latents = np.load(tmp_path / "o" / "latents.npy")
    pipe = Pipeline.load(cut)
    cached = pipe.generate(results["config"]["prompt"], steps=4, latents=latents, cache_interval=2, guidance=7.5)
    whole = pipe.generate(results["config"]["prompt"], steps=4, latents=latents, guidance=7.5)
    benched = np.asarray(Image.open(tmp_path / "o" / "edge.png"))
    assert np.array_equal(benched, np.asarray(cached.images[0]))
    assert not np.array_equal(benched, np.asarray(whole.images[0]))


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


def test_streamed_chunks_cache_the_same_and_skip_loading_the_deep_part(cut):
    """With the UNet's chunks loaded for every call (the smallest budgets), a cached step neither runs nor loads
    the deep part, and the image is the resident one's."""
    class Streamed(Pipeline):
        loads: list[int] = []

        def plan_for(self, height, width, num_images=1, guided=True, image=False, decoder="full"):
            return Plan(None, resident=False, guidance_batch=2, unet_per_call=True, vae_tile=None, vae_overlap=0,
                        base=0, unet_keep=0)

        def _new_session(self, component, k):
            if component.name == "unet":
                self.loads.append(k)
            return super()._new_session(component, k)

    resident = Pipeline.load(cut).generate(PROMPT, steps=6, seed=4, cache_interval=3)
    pipe = Streamed.load(cut)
    streamed = pipe.generate(PROMPT, steps=6, seed=4, cache_interval=3)
    assert psnr(resident.latents, streamed.latents) >= 100
    chunks = len(pipe.manifest.components["unet"].graphs)
    skip = pipe.manifest.components["unet"].deep_cache["skip_chunks"]
    full, cached = 2, 4  # steps 0 and 3 run the whole UNet
    assert sorted(pipe.loads) == sorted(list(range(chunks)) * full + [k for k in range(chunks) if k not in skip] * cached)


def test_bad_cache_arguments(cut, bundles, models, tmp_path):
    proc = run_edge("generate", bundles["folder-epsilon"], PROMPT, "--cache-interval", "3", "-o", tmp_path / "a.png",
                    check=False)
    assert proc.returncode == 2 and "--deep-cache" in proc.stderr and not (tmp_path / "a.png").exists()
    proc = run_edge("generate", cut, PROMPT, "--cache-interval", "0", "-o", tmp_path / "b.png", check=False)
    assert proc.returncode == 2 and "--cache-interval" in proc.stderr
    proc = run_edge("convert", models["folder-epsilon"], "--deep-cache", "--split-unet", "2", "-o", tmp_path / "c",
                    check=False)
    assert proc.returncode == 2 and "expected 3 chunks or more" in proc.stderr and not (tmp_path / "c").exists()
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
