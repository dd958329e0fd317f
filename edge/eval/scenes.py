"""Procedural 64x64 scenes with captions: the training data and the evaluation set of the default model.

A scene is one object (or two, side by side or stacked) on a plain background. Every attribute
comes from a small vocabulary chosen so that plain image analysis can read it back
(`edge.eval.scorer`). Some colour x shape x position combinations never occur in training
(`HELD_OUT`); the evaluation set asks for all of them, to test whether the model composes
attributes it has only seen apart.

numpy + pillow only: the device side imports this module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Well-separated colours (every pair is > 140 apart in RGB), so nearest-colour classification
# survives the blur and drift of a tiny diffusion model.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 50),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Shapes the default model never saw: its training draws from SHAPES only. The LoRA example
# (`converters/default_model/train_lora.py`, `converters/assets/loras/`) teaches them; the scorer reads them.
TAUGHT_SHAPES: tuple[str, ...] = ("cross",)
TAUGHT_SIZE = "large"  # the default model's VAE draws a small cross as a diamond (a large one reads 30/30 cross)
# Side of the object's square bounding box, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.28, "large": 0.44}
# Centre of the object's bounding box, as (x, y) fractions of the image side; y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "centre": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
# Two-object scenes: (position of the first object, position of the second) for each relation.
RELATIONS: dict[str, tuple[str, str]] = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
TWO_OBJECT_SIZE = "small"

# (colour, shape, position) triples that training never shows, in a single- or a two-object
# scene. Chosen as (COLORS[k % 6], SHAPES[k % 4], POSITIONS[k % 5]) for k = 1..12: each colour
# twice, each shape three times, every position, and every colour-shape pair stays seen elsewhere.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset({
    ("green", "square", "left"),
    ("blue", "triangle", "right"),
    ("yellow", "diamond", "top"),
    ("white", "circle", "bottom"),
    ("black", "square", "centre"),
    ("red", "triangle", "left"),
    ("green", "diamond", "right"),
    ("blue", "circle", "top"),
    ("yellow", "square", "bottom"),
    ("white", "triangle", "centre"),
    ("black", "diamond", "left"),
    ("red", "circle", "right"),
})

SPLITS = ("train", "held_out")
JITTER_XY = 0.03  # training scenes: largest shift of an object's centre, fraction of image side
JITTER_SCALE = 0.08  # training scenes: largest relative change of an object's size
SUPERSAMPLE = 4  # render at 4x and box-downsample: anti-aliased edges


@dataclass(frozen=True)
class SceneObject:
    """One filled shape. `dx`, `dy`, `scale` are small training jitters; evaluation uses none."""

    shape: str  # one of SHAPES
    color: str  # one of COLORS
    size: str  # one of SIZES
    position: str  # one of POSITIONS
    dx: float = 0.0  # shift of the centre, fraction of the image side
    dy: float = 0.0
    scale: float = 1.0  # multiplies SIZES[size]

    def __post_init__(self) -> None:
        for field, value, allowed in (("shape", self.shape, SHAPES + TAUGHT_SHAPES), ("color", self.color, COLORS),
                                      ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"SceneObject {field}={value!r}; expected one of {list(allowed)}")

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.color, self.shape, self.position)


@dataclass(frozen=True)
class Scene:
    """A background colour and one or two objects (two: different colours, opposite positions)."""

    background: str  # one of COLORS
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if self.background not in COLORS:
            raise ValueError(f"Scene background={self.background!r}; expected one of {list(COLORS)}")
        if len(self.objects) not in (1, 2):
            raise ValueError(f"Scene has {len(self.objects)} objects; expected 1 or 2")
        if any(o.color == self.background for o in self.objects):
            raise ValueError(f"Scene: an object has the background colour {self.background!r}")
        if len(self.objects) == 2:
            a, b = self.objects
            if a.color == b.color:
                raise ValueError(f"Scene: both objects are {a.color!r}; two-object scenes need two colours")
            if (a.position, b.position) not in RELATIONS.values():
                raise ValueError(f"Scene: positions {a.position!r}, {b.position!r} are not a relation; "
                                 f"expected one of {list(RELATIONS.values())}")

    @property
    def relation(self) -> str | None:
        """'left of' etc. for two-object scenes (first object relative to the second), else None."""
        if len(self.objects) == 1:
            return None
        pair = (self.objects[0].position, self.objects[1].position)
        return next(name for name, positions in RELATIONS.items() if positions == pair)


def is_held_out(scene: Scene) -> bool:
    """True if any object of the scene is a held-out colour x shape x position combination."""
    return any(o.triple in HELD_OUT for o in scene.objects)


def scene_group(scene: Scene) -> str:
    """Evaluation group: 'taught' (a shape only a LoRA teaches), 'held_out', 'two_object' or 'seen'."""
    if any(o.shape in TAUGHT_SHAPES for o in scene.objects):
        return "taught"
    if is_held_out(scene):
        return "held_out"
    return "two_object" if len(scene.objects) == 2 else "seen"


# ------------------------------------------------------------------------------------- render


def _outline(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """Polygon (or ellipse box for circles) of a shape centred at (cx, cy), in pixels."""
    h = side / 2
    if shape == "circle" or shape == "square":
        return [(cx - h, cy - h), (cx + h, cy + h)]
    if shape == "triangle":  # apex up, base at the bottom of the box
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "cross":  # a plus sign whose arms are a third of the side wide
        a = h / 3
        return [(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a), (cx + h, cy + a),
                (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h), (cx - a, cy + a), (cx - h, cy + a),
                (cx - h, cy - a), (cx - a, cy - a)]
    raise ValueError(f"shape={shape!r}; expected one of {list(SHAPES + TAUGHT_SHAPES)}")


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as an anti-aliased (size, size, 3) uint8 RGB image."""
    if size < 8:
        raise ValueError(f"render size={size}; expected at least 8 pixels")
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x, y = POSITIONS[obj.position]
        pts = _outline(obj.shape, (x + obj.dx) * big, (y + obj.dy) * big, SIZES[obj.size] * obj.scale * big)
        fill = PALETTE[obj.color]
        if obj.shape == "circle":
            draw.ellipse(pts, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(pts, fill=fill)
        else:
            draw.polygon(pts, fill=fill)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)  # (H, W, 3)


