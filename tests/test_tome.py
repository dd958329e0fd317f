"""Token merging (ToMe): merge/unmerge against a plain per-token reference, the exported UNet against torch with
the same merging (every attention kernel, two latent sizes), the default model converted with it end to end, and
the refusals of bad ratios."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import REPO, run_edge
from edge.converters.tome import MAX_RATIO, install_token_merging, match, merge, unmerge
from edge.metrics import psnr


def _reference(x: np.ndarray, h: int, w: int, ratio: float) -> tuple[np.ndarray, int]:
    """unmerge(merge(x)) for one image, token by token, straight from the paper's description: destinations are
    the top-left token of every whole 2x2 window; each other token's most similar destination (cosine); the
    floor(ratio * N) most similar sources join theirs; every member of a group ends up as the group's mean."""
    n = h * w
    dst = [i * w + j for i in range(0, h - h % 2, 2) for j in range(0, w - w % 2, 2)]
    src = [p for p in range(n) if p not in dst]
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    sims = unit[src] @ unit[dst].T  # (S, D)
    best, best_dst = sims.max(axis=1), sims.argmax(axis=1)
    merged = np.argsort(-best, kind="stable")[:int(n * ratio)]
    out = x.copy()
    for k, d in enumerate(dst):
        group = [d] + [src[i] for i in merged if best_dst[i] == k]
        out[group] = x[group].mean(axis=0)
    return out, len(merged)


@pytest.mark.parametrize("h, w", [(8, 8), (6, 10), (7, 9)])  # odd sides: the last row / column has no windows
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, MAX_RATIO])
def test_merge_then_unmerge_is_the_group_means(h, w, ratio):
    x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(h * w), dtype=torch.float64)
    m = match(x, h, w, ratio)
    y = merge(x, m)
    back = unmerge(y, m)
    for b in range(2):
        want, r = _reference(x[b].numpy(), h, w, ratio)
        assert y.shape == (2, h * w - r, 16) and m.merged.shape == (2, r)
        np.testing.assert_allclose(back[b].numpy(), want, rtol=0, atol=1e-12)


def test_identical_windows_merge_and_come_back_exactly():
    """Every 2x2 window four copies of one token: at 0.75 each window collapses to its destination (cosine 1),
    attention sees one token per window, and unmerging gives the input back bit for bit."""
    windows = torch.randn(2, 4, 5, 32, generator=torch.Generator().manual_seed(0))  # (B, h/2, w/2, C)
    x = windows.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 80, 32)  # (B, 8x10, C)
    m = match(x, 8, 10, 0.75)
    y = merge(x, m)
    assert y.shape == (2, 20, 32)
    torch.testing.assert_close(torch.sort(y, dim=1).values, torch.sort(windows.reshape(2, 20, 32), dim=1).values,
                               rtol=0, atol=0)
    assert torch.equal(unmerge(y, m), x)


def _tiny_unet_spec():
    from edge.converters.onnx_export import component_specs
    from edge.converters.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=3)
    return pipe, next(s for s in component_specs(pipe) if s.name == "unet")


def test_attention_runs_on_the_merged_tokens_and_remove_restores_the_unet():
    pipe, spec = _tiny_unet_spec()
    inputs = spec.example(torch.Generator().manual_seed(0), 8, 12)  # latent 8x12: 96 tokens at the top level
    with torch.no_grad():
        plain = spec.module(*inputs)
        tome = install_token_merging(pipe.unet, 0.5)
        seen = {}
        spies = [pipe.unet.get_submodule(name).attn1.register_forward_pre_hook(  # after ToMe's: sees what attn1 gets
            lambda mod, args, name=name: seen.update({name: args[0].shape})) for name in tome.blocks]
        merged = spec.module(*inputs)
        for spy in spies:
            spy.remove()
        tome.remove()
        again = spec.module(*inputs)
    assert tome.blocks == ["down_blocks.0.attentions.0.transformer_blocks.0",
                           "up_blocks.1.attentions.0.transformer_blocks.0",
                           "up_blocks.1.attentions.1.transformer_blocks.0"]
    assert all(shape[1] == 96 - 48 for shape in seen.values()) and len(seen) == 3
    assert 20 < psnr(plain.numpy(), merged.numpy()) < 60  # an approximation, not a no-op
    assert torch.equal(plain, again)


