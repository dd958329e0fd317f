"""Train a ControlNet for the default model: the object's filled mask, white on black, says where it goes.

    python -m edge.converters.default_model.train_controlnet --out DIR [--steps 900] [--seed 0] [--threads 1]

diffusers' `ControlNetModel.from_unet` of the shipped UNet (its down blocks and mid block copied, zero
convolutions on every residual), trained with the UNet, the text encoder and the VAE frozen, on the loss the
default model was trained with (`train.diffusion_step`: epsilon prediction, min-SNR weighting, object pixels
weighing 5x). The data recipe (`Recipe`):

- one object per scene, drawn from the training split of edge/eval/scenes.py; for `off_grid` of them the object
  is moved to a uniformly random centre where it stays inside the picture, the rest keep their named position
  with the scenes' usual jitter (+-0.03 of the side);
- the control image is that object's filled mask, rendered by the scene renderer at the same place and size,
  anti-aliased, white on black (the convention of `edge control-image mask`). A filled mask rather than the
  outline: the ControlNet sees the picture through an 8x downsampling embedding, and a one-pixel outline of a
  64 px picture leaves a faint ring at 8x8 where a filled mask leaves a clear blob;
- captions: `empty` of them are empty (classifier-free guidance runs the ControlNet on the unconditional half
  too), `no_word` name colour, shape, size and background but no position, `wrong_word` name a position the
  mask does not show, the rest the named position nearest the object. Were every caption to name the right
  position, the text alone would say where the object goes and the mask would be redundant; the wrong words
  make the mask the one to follow when the two disagree.

Deterministic from the seed and thread count. Writes a diffusers ControlNetModel folder (safetensors) and
DIR/train_log.json (recipe, steps, seconds, losses).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from edge.converters.default_model import data, models
from edge.converters.default_model.config import TrainConfig, to_json
from edge.converters.default_model.train import LOG_EVERY, Ema, _schedule, diffusion_step
from edge.converters.sources import ASSETS
from edge.cpu import cpu_model
from edge.eval.scenes import POSITIONS, SIZES, Scene, SceneObject, caption, render, sample_scene

DEFAULT_MODEL = ASSETS / "default_model"
CONDITIONING_CHANNELS = (16, 16, 32, 32)  # 64x64 control image -> 8x8 latents in three stride-2 steps
SAVE_DTYPE = torch.float16  # storage only (half the file); diffusers loads it back into the fp32 model
_NO_WORD_TEMPLATES = (
    "a {size} {color} {shape}, {bg} background",
    "{bg} background with a {size} {color} {shape}",
    "a {size} {color} {shape} on a {bg} background",
    "a {color} {shape} on a {bg} background",
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    seed: int = 0  # seeds torch, the scene sampler and the caption sampler
    threads: int = 1  # torch intra-op threads
    steps: int = 900
    batch: int = 32
    lr: float = 1e-3  # AdamW; linear warm-up then cosine decay (train._schedule)
    ema_decay: float = 0.99  # of the ControlNet's weights; 0 turns it off
    off_grid: float = 0.5  # share of scenes whose object sits at a random centre, not a named position
    empty: float = 0.1  # share of empty captions
    no_word: float = 0.45  # share of captions without a position word
    wrong_word: float = 0.25  # share naming a position the control image contradicts
    pool_reuse: int = 8  # samples per pooled scene (captions, noise and latent samples still vary)

    def __post_init__(self) -> None:
        shares = (self.off_grid, self.empty, self.no_word, self.wrong_word)
        if min(shares) < 0 or max(shares) > 1 or self.empty + self.no_word + self.wrong_word > 1:
            raise ValueError(f"recipe shares off_grid={self.off_grid}, empty={self.empty}, no_word={self.no_word}, "
                             f"wrong_word={self.wrong_word}: expected each in [0, 1], the caption ones summing to <= 1")
        if self.steps < 1 or self.batch < 1 or self.threads < 1:
            raise ValueError(f"steps={self.steps}, batch={self.batch}, threads={self.threads}: expected each >= 1")


# ------------------------------------------------------------------------------------- data


def place(obj: SceneObject, x: float, y: float) -> SceneObject:
    """`obj` with its centre at (x, y) (fractions of the side): the nearest named position plus an offset."""
    name = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)
    px, py = POSITIONS[name]
    return dataclasses.replace(obj, position=name, dx=x - px, dy=y - py)


def centre(obj: SceneObject) -> tuple[float, float]:
    """(x, y) of the object's bounding-box centre, fractions of the side."""
    x, y = POSITIONS[obj.position]
    return x + obj.dx, y + obj.dy


