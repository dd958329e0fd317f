"""Print what the scorer reads in an image: `python -m edge.eval.read image.png`."""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from edge.eval.scorer import read_scene


def main(paths: list[str]) -> None:
    for path in paths:
        reading = read_scene(np.asarray(Image.open(path).convert("RGB")))
        objects = ", ".join(f"{o['size']} {o['color']} {o['shape']} ({o['position']})" for o in reading["objects"])
        print(f"{path}: the scorer reads {objects or 'no object'} on a {reading['background']} background")


if __name__ == "__main__":
    main(sys.argv[1:])
