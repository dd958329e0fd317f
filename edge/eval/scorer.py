"""Read a scene back from an image by plain image analysis, and score it against its target.

No learned model: after a median filter, pixels are snapped to the nearest palette colour; the
background is the commonest colour of the border; objects are connected regions of other
colours (speckles ignored, touching objects split by colour); each object's mask is then cut
at the midpoint between background and object colour; its shape is the template (circle,
square, ...) of the same area and centroid that overlaps it best; its position and size come
from its bounding box. Robust to the blur, noise and colour drift of a tiny diffusion model.

numpy + pillow only: the device side imports this module.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from PIL import Image, ImageFilter

from edge.eval.scenes import COLORS, PALETTE, POSITIONS, RELATIONS, SHAPES, SIZES, TAUGHT_SHAPES, Scene

MIN_AREA = 0.005  # smallest object, fraction of the image (20 px at 64x64): smaller is speckle
SPLIT_SHARE = 0.25  # a region holding two colours each >= this share is split into two objects
CENTRE_BAND = 0.125  # |offset from centre| below this (fraction of side) on both axes: 'centre'
BORDER = 2  # pixels of the border ring that decide the background colour
_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (K, 3)
_SIZE_CUT = (SIZES["small"] + SIZES["large"]) / 2  # bounding-box side separating small from large
SCORE_KEYS = ("background", "color", "shape", "position", "size", "count", "all")


def _smooth(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 image after a 3x3 median filter, which removes speckle noise."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image of shape {image.shape} and dtype {image.dtype}; expected (H, W, 3) uint8")
    return np.asarray(Image.fromarray(image).filter(ImageFilter.MedianFilter(3)), dtype=np.float32)


def classify_pixels(smooth: np.ndarray) -> np.ndarray:
    """(H, W) index into COLORS of each pixel's nearest palette colour."""
    dist = ((smooth[:, :, None, :] - _PALETTE_RGB[None, None]) ** 2).sum(-1)  # (H, W, K)
    return dist.argmin(-1)  # (H, W)


def _background(labels: np.ndarray) -> int:
    ring = np.concatenate([labels[:BORDER].ravel(), labels[-BORDER:].ravel(),
                           labels[:, :BORDER].ravel(), labels[:, -BORDER:].ravel()])
    return int(np.bincount(ring, minlength=len(COLORS)).argmax())


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean (H, W) mask, each as an (N, 2) array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        regions.append(np.array(pixels))
    return regions


_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}  # area / box area


def _template(shape: str, cx: float, cy: float, side: float, height: int, width: int) -> np.ndarray:
    """(height, width) coverage in [0, 1] of a shape whose *centroid* is (cx, cy), in pixels.

    Sampled at 2x2 points per pixel, like the renderer's box-filtered edges.
    """
    sub = (np.arange(2) + 0.5) / 2
    y = (np.arange(height)[:, None] + sub[None, :]).reshape(-1, 1)  # (2h, 1) pixel-centre rows
    x = (np.arange(width)[:, None] + sub[None, :]).reshape(1, -1)  # (1, 2w)
    h = side / 2
    if shape == "triangle":  # apex up; the centroid sits a sixth of the side below the box centre
        top = cy - h / 3 - h
        inside = (np.abs(x - cx) <= (y - top) / 2) & (y <= top + side)
    elif shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif shape == "square":
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "diamond":
        inside = np.abs(x - cx) + np.abs(y - cy) <= h
    elif shape == "cross":
        ax, ay = np.abs(x - cx), np.abs(y - cy)
        inside = (ax <= h) & (ay <= h) & ((ax <= h / 3) | (ay <= h / 3))
    else:
        raise ValueError(f"shape={shape!r}; expected one of {list(SHAPES + TAUGHT_SHAPES)}")
    return inside.reshape(height, 2, width, 2).mean(axis=(1, 3))  # (h, w)


