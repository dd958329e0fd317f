"""Inpainting and outpainting, with any (4-channel) model and with 9-channel inpainting UNets, against
diffusers' StableDiffusionInpaintPipeline on the same image, mask and draws.

As in test_img2img, edge's stages run on diffusers' own random draws (a torch generator behind numpy's
interface), in diffusers' order: the image's encoding (4-channel, or strength < 1), the start noise, the
masked image's encoding (diffusers makes it for a 4-channel UNet too, unused), then each step's noise.
The 9-channel model is the tiny test model with a 9-input-channel UNet and random weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_edge
from edge import Pipeline
from edge.images import load_mask, to_tensor
from edge.metrics import psnr
from edge.png import read_params
from edge.schedulers import DIFFUSERS_EQUIVALENT, make_scheduler, scheduler_config_from_dict
from edge.stages.inpaint import blend, prepare, unet_channels
from edge.stages.start import encode_image, image_latents
from test_img2img import GUIDANCE, NEGATIVE, PROMPT, SEED, STEPS, TorchDraws, picture  # noqa: F401 (fixture)

KINDS = ("4-channel", "9-channel")


@pytest.fixture(scope="module")
def inpaint_models(models, bundles, tmp_path_factory) -> dict[str, tuple]:
    """kind -> (diffusers folder, edge bundle): the shared tiny model, and a tiny 9-channel inpainting one."""
    from edge.converters.convert import convert
    from edge.converters.tiny import save_tiny

    root = tmp_path_factory.mktemp("inpaint")
    nine = save_tiny(root / "model9", seed=3, unet_in_channels=9)
    convert(str(nine), root / "bundle9", log=lambda s: None)
    return {"4-channel": (models["folder-epsilon"], bundles["folder-epsilon"]), "9-channel": (nine, root / "bundle9")}


@pytest.fixture(scope="module")
def mask(picture) -> Image.Image:
    """White (repaint) over a disc right of centre, black elsewhere."""
    w, h = picture.size
    y, x = np.mgrid[0:h, 0:w]
    disc = (x - 0.6 * w) ** 2 + (y - 0.5 * h) ** 2 < (0.3 * min(w, h)) ** 2
    return Image.fromarray((disc * 255).astype(np.uint8))


def _diffusers(folder, scheduler: str, picture, mask, strength: float) -> np.ndarray:
    import diffusers

    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None,
                                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cls, overrides = DIFFUSERS_EQUIVALENT[scheduler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **overrides)
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=NEGATIVE, image=picture, mask_image=mask, strength=strength,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=picture.height, width=picture.width,
                    output_type="np", generator=torch.Generator().manual_seed(SEED)).images[0]  # (H, W, 3)


def _edge_stages(pipe: Pipeline, scheduler: str, picture, mask, strength: float, draws) -> np.ndarray:
    """The pipeline's inpainting stages, step by step, on `draws`; the decode before pasting back."""
    sched = make_scheduler(scheduler, scheduler_config_from_dict(pipe.manifest.scheduler))
    sched.set_timesteps(STEPS, strength)
    pixels, soft = to_tensor(picture), load_mask(mask, picture.size)
    nine = unet_channels(pipe.graphs) == 9
    x0 = encode_image(pipe.graphs, pixels, draws) if not nine or strength < 1 else None
    h, w = picture.height // 8, picture.width // 8
    noise = draws.standard_normal((1, 4, h, w))
    x = noise * np.float32(sched.init_noise_sigma) if strength == 1.0 else image_latents(x0, noise, sched)
    repaint = prepare(pipe.graphs, pixels, soft, draws)
    if not nine:
        draws.standard_normal((1, 4, h, w))  # diffusers' unused masked-image encoding
    steps = pipe.denoise(x, pipe.encode_text(PROMPT, NEGATIVE, True, 1), sched, GUIDANCE, draws, start=sched.start,
                         extra=repaint.extra, blend=None if nine else blend(sched, x0, noise, repaint.latent_mask))
    for x in steps:
        pass
    return np.asarray(pipe.decode(x), np.float32)


@pytest.mark.parametrize("strength", [0.75, 1.0])
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_diffusers_inpaint(inpaint_models, picture, mask, kind, scheduler, strength):
    folder, bundle = inpaint_models[kind]
    expected = _diffusers(folder, scheduler, picture, mask, strength)
    pipe = Pipeline.load(bundle)
    assert unet_channels(pipe.graphs) == (9 if kind == "9-channel" else 4)
    image = _edge_stages(pipe, scheduler, picture, mask, strength, TorchDraws(torch.Generator().manual_seed(SEED)))
    figure = psnr((expected * 255).round(), image, peak=255.0)
    print(f"PARITY inpaint {kind} {scheduler} strength {strength}: {figure:.1f} dB")
    assert figure >= 40.0, f"{kind} {scheduler} strength {strength}: {figure:.1f} dB"


@pytest.mark.parametrize("kind", KINDS)
def test_generate_repaints_only_under_the_mask(inpaint_models, picture, mask, kind):
    """Pipeline.generate(image=, mask=): outside the mask the input comes back (pasted back after decoding);
    inside, it is the model's."""
    pipe = Pipeline.load(inpaint_models[kind][1])
    out = pipe.generate(PROMPT, image=picture, mask=mask, strength=1.0, steps=4, seed=SEED)
    got, src = np.asarray(out.images[0], np.float32), np.asarray(picture, np.float32)
    keep = np.asarray(mask) < 128  # (H, W) outside the mask
    assert psnr(src[keep], got[keep], peak=255.0) > 60  # measured: exact (inf)
    assert psnr(src[~keep], got[~keep], peak=255.0) < 30  # repainted
    assert out.params["strength"] == 1.0 and out.params["mask"] is True


def test_outpainting_grows_the_canvas_and_keeps_the_original(inpaint_models, picture, tmp_path):
    src = tmp_path / "in.png"
    picture.save(src)
    out = tmp_path / "out.png"
    bundle = inpaint_models["4-channel"][1]
    run_edge("generate", bundle, PROMPT, "--image", src, "--expand", "16,0,16,0", "--strength", "1", "--steps", "4",
             "-o", out)
    got = Image.open(out)
    assert got.size == (picture.width + 32, picture.height)
    inner = np.asarray(got, np.float32)[:, 16:16 + picture.width]
    assert psnr(np.asarray(picture, np.float32), inner, peak=255.0) > 60
    assert read_params(out)["expand"] == [16, 0, 16, 0]


def test_inpainting_refusals(inpaint_models, picture, mask, tmp_path):
    bundle4, bundle9 = inpaint_models["4-channel"][1], inpaint_models["9-channel"][1]
    src, m = tmp_path / "in.png", tmp_path / "mask.png"
    picture.save(src)
    mask.resize((mask.width // 2, mask.height)).save(m)
    cases = [(bundle4, ["--image", src, "--mask", m], "size"),
             (bundle4, ["--mask", src], "--image"),
             (bundle4, ["--image", src, "--expand", "1,2,3"], "--expand"),
             (bundle9, ["--image", src], "inpainting UNet")]
    for bundle, args, words in cases:
        proc = run_edge("generate", bundle, PROMPT, *args, "-o", tmp_path / "no.png", check=False)
        assert proc.returncode == 2 and words in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert not (tmp_path / "no.png").exists()