# ------------------------------------------------------------------------------------ caption

_WHERE: dict[str, tuple[str, ...]] = {
    "centre": ("in the centre", "in the center", "in the middle"),
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "at the top"),
    "bottom": ("at the bottom", "at the bottom"),
}
_RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
}
# Single-object templates. Those in _FULL_TEMPLATES name every attribute (used for evaluation).
_TEMPLATES = (
    "a {size} {color} {shape} {where}, {bg} background",
    "{bg} background with a {size} {color} {shape} {where}",
    "a {size} {color} {shape} on a {bg} background, {where}",
    "a {color} {shape} {where}, {bg} background",
)
_FULL_TEMPLATES = (0, 1, 2)
_PAIR_TEMPLATES = (
    "{a} {rel} {b} on a {bg} background",
    "{a} {rel} {b}, {bg} background",
    "{bg} background with {a} {rel} {b}",
)


def _choose(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _describe(template: str, obj: SceneObject, where: str, bg: str) -> str:
    return template.format(size=obj.size, color=obj.color, shape=obj.shape, where=where, bg=bg)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for the scene in one of a few phrasings, picked with `rng`."""
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        where = _choose(rng, _WHERE[obj.position])
        return _describe(_choose(rng, _TEMPLATES), obj, where, scene.background)
    first, second = scene.objects
    relation = scene.relation
    if rng.integers(2):  # say it the other way round: "B right of A"
        first, second = second, first
        relation = next(r for r, pair in RELATIONS.items() if pair == (first.position, second.position))
    return _choose(rng, _PAIR_TEMPLATES).format(
        a=f"a {first.color} {first.shape}", rel=_choose(rng, _RELATION_WORDS[relation]),
        b=f"a {second.color} {second.shape}", bg=scene.background)


def canonical_caption(scene: Scene, variant: int = 0) -> str:
    """A deterministic caption naming every attribute; `variant` picks the phrasing."""
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        template = _TEMPLATES[_FULL_TEMPLATES[variant % len(_FULL_TEMPLATES)]]
        return _describe(template, obj, _WHERE[obj.position][0], scene.background)
    a, b = scene.objects
    return _PAIR_TEMPLATES[variant % len(_PAIR_TEMPLATES)].format(
        a=f"a {a.color} {a.shape}", rel=scene.relation, b=f"a {b.color} {b.shape}", bg=scene.background)


# ------------------------------------------------------------------------------------- sample


def _jittered(rng: np.random.Generator, shape: str, color: str, size: str, position: str) -> SceneObject:
    dx, dy = rng.uniform(-JITTER_XY, JITTER_XY, size=2)
    scale = 1.0 + rng.uniform(-JITTER_SCALE, JITTER_SCALE)
    return SceneObject(shape, color, size, position, float(dx), float(dy), float(scale))


def _sample_single(rng: np.random.Generator, triple: tuple[str, str, str] | None) -> Scene:
    if triple is None:
        triple = (_choose(rng, COLORS), _choose(rng, SHAPES), _choose(rng, tuple(POSITIONS)))
    color, shape, position = triple
    background = _choose(rng, tuple(c for c in COLORS if c != color))
    return Scene(background, (_jittered(rng, shape, color, _choose(rng, tuple(SIZES)), position),))


def _sample_pair(rng: np.random.Generator) -> Scene:
    pos_a, pos_b = RELATIONS[_choose(rng, tuple(RELATIONS))]
    color_a, color_b, background = (COLORS[i] for i in rng.permutation(len(COLORS))[:3])
    a = _jittered(rng, _choose(rng, SHAPES), color_a, TWO_OBJECT_SIZE, pos_a)
    b = _jittered(rng, _choose(rng, SHAPES), color_b, TWO_OBJECT_SIZE, pos_b)
    return Scene(background, (a, b))


def sample_scene(rng: np.random.Generator, split: str = "train", two_object_prob: float = 0.25) -> Scene:
    """A random jittered scene. 'train' never contains a HELD_OUT triple; 'held_out' is one of them."""
    if split == "held_out":
        triples = sorted(HELD_OUT)
        return _sample_single(rng, triples[int(rng.integers(len(triples)))])
    if split != "train":
        raise ValueError(f"split={split!r}; expected one of {list(SPLITS)}")
    if not 0.0 <= two_object_prob <= 1.0:
        raise ValueError(f"two_object_prob={two_object_prob}; expected a probability in [0, 1]")
    while True:  # rejection: about 10% of single-object draws hit a held-out triple
        scene = _sample_pair(rng) if rng.random() < two_object_prob else _sample_single(rng, None)
        if not is_held_out(scene):
            return scene


# --------------------------------------------------------------------------------- evaluation


def _pick(options: tuple[str, ...], key: str) -> str:
    """Deterministic choice that depends on no RNG implementation: sha256 of a key."""
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def _eval_single(color: str, shape: str, position: str, size: str, salt: str) -> Scene:
    background = _pick(tuple(c for c in COLORS if c != color), f"bg/{color}/{shape}/{position}/{size}/{salt}")
    return Scene(background, (SceneObject(shape, color, size, position),))


def _eval_pairs(n: int) -> list[Scene]:
    scenes: list[Scene] = []
    i = -1
    while len(scenes) < n:
        i += 1
        relation = tuple(RELATIONS)[i % len(RELATIONS)]
        pos_a, pos_b = RELATIONS[relation]
        color_a = COLORS[i % len(COLORS)]
        color_b = _pick(tuple(c for c in COLORS if c != color_a), f"pair-b/{i}")
        background = _pick(tuple(c for c in COLORS if c not in (color_a, color_b)), f"pair-bg/{i}")
        a = SceneObject(SHAPES[i % len(SHAPES)], color_a, TWO_OBJECT_SIZE, pos_a)
        b = SceneObject(_pick(SHAPES, f"pair-shape/{i}"), color_b, TWO_OBJECT_SIZE, pos_b)
        scene = Scene(background, (a, b))
        if not is_held_out(scene) and scene not in scenes:
            scenes.append(scene)
    return scenes


def eval_scenes() -> list[Scene]:
    """The fixed evaluation scenes: every held-out triple x 2 sizes x 2 backgrounds (48), every
    seen colour x shape x position triple once (108), and two-object scenes (48); no jitter."""
    held_out = [_eval_single(c, s, p, size, salt)
                for c, s, p in sorted(HELD_OUT) for size in SIZES for salt in ("a", "b")]
    seen = [_eval_single(c, s, p, _pick(tuple(SIZES), f"size/{c}/{s}/{p}"), "seen")
            for c in COLORS for s in SHAPES for p in POSITIONS if (c, s, p) not in HELD_OUT]
    return held_out + seen + _eval_pairs(48)


def sample_taught_scene(rng: np.random.Generator, shape: str) -> Scene:
    """A random jittered single-object scene of a taught shape (any colour, position, background; TAUGHT_SIZE)."""
    if shape not in TAUGHT_SHAPES:
        raise ValueError(f"shape={shape!r} is not a taught shape; expected one of {list(TAUGHT_SHAPES)}")
    color = _choose(rng, COLORS)
    background = _choose(rng, tuple(c for c in COLORS if c != color))
    return Scene(background, (_jittered(rng, shape, color, TAUGHT_SIZE, _choose(rng, tuple(POSITIONS))),))


def taught_eval_prompts(shape: str) -> list[tuple[str, Scene]]:
    """(prompt, scene) for a taught shape: every colour x position once (30), TAUGHT_SIZE, no jitter, deterministic."""
    if shape not in TAUGHT_SHAPES:
        raise ValueError(f"shape={shape!r} is not a taught shape; expected one of {list(TAUGHT_SHAPES)}")
    scenes = [_eval_single(c, shape, p, TAUGHT_SIZE, "taught") for c in COLORS for p in POSITIONS]
    return [(canonical_caption(scene, variant=i), scene) for i, scene in enumerate(scenes)]


def eval_prompts() -> list[tuple[str, Scene]]:
    """The fixed evaluation set: (prompt, target scene) pairs, deterministic, >= 200 of them."""
    return [(canonical_caption(scene, variant=i), scene) for i, scene in enumerate(eval_scenes())]
