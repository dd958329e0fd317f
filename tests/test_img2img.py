"""img2img: an image encoded by the bundle's VAE encoder, noised to a strength and denoised from there, as
diffusers' StableDiffusionImg2ImgPipeline does it, for every scheduler the runtime has.

The two pipelines are given the same image latents and the same noise: diffusers takes 4-channel latents as
its `image` (not re-encoded) and draws its noise from a torch generator; edge's stages are run on the same
draws (the start noise, then each step's noise for euler_a and lcm) through a generator object that hands
out torch's numbers. The encoder itself is checked against torch separately.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_edge
from edge import Pipeline
from edge.metrics import psnr
from edge.png import read_params
from edge.schedulers import DIFFUSERS_EQUIVALENT, make_scheduler, scheduler_config_from_dict
from edge.stages.start import encode_image, image_latents
from edge.images import to_tensor

PROMPT, NEGATIVE, STEPS, GUIDANCE, SEED = "a red circle on a blue background", "blurry", 10, 7.5, 5
SCHEDULERS = sorted(DIFFUSERS_EQUIVALENT)


class TorchDraws:
    """numpy's `standard_normal` interface over a torch generator: edge's steps get diffusers' noise."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def standard_normal(self, shape, dtype=np.float32) -> np.ndarray:
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).numpy().astype(dtype)


@pytest.fixture(scope="module")
def picture(bundles) -> Image.Image:
    """A smooth picture at the bundle's size: what the tiny model's VAE can carry."""
    h, w = Pipeline.load(bundles["folder-epsilon"], preload=False).manifest.default_size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([np.sin(6 * x), np.cos(4 * y), np.sin(3 * (x + y))], -1) * 0.5 + 0.5  # (H, W, 3)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def reference(models):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(models["folder-epsilon"], safety_checker=None,
                                                          requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.source_scheduler_config = pipe.scheduler.config  # each test's sampler is made from this, not the last's
    return pipe


def test_encoder_matches_torch(bundles, reference, picture):
    """edge's sample of the encoder's distribution is torch's mean + std x the same unit noise, scaled."""
    pipe = Pipeline.load(bundles["folder-epsilon"])
    pixels = to_tensor(picture)  # (1, 3, H, W) in [-1, 1]
    x0 = encode_image(pipe.graphs, pixels, np.random.default_rng(SEED))
    eps = np.random.default_rng(SEED).standard_normal(x0.shape, dtype=np.float32)
    with torch.no_grad():
        dist = reference.vae.encode(torch.from_numpy(pixels)).latent_dist
    expected = (dist.mean + dist.std * torch.from_numpy(eps)).numpy() * reference.vae.config.scaling_factor
    assert psnr(expected, x0) >= 60


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_matches_diffusers_img2img(bundles, reference, picture, scheduler, strength):
    pipe = Pipeline.load(bundles["folder-epsilon"])
    x0 = encode_image(pipe.graphs, to_tensor(picture), np.random.default_rng(SEED))  # (1, 4, h, w)
    cls, overrides = DIFFUSERS_EQUIVALENT[scheduler]
    import diffusers

    reference.scheduler = getattr(diffusers, cls).from_config(reference.source_scheduler_config, **overrides)
    with torch.no_grad():
        expected = reference(PROMPT, negative_prompt=NEGATIVE, image=torch.from_numpy(x0), strength=strength,
                             num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                             generator=torch.Generator().manual_seed(SEED)).images[0]  # (H, W, 3) in [0, 1]

    draws = TorchDraws(torch.Generator().manual_seed(SEED))  # the same draws diffusers made, in its order
    sched = make_scheduler(scheduler, scheduler_config_from_dict(pipe.manifest.scheduler))
    sched.set_timesteps(STEPS, strength)
    x = image_latents(x0, draws.standard_normal(x0.shape), sched)
    context = pipe.encode_text(PROMPT, NEGATIVE, guided=True, copies=1)
    for x in pipe.denoise(x, context, sched, GUIDANCE, draws, start=sched.start):
        pass
    image = np.asarray(pipe.decode(x), np.float32)
    figure = psnr((expected * 255).round(), image, peak=255.0)
    print(f"PARITY img2img {scheduler} strength {strength}: {figure:.1f} dB")
    assert figure >= 40.0, f"{scheduler} strength {strength}: {figure:.1f} dB"