def sample_control_scene(rng: np.random.Generator, off_grid: float) -> Scene:
    """A one-object training scene; with probability `off_grid` its object moved to a random centre inside."""
    scene = sample_scene(rng, split="train", two_object_prob=0.0)
    obj = scene.objects[0]
    if rng.random() < off_grid:
        half = SIZES[obj.size] * obj.scale / 2
        x, y = rng.uniform(half, 1 - half, size=2)
        obj = place(obj, float(x), float(y))
    return Scene(scene.background, (obj,))


def mask_image(obj: SceneObject, size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8: the object's filled, anti-aliased mask, white (255) on black (0)."""
    white = render(Scene("black", (dataclasses.replace(obj, color="white"),)), size)[..., :1].astype(np.float32)
    lo, hi = (np.float32(v) for v in (25, 240))  # PALETTE's black and white
    values = np.clip((white - lo) / (hi - lo) * 255, 0, 255).round().astype(np.uint8)  # (H, W, 1)
    return np.repeat(values, 3, axis=2)


def control_tensor(scenes: list[Scene], size: int) -> torch.Tensor:
    """(N, 3, size, size) float in [0, 1]: the ControlNet's input, as diffusers' control image processor makes it."""
    masks = np.stack([mask_image(s.objects[0], size) for s in scenes])  # (N, H, W, 3)
    return torch.from_numpy(masks).permute(0, 3, 1, 2).float() / 255.0


def recipe_caption(scene: Scene, rng: np.random.Generator, recipe: Recipe) -> str:
    """A caption by the recipe: empty, without a position word, with a wrong one, or with the nearest one."""
    obj, u = scene.objects[0], rng.random()
    if u < recipe.empty:
        return ""
    if u < recipe.empty + recipe.no_word:
        template = _NO_WORD_TEMPLATES[int(rng.integers(len(_NO_WORD_TEMPLATES)))]
        return template.format(size=obj.size, color=obj.color, shape=obj.shape, bg=scene.background)
    if u < recipe.empty + recipe.no_word + recipe.wrong_word:
        others = [p for p in POSITIONS if p != obj.position]
        obj = dataclasses.replace(obj, position=others[int(rng.integers(len(others)))])
    return caption(Scene(scene.background, (obj,)), rng)


def build_pool(vae, scenes: list[Scene], size: int) -> data.LatentPool:
    """The scenes' latent posteriors, scaled by the shipped VAE's scaling factor (the model's, not refitted)."""
    mean, std = data.latent_moments(vae, scenes, size)
    return data.LatentPool(scenes, mean, std, scaling_factor=float(vae.config.scaling_factor),
                           objects=data.object_masks(scenes, size), positions=data.position_labels(scenes))


# ------------------------------------------------------------------------------------ model


class ControlledUnet(torch.nn.Module):
    """The frozen UNet with the ControlNet's residuals for one batch of control images: what `diffusion_step`
    calls as its UNet."""

    def __init__(self, unet: UNet2DConditionModel, controlnet: ControlNetModel, cond: torch.Tensor) -> None:
        super().__init__()
        self.unet, self.controlnet, self.cond = unet, controlnet, cond  # cond: (B, 3, H, W) in [0, 1]

    def forward(self, sample: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor):
        """sample (B, C, h, w), t (B,), encoder_hidden_states (B, 77, D) -> the UNet's output, .sample (B, C, h, w)."""
        down, mid = self.controlnet(sample, t, encoder_hidden_states, controlnet_cond=self.cond, return_dict=False)
        return self.unet(sample, t, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid)


def load_frozen(folder: Path = DEFAULT_MODEL) -> StableDiffusionPipeline:
    """The default model's pipeline with every weight frozen."""
    pipe = models.load_pipeline(folder)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False).eval()
    return pipe


def new_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)


def save(controlnet: ControlNetModel, out: Path) -> None:
    """A diffusers ControlNetModel folder, its weights stored in SAVE_DTYPE."""
    controlnet.eval().save_pretrained(out, safe_serialization=True)
    for weights in out.glob("*.safetensors"):
        save_file({k: v.to(SAVE_DTYPE).contiguous() for k, v in load_file(weights).items()}, weights,
                  metadata={"format": "pt"})
    if {p.dtype for p in ControlNetModel.from_pretrained(out).parameters()} != {torch.float32}:
        raise ValueError(f"{out}: the saved ControlNet does not load back as float32")