def _read_shape(mask: np.ndarray, shapes: tuple[str, ...]) -> tuple[str, dict[str, float]]:
    """The shape of `shapes` whose template, placed at the region's centroid with the region's area,
    overlaps it best (soft IoU). Area and centroid barely move under blur, unlike the bounding box."""
    rows, cols = np.nonzero(mask)
    cy, cx = rows.mean() + 0.5, cols.mean() + 0.5
    target = mask.astype(np.float32)
    ious = {}
    for shape in shapes:
        t = _template(shape, cx, cy, float(np.sqrt(len(rows) / _FILL[shape])), *mask.shape)
        ious[shape] = float(np.minimum(t, target).sum() / np.maximum(t, target).sum())
    return max(ious, key=ious.get), ious


def _read_position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTRE_BAND:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _describe(mask: np.ndarray, color: int, shapes: tuple[str, ...]) -> dict:
    side = mask.shape[0]
    rows, cols = np.nonzero(mask)
    x0, y0, x1, y1 = int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1
    cx, cy = (x0 + x1) / 2 / side, (y0 + y1) / 2 / side
    shape, ious = _read_shape(mask, shapes)
    return {
        "color": COLORS[color],
        "shape": shape,
        "position": _read_position(cx, cy),
        "size": "large" if max(x1 - x0, y1 - y0) / side > _SIZE_CUT else "small",
        "center": (cx, cy),  # bounding-box centre, fractions of the side
        "bbox": (x0, y0, x1, y1),  # pixels, end exclusive
        "area": len(rows) / side**2,
        "shape_iou": ious,
    }


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a boolean mask by `steps` pixels (4-neighbourhood)."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _refine(pixels: np.ndarray, smooth: np.ndarray, color: int, background: int) -> np.ndarray:
    """The object's (H, W) mask: pixels near the region that are nearer its colour than the
    background's, measured along the background -> object colour line. Snapping to the palette
    alone would give blurred edges a halo of a third colour (grey rims read as green)."""
    near = np.zeros(smooth.shape[:2], dtype=bool)
    near[pixels[:, 0], pixels[:, 1]] = True
    bg, fg = _PALETTE_RGB[background], _PALETTE_RGB[color]
    t = ((smooth - bg) @ (fg - bg)) / float((fg - bg) @ (fg - bg))  # (H, W) 0 = background, 1 = object
    return _dilate(near, 2) & (t >= 0.5)


