"""What generate() is given, checked at the boundary: the input picture and mask, and the output size. One
message each, naming the value and what this bundle accepts; nothing runs before they pass."""

from __future__ import annotations

import numpy as np
from PIL import Image

from edge.bundle import Manifest
from edge.graphs import Graphs
from edge.images import check_size, load_image, load_mask
from edge.images import expand as expand_canvas
from edge.stages.inpaint import INPAINT_CHANNELS, unet_channels
from edge.validate import whole_number


def image_inputs(graphs: Graphs, image, resize: bool, mask, mask_blur: int,
                 expand) -> tuple[Image.Image | None, np.ndarray | None]:
    """The input picture (checked, resized if asked, grown by `expand`) and its soft mask (1, 1, H, W)."""
    manifest = graphs.manifest
    if image is None:
        if mask is not None or expand is not None:
            raise ValueError("mask= and expand= repaint part of an input picture: give image= too")
        if unet_channels(graphs) == INPAINT_CHANNELS:
            raise ValueError("this bundle's UNet is an inpainting UNet (9 input channels): give image= and mask=")
        return None, None
    whole_number("mask_blur", mask_blur, minimum=0)
    picture = check_size(load_image(image), manifest.size_multiple, resize)
    soft = None if mask is None else load_mask(mask, picture.size, mask_blur)
    if expand is not None:
        if not isinstance(expand, (tuple, list)) or len(expand) != 4:
            raise ValueError(f"expand must be 4 pixel counts (left, top, right, bottom), got {expand!r}")
        picture, soft = expand_canvas(picture, soft, *expand, manifest.size_multiple)
    if soft is None and unet_channels(graphs) == INPAINT_CHANNELS:
        raise ValueError("this bundle's UNet is an inpainting UNet (9 input channels): give mask= with image=")
    return picture, soft


def image_size(picture: Image.Image, height: int | None, width: int | None) -> tuple[int, int]:
    """img2img draws at the input image's size; a different height/width given with it is refused."""
    for what, given, actual in (("height", height, picture.height), ("width", width, picture.width)):
        if given is not None and given != actual:
            raise ValueError(f"{what}={given!r} differs from the input image's {actual} px; img2img draws at the "
                             f"image's size: leave {what} out, or resize the image")
    return picture.height, picture.width


def output_size(manifest: Manifest, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width), the bundle's default where None; each a positive multiple of the bundle's size step."""
    dh, dw = manifest.default_size
    height, width = (dh if height is None else height), (dw if width is None else width)
    m = manifest.size_multiple
    halvings = (m // manifest.vae_scale_factor).bit_length() - 1
    for what, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0 or v % m:
            hint = f"; nearest: {max(m, round(v / m) * m)}" if isinstance(v, (int, np.integer)) else ""
            raise ValueError(
                f"{what} {v!r} must be a positive multiple of {m} for this bundle (the VAE works in "
                f"{manifest.vae_scale_factor}-pixel steps and the UNet halves the latent {halvings} time(s)){hint}"
            )
    return int(height), int(width)