# ------------------------------------------------------------------------------------ train


def train_loop(pipe: StableDiffusionPipeline, controlnet: ControlNetModel, pool: data.LatentPool,
               controls: torch.Tensor, recipe: Recipe, rng: np.random.Generator,
               generator: torch.Generator) -> list[dict]:
    """`recipe.steps` AdamW steps on the ControlNet alone; `controls`: (N, 3, H, W), one per pooled scene."""
    cfg = TrainConfig(seed=recipe.seed, threads=recipe.threads, unet_lr=recipe.lr, aux_position_weight=0.0)
    tokenizer, noise_sched = models.load_tokenizer(), models.noise_scheduler()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=recipe.lr)
    schedule = _schedule(optimizer, recipe.steps, cfg)
    ema = Ema([controlnet], recipe.ema_decay) if recipe.ema_decay > 0 else None
    log, window, start = [], [], time.time()
    for step in range(recipe.steps):
        idx = rng.integers(len(pool.scenes), size=recipe.batch)  # (B,)
        noise = torch.randn(pool.mean[idx].shape, generator=generator)  # (B, C, h, w)
        latents = (pool.mean[idx] + pool.std[idx] * noise) * pool.scaling_factor
        captions = [recipe_caption(pool.scenes[i], rng, recipe) for i in idx]
        model = ControlledUnet(pipe.unet, controlnet, controls[idx])
        loss = diffusion_step(model, pipe.text_encoder, tokenizer, noise_sched, latents, captions, generator, cfg,
                              pool.objects[idx], pool.positions[idx], head=None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(step)
        window.append(loss.item())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == recipe.steps:
            entry = {"step": step + 1, "seconds": round(time.time() - start, 1), "loss": float(np.mean(window))}
            log.append(entry)
            window = []
            print(f"controlnet {entry['step']:5d}/{recipe.steps}  loss {entry['loss']:.4f}  {entry['seconds']:.0f}s",
                  flush=True)
    if ema is not None:
        ema.copy_to_models()
    return log


def train(out: Path, recipe: Recipe) -> dict:
    """Train a ControlNet by `recipe`, save it to `out` (diffusers folder + train_log.json), return the log."""
    start = time.time()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng, generator = np.random.default_rng(recipe.seed), torch.Generator().manual_seed(recipe.seed)
    pipe = load_frozen()
    size = pipe.vae.config.sample_size
    controlnet = new_controlnet(pipe.unet).train()
    n = max(512, recipe.steps * recipe.batch // recipe.pool_reuse)
    scenes = [sample_control_scene(rng, recipe.off_grid) for _ in range(n)]
    pool, controls = build_pool(pipe.vae, scenes, size), control_tensor(scenes, size)
    timings = {"pool": time.time() - start}
    t0 = time.time()
    losses = train_loop(pipe, controlnet, pool, controls, recipe, rng, generator)
    timings["train"] = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    save(controlnet, out)
    timings["total"] = time.time() - start
    log = {
        "command": f"python -m edge.converters.default_model.train_controlnet --out {out} --steps {recipe.steps} "
                   f"--batch {recipe.batch} --seed {recipe.seed} --threads {recipe.threads}",
        "cpu": cpu_model(), "torch": torch.__version__,
        "seed": recipe.seed, "threads": recipe.threads, "steps": recipe.steps, "recipe": to_json(recipe),
        "conditioning_embedding_out_channels": list(CONDITIONING_CHANNELS), "pool_scenes": n,
        "control_image": "the object's filled mask, white on black, 64x64 RGB in [0, 1]",
        "params": sum(p.numel() for p in controlnet.parameters()),
        "saved_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "seconds": {k: round(v, 1) for k, v in timings.items()}, "losses": losses,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the ControlNetModel and train_log.json")
    ap.add_argument("--steps", type=int, default=Recipe.steps, help=f"training steps (default {Recipe.steps})")
    ap.add_argument("--batch", type=int, default=Recipe.batch, help=f"scenes per step (default {Recipe.batch})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = ap.parse_args(argv)
    try:
        recipe = Recipe(seed=a.seed, threads=a.threads, steps=a.steps, batch=a.batch)
    except ValueError as e:
        ap.error(str(e))
    log = train(a.out, recipe)
    print(json.dumps({k: log[k] for k in ("steps", "seconds", "params", "saved_bytes")}, indent=1))


if __name__ == "__main__":
    main()