def test_generate_with_an_image_is_those_stages(bundles, picture, tmp_path):
    """Pipeline.generate(image=...) composes exactly the stages above, draws from its seed in the documented
    order (encoder sample, start noise), runs the last `strength` of the steps, and records the strength."""
    pipe = Pipeline.load(bundles["folder-epsilon"])
    path = tmp_path / "in.png"
    picture.save(path)
    seen = []
    result = pipe.generate(PROMPT, negative_prompt=NEGATIVE, image=path, strength=0.6, steps=STEPS,
                           guidance=GUIDANCE, scheduler="ddim", seed=SEED, callback=lambda i, n, x: seen.append(n))
    rng = np.random.default_rng(SEED)
    x0 = encode_image(pipe.graphs, to_tensor(picture), rng)
    sched = make_scheduler("ddim", scheduler_config_from_dict(pipe.manifest.scheduler))
    sched.set_timesteps(STEPS, 0.6)
    x = image_latents(x0, rng.standard_normal(x0.shape, dtype=np.float32), sched)
    for x in pipe.denoise(x, pipe.encode_text(PROMPT, NEGATIVE, True, 1), sched, GUIDANCE, rng, start=sched.start):
        pass
    assert np.array_equal(result.latents, x)
    assert seen == [6] * 6 and result.params["strength"] == 0.6
    assert result.images[0].size == picture.size


def test_cli_img2img_and_its_refusals(bundles, picture, tmp_path):
    bundle = bundles["folder-epsilon"]
    src = tmp_path / "in.png"
    picture.save(src)
    out = tmp_path / "out.png"
    run_edge("generate", bundle, PROMPT, "--image", src, "--strength", "0.5", "--steps", "4", "-o", out)
    assert read_params(out)["strength"] == 0.5 and Image.open(out).size == picture.size
    odd = tmp_path / "odd.png"
    picture.resize((picture.width + 3, picture.height)).save(odd)
    for args, words in [(["--image", odd], "nearest"), (["--image", src, "--strength", "0"], "strength"),
                        (["--image", src, "--strength", "1.5"], "strength"),
                        (["--image", tmp_path / "missing.png"], "missing.png")]:
        proc = run_edge("generate", bundle, PROMPT, *args, "-o", tmp_path / "no.png", check=False)
        assert proc.returncode == 2 and words in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert not (tmp_path / "no.png").exists()
    run_edge("generate", bundle, PROMPT, "--image", odd, "--resize", "--steps", "2", "-o", tmp_path / "r.png")
    assert Image.open(tmp_path / "r.png").size == picture.size


def test_the_encoder_is_a_planned_stage(bundles, picture):
    """img2img plans the VAE encoder's memory (measured at convert time) as its own stage, first; staged, it
    is loaded alone and freed before the text encoder loads."""
    from edge.plan import Plan

    bundle = bundles["folder-epsilon"]
    pipe = Pipeline.load(bundle, memory_budget="64GB")
    assert pipe.manifest.components["vae_encoder"].memory["graphs"]
    h, w = pipe.manifest.default_size
    plan = pipe.plan_for(h, w, image=True)
    assert plan.stages[0].name == "vae_encoder" and "vae_encoder" in plan.describe()
    assert plan.peak >= pipe.plan_for(h, w).peak  # the encoder's weights and activations count
    assert all(s.name != "vae_encoder" for s in pipe.plan_for(h, w).stages)

    class Staged(Pipeline):
        def plan_for(self, height, width, num_images=1, guided=True, image=False, decoder="full"):
            return Plan(1, resident=False, guidance_batch=2, unet_per_call=False, vae_tile=None, vae_overlap=0,
                        base=0)

    staged = Staged.load(bundle)
    seen = []
    staged.generate(PROMPT, image=picture, strength=0.5, steps=4,
                    callback=lambda i, n, x: seen.append(set(staged.sessions)))
    assert seen and all("vae_encoder" not in s and "text_encoder" not in s for s in seen)