def _interior_labels(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels where a pixel's four neighbours share its colour, else -1: blurred edges
    between two colours snap to a third one in a rim one or two pixels thick, which this drops."""
    inner = labels.copy()
    same = np.ones(labels.shape, dtype=bool)
    same[1:-1, 1:-1] = ((labels[1:-1, 1:-1] == labels[:-2, 1:-1]) & (labels[1:-1, 1:-1] == labels[2:, 1:-1])
                        & (labels[1:-1, 1:-1] == labels[1:-1, :-2]) & (labels[1:-1, 1:-1] == labels[1:-1, 2:]))
    inner[~same] = -1
    return inner


def _split_by_color(pixels: np.ndarray, labels: np.ndarray, inner: np.ndarray,
                    min_px: int) -> list[tuple[np.ndarray, int]]:
    """A region as one object of its main colour, or (touching objects) one per major colour.
    Colours are counted on interior pixels only, so a rim never becomes an object."""
    colors = inner[pixels[:, 0], pixels[:, 1]]  # (N,) -1 on edges
    counts = np.bincount(colors[colors >= 0], minlength=len(COLORS))
    if counts.sum() == 0:  # all edge (a thin streak): fall back to every pixel
        counts = np.bincount(labels[pixels[:, 0], pixels[:, 1]], minlength=len(COLORS))
    major = [k for k in np.argsort(-counts) if counts[k] >= max(min_px, SPLIT_SHARE * counts.sum())]
    if len(major) < 2:
        return [(pixels, int(counts.argmax()))]
    parts = []
    for k in major:
        mask = np.zeros(labels.shape, dtype=bool)
        mask[pixels[:, 0], pixels[:, 1]] = labels[pixels[:, 0], pixels[:, 1]] == k
        parts += [(p, int(k)) for p in connected_components(mask) if len(p) >= min_px]
    return parts


def read_scene(image: np.ndarray, shapes: tuple[str, ...] = SHAPES) -> dict:
    """{'background': colour, 'objects': [{'color', 'shape', 'position', 'size', ...}]}, largest first.

    Each object's shape is read as one of `shapes` (SHAPES, or with TAUGHT_SHAPES for a LoRA that teaches them).
    """
    if image.shape[0] != image.shape[1]:
        raise ValueError(f"image of shape {image.shape}; expected a square image")
    unknown = [s for s in shapes if s not in SHAPES + TAUGHT_SHAPES]
    if unknown or not shapes:
        raise ValueError(f"shapes={list(shapes)}; expected names from {list(SHAPES + TAUGHT_SHAPES)}")
    side = image.shape[0]
    smooth = _smooth(image)  # (H, W, 3)
    labels = classify_pixels(smooth)  # (H, W)
    inner = _interior_labels(labels)  # (H, W)
    background = _background(labels)
    min_px = max(4, round(MIN_AREA * side * side))
    objects = []
    for region in connected_components(labels != background):
        if len(region) < min_px:
            continue
        for pixels, color in _split_by_color(region, labels, inner, min_px):
            mask = _refine(pixels, smooth, color, background)
            if mask.sum() >= min_px:
                objects.append(_describe(mask, color, shapes))
    objects.sort(key=lambda o: -o["area"])
    return {"background": COLORS[background], "objects": objects}


def _relation_holds(a: dict, b: dict, relation: str) -> bool:
    """Is object a `relation` ('left of', ...) object b: displaced the right way, mostly on that axis."""
    pos_a, pos_b = RELATIONS[relation]
    want = np.subtract(POSITIONS[pos_a], POSITIONS[pos_b])  # (2,) e.g. (-0.5, 0) for 'left of'
    axis = int(abs(want[1]) > abs(want[0]))
    got = np.subtract(a["center"], b["center"])  # (2,)
    along = float(got[axis] * np.sign(want[axis]))
    across = float(abs(got[1 - axis]))
    return along > CENTRE_BAND and along > across


def _score_single(reading: dict, scene: Scene) -> dict[str, bool]:
    target = scene.objects[0]
    main = reading["objects"][0] if reading["objects"] else None
    return {
        "color": main is not None and main["color"] == target.color,
        "shape": main is not None and main["shape"] == target.shape,
        "position": main is not None and main["position"] == target.position,
        "size": main is not None and main["size"] == target.size,
    }


def _score_pair(reading: dict, scene: Scene) -> dict[str, bool]:
    """Objects are matched by colour (the largest region of each target colour)."""
    found = [next((o for o in reading["objects"] if o["color"] == t.color), None) for t in scene.objects]
    both = all(f is not None for f in found)
    return {
        "color": both,
        "shape": both and all(f["shape"] == t.shape for f, t in zip(found, scene.objects)),
        "position": both and _relation_holds(found[0], found[1], scene.relation),
        "size": both and all(f["size"] == t.size for f, t in zip(found, scene.objects)),
    }


def score(image: np.ndarray, scene: Scene, shapes: tuple[str, ...] | None = None) -> dict[str, bool]:
    """Which attributes of `scene` the image shows. Keys: SCORE_KEYS.

    Shapes are read as one of `shapes`; by default SHAPES and any taught shape the scene names.

    Single object: the largest region is the object. Two objects: each target is matched to the
    largest region of its colour; 'color' = both present, 'shape' = both shapes right,
    'position' = the relation (left of / above ...) holds. 'all' = background, colour, shape and
    position all right (size and count are reported but not required).
    """
    if shapes is None:
        shapes = SHAPES + tuple(s for s in TAUGHT_SHAPES if any(o.shape == s for o in scene.objects))
    reading = read_scene(image, shapes)
    result = {"background": reading["background"] == scene.background}
    result |= _score_single(reading, scene) if len(scene.objects) == 1 else _score_pair(reading, scene)
    result["count"] = len(reading["objects"]) == len(scene.objects)
    result["all"] = all(result[k] for k in ("background", "color", "shape", "position"))
    return result


def summarize(results: list[dict[str, bool]]) -> dict[str, float]:
    """Accuracy per key (fraction of results where it is True), plus 'n'."""
    if not results:
        raise ValueError("summarize: no results to summarize")
    keys = [k for k in SCORE_KEYS if all(k in r for r in results)]
    return {"n": float(len(results))} | {k: float(np.mean([r[k] for r in results])) for k in keys}
