"""The scorer reads the renderer's own scenes back (clean, and blurred + noisy), and the
evaluation set is fixed and covers every held-out combination."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from edge.eval.scenes import (HELD_OUT, SHAPES, TAUGHT_SHAPES, Scene, SceneObject, eval_prompts, render, sample_scene,
                              sample_taught_scene, scene_group, taught_eval_prompts)
from edge.eval.scorer import read_scene, score, summarize

N_SCENES = 500
FIELDS = ("background", "color", "shape", "position", "size", "all")


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild Gaussian blur (radius 1 px) + Gaussian noise (sigma 10 of 255)."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    return np.clip(blurred + rng.normal(0.0, 10.0, blurred.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(20240601)
    return [sample_scene(rng) for _ in range(N_SCENES)]


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "blur+noise"])
def test_scorer_reads_rendered_scenes(scenes: list[Scene], degraded: bool) -> None:
    rng = np.random.default_rng(7)
    results = [score(_degrade(render(s), rng) if degraded else render(s), s) for s in scenes]
    accuracy = summarize(results)
    low = {k: accuracy[k] for k in FIELDS if accuracy[k] < 0.99}
    assert not low, f"scorer accuracy below 99% ({'degraded' if degraded else 'clean'}): {low}; all: {accuracy}"


def test_two_object_scenes_are_covered(scenes: list[Scene]) -> None:
    assert sum(len(s.objects) == 2 for s in scenes) > N_SCENES // 10


def test_scorer_rejects_wrong_targets() -> None:
    scene = Scene("blue", (SceneObject("circle", "red", "large", "left"),))
    wrong = Scene("white", (SceneObject("square", "green", "large", "right"),))
    result = score(render(scene), wrong)
    assert not any(result[k] for k in ("background", "color", "shape", "position", "all"))
    assert score(render(scene), scene)["all"]


def test_blank_image_scores_nothing() -> None:
    scene = Scene("blue", (SceneObject("circle", "red", "small", "top"),))
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    assert read_scene(blank)["objects"] == []
    assert score(blank, scene) == {"background": False, "color": False, "shape": False, "position": False,
                                   "size": False, "count": False, "all": False}


def test_eval_prompts_are_fixed_and_cover_held_out() -> None:
    prompts = eval_prompts()
    assert prompts == eval_prompts()
    assert len(prompts) >= 200
    assert len({p for p, _ in prompts}) == len(prompts), "duplicate prompts"
    asked = {o.triple for _, s in prompts for o in s.objects}
    assert HELD_OUT <= asked, f"held-out triples missing from the eval set: {sorted(HELD_OUT - asked)}"


def test_train_split_never_shows_held_out() -> None:
    rng = np.random.default_rng(0)
    shown = {o.triple for _ in range(5000) for o in sample_scene(rng, split="train").objects}
    assert not shown & HELD_OUT
    held = {o.triple for _ in range(200) for o in sample_scene(rng, split="held_out").objects}
    assert held == HELD_OUT


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="shape='star'"):
        SceneObject("star", "red", "small", "left")
    with pytest.raises(ValueError, match="split='test'"):
        sample_scene(np.random.default_rng(0), split="test")


def test_taught_shape_is_read_only_when_asked_for() -> None:
    rng = np.random.default_rng(3)
    scenes = [sample_taught_scene(rng, "cross") for _ in range(60)]
    degraded = [_degrade(render(s), rng) for s in scenes]
    assert summarize([score(img, s) for img, s in zip(degraded, scenes)])["all"] == 1.0  # the scene names it
    # The default vocabulary has no cross: a cross is read as one of the four shapes, never as "cross".
    assert all(read_scene(img)["objects"][0]["shape"] in SHAPES for img in degraded)
    # With the taught shapes in the vocabulary the ordinary scenes still read right.
    ordinary = [sample_scene(rng) for _ in range(100)]
    assert summarize([score(render(s), s, SHAPES + TAUGHT_SHAPES) for s in ordinary])["all"] == 1.0


def test_taught_prompts_are_fixed_and_name_the_shape() -> None:
    prompts = taught_eval_prompts("cross")
    assert prompts == taught_eval_prompts("cross") and len(prompts) == 30
    assert all("cross" in p and s.objects[0].shape == "cross" for p, s in prompts)
    assert {scene_group(s) for _, s in prompts} == {"taught"}
    with pytest.raises(ValueError, match="not a taught shape"):
        taught_eval_prompts("circle")
    with pytest.raises(ValueError, match="expected names from"):
        read_scene(render(prompts[0][1]), ("circle", "star"))
