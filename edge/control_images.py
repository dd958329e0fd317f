"""Control images from photos, in numpy and Pillow on the device: the ControlNet pre-processors that need no
model of their own.

- canny: Canny's edge detector as OpenCV's cv2.Canny runs it in ControlNet's own annotator (3x3 Sobel gradients,
  L1 magnitude, non-maximum suppression along the gradient, double threshold, hysteresis; no blur unless asked),
  white edges on black, as the canny ControlNets were trained on;
- mask: the picture's bright part as white on black (a threshold of its brightness), for masks and silhouettes;
- invert: black lines on white (a sketch) turned into the white-on-black a lineart or scribble ControlNet takes;
- tile: the picture blurred by downsampling (the tile ControlNet adds the detail back).
Depth, normals, pose and segmentation need a model of their own and are not made here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

KINDS = ("canny", "mask", "invert", "tile")


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), np.float32)  # (H, W) in [0, 255]


def _rgb(mask: np.ndarray) -> Image.Image:
    """(H, W) bool or [0, 255] -> a 3-channel picture, as the ControlNets take it."""
    values = np.where(mask, 255, 0).astype(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
    return Image.fromarray(np.repeat(values[..., None], 3, axis=2))


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D correlation with edge padding (small kernels)."""
    kh, kw = kernel.shape
    padded = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2)), mode="edge")
    out = np.zeros_like(x)
    for i in range(kh):
        for j in range(kw):
            out += kernel[i, j] * padded[i : i + x.shape[0], j : j + x.shape[1]]
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Each pixel or any of its 8 neighbours."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([p[i : i + h, j : j + w] for i in range(3) for j in range(3)])


def canny(image: Image.Image, low: float = 100, high: float = 200, sigma: float = 0.0) -> Image.Image:
    """Edges where the gradient is a local maximum along its direction and above `high`, or above `low` and
    connected to such an edge. Thresholds on the L1 Sobel magnitude of 0-255 brightness, as OpenCV's Canny takes
    them (ControlNet's annotator: 100, 200); `sigma` > 0 blurs first (noisy photos)."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds low {low}, high {high}: expected 0 <= low <= high")
    x = _gray(image)
    if sigma > 0:
        r = max(1, int(round(2 * sigma)))
        g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma * sigma))
        x = _convolve(x, np.outer(g, g).astype(np.float32) / g.sum() ** 2)
    sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    gx, gy = _convolve(x, sobel), _convolve(x, sobel.T)
    magnitude = np.abs(gx) + np.abs(gy)
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180) % 180  # gradient direction in [0, 180)
    sector = ((angle + 22.5) // 45).astype(int) % 4  # 0: horizontal gradient, 1: 45°, 2: vertical, 3: 135°
    p = np.pad(magnitude, 1)
    h, w = magnitude.shape

    def shifted(di, dj):
        return p[1 + di : 1 + di + h, 1 + dj : 1 + dj + w]

    # OpenCV's tie rule: strictly above the neighbour before (left, above), at least the one after; diagonals strict
    neighbours = {0: ((0, -1), (0, 1), False), 1: ((-1, -1), (1, 1), True), 2: ((-1, 0), (1, 0), False),
                  3: ((-1, 1), (1, -1), True)}
    peak = np.zeros_like(magnitude, dtype=bool)
    for s, (before, after, strict) in neighbours.items():
        beyond = magnitude > shifted(*after) if strict else magnitude >= shifted(*after)
        peak |= (sector == s) & (magnitude > shifted(*before)) & beyond
    strong = peak & (magnitude > high)
    weak = peak & (magnitude > low)
    edges = strong
    while True:  # hysteresis: grow the strong edges through the weak ones
        grown = weak & _dilate(edges)
        if np.array_equal(grown, edges):
            return _rgb(edges)
        edges = grown | strong


def mask(image: Image.Image, threshold: float = 128) -> Image.Image:
    return _rgb(_gray(image) >= threshold)


def invert(image: Image.Image) -> Image.Image:
    return _rgb(255 - _gray(image))


def tile(image: Image.Image, factor: int = 8) -> Image.Image:
    small = image.convert("RGB").resize((max(1, image.width // factor), max(1, image.height // factor)),
                                        Image.Resampling.BOX)
    return small.resize(image.size, Image.Resampling.BICUBIC).filter(ImageFilter.SMOOTH)


def make(kind: str, image: Image.Image, **options) -> Image.Image:
    if kind not in KINDS:
        raise ValueError(f"unknown control image kind {kind!r}; made here: {', '.join(KINDS)} (depth, pose and "
                         "segmentation need a model of their own)")
    return {"canny": canny, "mask": mask, "invert": invert, "tile": tile}[kind](image, **options)