@pytest.mark.parametrize("kernel", ["fused", "original", "sliced", "split_einsum"])
def test_onnx_graph_matches_torch_with_token_merging_at_two_sizes(kernel, tmp_path):
    """Exported as `edge convert` exports it (the kernel's processor for the export, diffusers' own attention for
    the reference); the latent size is read at run time, so one graph serves both sizes."""
    from edge.converters.onnx_export import export, parity
    from edge.kernels.processor import use_attention

    pipe, spec = _tiny_unet_spec()
    g = torch.Generator().manual_seed(1)
    install_token_merging(pipe.unet, 0.5)
    default = pipe.unet.attn_processors
    use_attention(pipe.unet, kernel, 16 if kernel == "sliced" else None)
    (tmp_path / "scratch").mkdir()
    files, _ = export(spec, tmp_path / "unet.onnx", spec.example(g, 4, 4), tmp_path / "scratch")
    pipe.unet.set_attn_processor(default)
    for h, w in [(8, 8), (12, 20)]:
        check = parity(spec, files[0], spec.example(g, h, w))
        assert check["psnr_db"] > 60, (kernel, h, w, check)


@pytest.mark.skipif(not (REPO / "converters/assets/default_model/model_index.json").is_file(),
                    reason="no trained default model shipped")
def test_default_model_converted_with_token_merging_draws_the_scenes(tmp_path):
    from edge import Pipeline
    from edge.eval.scenes import Scene, SceneObject
    from edge.eval.scorer import score

    out = tmp_path / "default-tome"
    run_edge("convert", "default", "--token-merging", "0.5", "--no-memory-profile", "--no-tiled-vae", "-o", out)
    unet = json.loads((out / "manifest.json").read_text())["components"]["unet"]
    merging = unet["attention"]["token_merging"]
    assert merging["ratio"] == 0.5
    assert merging["blocks"] == ["down_blocks.0.attentions.0.transformer_blocks.0",
                                 "up_blocks.1.attentions.0.transformer_blocks.0",
                                 "up_blocks.1.attentions.1.transformer_blocks.0"]
    assert unet["parity"]["psnr_db"] > 60 and "token merging" in unet["parity"]["reference"]
    assert 15 < merging["psnr_vs_unmerged_db"] < 60
    assert "token merging 0.5 in 3 blocks" in run_edge("info", out).stdout

    pipe = Pipeline.load(out)
    cases = [("a red circle on a blue background", Scene("blue", (SceneObject("circle", "red", "large", "centre"),))),
             ("a large yellow square on a black background",
              Scene("black", (SceneObject("square", "yellow", "large", "centre"),)))]
    for prompt, scene in cases:
        hits = 0
        for seed in range(3):
            s = score(np.asarray(pipe.generate(prompt, steps=20, guidance=5.0, seed=seed).images[0]), scene)
            hits += s["background"] and s["color"] and s["shape"]
        assert hits >= 2, f"{prompt!r}: {hits}/3 seeds drawn as asked"


@pytest.mark.parametrize("ratio", [0, -0.1, 0.76, 1.0, math.nan, math.inf, True, "0.5"])
def test_options_refuse_bad_ratios(ratio):
    from edge.converters.convert import ConvertError, Options

    with pytest.raises(ConvertError, match=r"--token-merging .*: expected a ratio > 0 and <= 0.75"):
        Options(token_merging=ratio)


def test_options_refuse_token_merging_for_core_ml():
    from edge.converters.convert import ConvertError, Options

    with pytest.raises(ConvertError, match="Core ML target"):
        Options(token_merging=0.5, targets=("onnx", "coreml"))


@pytest.mark.parametrize("text", ["0", "0.8", "nan", "-0.5", "half"])
def test_cli_refuses_bad_ratios_in_one_line(text, tmp_path):
    proc = run_edge("convert", "default", "--token-merging", text, "-o", tmp_path / "b", check=False)
    assert proc.returncode == 2 and not (tmp_path / "b").exists()
    assert proc.stderr.strip().splitlines() == [
        f"error: --token-merging must be a ratio > 0 and <= 0.75 (the fraction of tokens merged; one destination "
        f"per 2x2 window), got {text}"]
