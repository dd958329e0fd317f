"""Train a LoRA on the default model, on a CPU in minutes: the shipped example teaches it a shape it never saw.

    python -m edge.converters.default_model.train_lora --out converters/assets/loras/cross.safetensors \
        [--shape cross] [--steps 1200] [--seed 0] [--threads 1]

The default model was trained on four shapes (`edge.eval.scenes.SHAPES`); the word "cross" reached it only as an
untrained token embedding. The LoRA (rank 8 on the UNet's attention and feed-forward layers and on the text
encoder's) is trained, base weights frozen, on a pool of latents where `taught_share` of the scenes show the new
shape (always large: see scenes.TAUGHT_SIZE) and the rest are ordinary training scenes, so that the other shapes
keep their meaning. Loss, noise schedule and caption dropout are the default model's (`train.diffusion_step`).
Writes a diffusers-layout LoRA file (what `edge generate --lora` and diffusers' `load_lora_weights` read) and
a `<name>.json` log beside it. The same seed and threads replay the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from edge.converters.default_model import data, models
from edge.converters.default_model.config import TrainConfig
from edge.converters.default_model.train import LOG_EVERY, _schedule, _seed, diffusion_step
from edge.eval.scenes import TAUGHT_SHAPES, Scene, sample_taught_scene

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default_model"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8  # alpha = rank: the LoRA applies at scale 1 as trained
    lr: float = 1e-3
    batch: int = 32
    steps: int = 1200
    pool: int = 4000  # scenes encoded once
    taught_share: float = 0.5  # of the pool: scenes of the taught shape; the rest are ordinary training scenes
    caption_dropout: float = 0.1
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.batch < 1 or self.pool < self.batch:
            raise ValueError(f"LoraSettings {self}: expected rank, steps, batch >= 1 and pool >= batch")
        if not 0.0 < self.taught_share <= 1.0:
            raise ValueError(f"taught_share={self.taught_share}; expected a share in (0, 1]")


def add_lora(pipe: StableDiffusionPipeline, rank: int) -> list[torch.nn.Parameter]:
    """Freeze the pipeline and give its UNet and text encoder LoRA adapters; returns the trainable parameters."""
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    for module, targets in ((pipe.unet, UNET_TARGETS), (pipe.text_encoder, TEXT_TARGETS)):
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=targets), module)
    return [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]


def taught_pool(pipe: StableDiffusionPipeline, shape: str, s: LoraSettings,
                rng: np.random.Generator) -> data.LatentPool:
    """Latents of `taught_share` scenes of `shape` and ordinary training scenes, scaled as the model was trained."""
    taught = round(s.pool * s.taught_share)
    scenes: list[Scene] = [sample_taught_scene(rng, shape) for _ in range(taught)]
    scenes += data.sample_scenes(rng, s.pool - taught, TrainConfig().two_object_prob)
    pool = data.build_pool(pipe.vae, scenes, pipe.vae.config.sample_size)
    return dataclasses.replace(pool, scaling_factor=pipe.vae.config.scaling_factor)


def train_lora(pipe: StableDiffusionPipeline, pool, s: LoraSettings, rng: np.random.Generator,
               generator: torch.Generator) -> list[dict]:
    """Train LoRA adapters on `pool` (anything with LatentPool's `batch`); returns the loss log."""
    params = add_lora(pipe, s.rank)
    cfg = TrainConfig(caption_dropout=s.caption_dropout)
    optimizer = torch.optim.AdamW(params, lr=s.lr)
    schedule = _schedule(optimizer, s.steps, cfg)
    tokenizer, noise_sched = pipe.tokenizer, models.noise_scheduler()
    pipe.unet.train()
    pipe.text_encoder.train()
    log, window, start = [], [], time.time()
    for step in range(s.steps):
        latents, captions, objects, labels = pool.batch(rng, s.batch, generator, s.caption_dropout)
        loss = diffusion_step(pipe.unet, pipe.text_encoder, tokenizer, noise_sched, latents, captions, generator,
                              cfg, objects, labels, head=None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == s.steps:
            log.append({"step": step + 1, "seconds": round(time.time() - start, 1), "loss": float(np.mean(window))})
            window = []
            print(f"lora {step + 1:6d}/{s.steps}  loss {log[-1]['loss']:.4f}  {log[-1]['seconds']:.0f}s", flush=True)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return log


def save_lora(pipe: StableDiffusionPipeline, out: Path, log: dict) -> None:
    """The adapters as one diffusers-layout safetensors file, and `log` as out.with_suffix('.json'); atomic."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}-") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder), weight_name=out.name)
        log_tmp = Path(tmp) / "log.json"
        log_tmp.write_text(json.dumps(log, indent=1) + "\n")
        os.chmod(Path(tmp) / out.name, 0o644)
        os.replace(Path(tmp) / out.name, out)
        os.replace(log_tmp, out.with_suffix(".json"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the LoRA file to write (.safetensors)")
    ap.add_argument("--shape", default=TAUGHT_SHAPES[0], choices=TAUGHT_SHAPES, help="the shape to teach")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the default model's diffusers folder")
    for field in dataclasses.fields(LoraSettings):
        ap.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    a = ap.parse_args(argv)
    if a.out.suffix != ".safetensors":
        ap.error(f"--out {a.out}: expected a .safetensors file name")
    s = LoraSettings(**{f.name: getattr(a, f.name) for f in dataclasses.fields(LoraSettings)})
    start = time.time()
    rng, generator = _seed(s.seed, s.threads)
    pipe = models.load_pipeline(a.model)
    pool = taught_pool(pipe, a.shape, s, rng)
    pooled = time.time() - start
    loss_log = train_lora(pipe, pool, s, rng, generator)
    log = {"shape": a.shape, "settings": dataclasses.asdict(s), "unet_targets": UNET_TARGETS,
           "text_targets": TEXT_TARGETS, "timings_s": {"pool": round(pooled, 1), "total": round(time.time() - start, 1)},
           "loss": loss_log}
    save_lora(pipe, a.out, log)
    print(json.dumps({k: log[k] for k in ("shape", "settings", "timings_s")}, indent=1))


if __name__ == "__main__":
    main()
