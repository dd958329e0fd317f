"""The negative LoRA's recipe does what it says (each corruption degrades a render the way its name says, the trigger
rides exactly on the corrupted share), and the shipped LoRA loads on the default bundle and changes, with its
trigger as the negative prompt, what the model draws. benchmarks/negative_lora.py measures whether that helps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REPO
from edge.converters.default_model import models
from edge.converters.default_model.train_lora import DEFAULT_MODEL
from edge.converters.default_model.train_negative_lora import (CORRUPTIONS, TRIGGER, blur, colour, corrupt, encode,
                                                               ghost, gradient, jpeg, laplacian_variance,
                                                               negative_pool, noise, psnr, smear)
from edge.eval.scenes import PALETTE, eval_prompts, eval_scenes, render

SHIPPED = REPO / "converters" / "assets" / "loras" / "wrong.safetensors"
RENDERS = [(render(s), s) for s in eval_scenes()[::25]]  # 9 scenes: one and two objects, every size


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def _covered(image: np.ndarray, background: str) -> int:
    """Pixels unlike the background colour."""
    return int((np.abs(image.astype(np.int16) - np.array(PALETTE[background])).max(-1) > 8).sum())


def _off_palette(image: np.ndarray) -> float:
    """Mean RGB distance of a pixel to its nearest palette colour."""
    palette = np.array(list(PALETTE.values()), np.float32)  # (K, 3)
    return float(np.linalg.norm(image[:, :, None].astype(np.float32) - palette, axis=-1).min(-1).mean())


def test_blur_and_smear_lower_the_sharpness_of_every_render():
    rng = np.random.default_rng(0)
    for image, _ in RENDERS:
        for fn in (blur, smear):
            out = fn(image, rng)
            assert gradient(out) < 0.85 * gradient(image), fn.__name__
            assert laplacian_variance(out) < 0.5 * laplacian_variance(image), fn.__name__


def test_noise_raises_the_laplacian_and_costs_psnr():
    rng = np.random.default_rng(0)
    for image, _ in RENDERS:
        out = noise(image, rng)
        assert laplacian_variance(out) > 5 * laplacian_variance(image)
        assert psnr(out, image) < 20.0


def test_colour_washes_out_and_jpeg_and_ghost_damage_the_shape():
    rng = np.random.default_rng(0)
    for image, scene in RENDERS:
        assert _off_palette(colour(image, rng)) > 20.0 > 5.0 > _off_palette(image)
        assert _covered(ghost(image, rng), scene.background) > 1.2 * _covered(image, scene.background)
        assert 15.0 < psnr(jpeg(image, rng), image) < 32.0


def test_corrupt_applies_one_or_two_named_corruptions_reproducibly():
    image = RENDERS[0][0]
    seen = set()
    for seed in range(30):
        out, names = corrupt(image, np.random.default_rng(seed))
        assert 1 <= len(names) <= 2 and len(set(names)) == len(names) and set(names) <= set(CORRUPTIONS)
        again, _ = corrupt(image, np.random.default_rng(seed))
        assert np.array_equal(out, again) and not np.array_equal(out, image)
        seen.update(names)
    assert seen == set(CORRUPTIONS)


def test_the_trigger_is_one_token_no_caption_uses():
    assert models.load_tokenizer().tokenize(TRIGGER) == [f"{TRIGGER}</w>"]
    assert not any(TRIGGER in prompt.split() for prompt, _ in eval_prompts())


def test_the_pool_carries_the_trigger_exactly_on_its_corrupted_share():
    vae = models.load_pipeline(DEFAULT_MODEL).vae
    pool = negative_pool(vae, 24, 0.25, np.random.default_rng(0))
    assert int(pool.corrupted.sum()) == 6 and pool.scaling_factor == vae.config.scaling_factor
    assert all(bool(c) == bool(names) for c, names in zip(pool.corrupted, pool.corruptions))
    idx = np.arange(24)
    for text, bad in zip(pool.captions(idx, np.random.default_rng(1), 0.0), pool.corrupted):
        assert text.endswith(f", {TRIGGER}") if bad else TRIGGER not in text.split(), text
    dropped = pool.captions(idx, np.random.default_rng(1), 1.0)
    assert dropped == [TRIGGER if bad else "" for bad in pool.corrupted]
    clean_means, _ = encode(vae, np.stack([render(s) for s in pool.scenes]))
    moved = (pool.mean - clean_means).flatten(1).norm(dim=1)  # (N,)
    assert torch.all(moved[pool.corrupted] > 0.1) and torch.all(moved[~pool.corrupted] < 1e-5)
    latents, captions, objects, labels = pool.batch(np.random.default_rng(2), 16, torch.Generator().manual_seed(0),
                                                    0.5)
    assert latents.shape == (16, 4, 8, 8) and objects.shape == (16, 1, 8, 8)
    assert all(label == -1 for c, label in zip(captions, labels.tolist()) if c in ("", TRIGGER))


def test_shipped_lora_is_small_and_says_how_it_was_trained():
    log = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert log["trigger"] == TRIGGER and {"settings", "corruptions", "timings_s", "loss", "command"} <= set(log)
    assert SHIPPED.stat().st_size < 1_000_000


def test_the_lora_gives_its_trigger_a_meaning_and_the_negative_prompt_uses_it(default_bundle):
    from edge import Pipeline

    pipe = Pipeline.load(default_bundle, threads=1)
    lora = [(SHIPPED, 1.0)]

    def draw(prompt: str, seed: int, **options) -> np.ndarray:
        image = pipe.generate(prompt, steps=12, guidance=5.0, scheduler="euler", seed=seed, **options).images[0]
        return np.asarray(image)  # (H, W, 3) uint8

    plain, triggered = [], []
    for seed, (prompt, scene) in enumerate(eval_prompts()[::68]):  # 3 prompts: held out, seen, two objects
        base = draw(prompt, seed)
        assert np.array_equal(base, draw(prompt, seed))
        token_only = np.abs(draw(prompt, seed, negative_prompt=TRIGGER).astype(np.int16) - base).mean()
        negative = np.abs(draw(prompt, seed, negative_prompt=TRIGGER, loras=lora).astype(np.int16) - base).mean()
        assert negative > 0.5 and negative > 4 * token_only, (prompt, negative, token_only)
        plain.append(psnr(draw(prompt, seed, loras=lora), render(scene)))
        triggered.append(psnr(draw(f"{prompt}, {TRIGGER}", seed, loras=lora), render(scene)))
    assert np.mean(triggered) < np.mean(plain) - 2.0, (plain, triggered)  # the trigger asks for a corrupted scene
