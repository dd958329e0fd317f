"""Train the default model from scratch on procedural scenes, within a time budget, on a CPU.

    python -m edge.converters.default_model.train --out DIR [--minutes 45] [--seed 0] [--threads 2]

Three stages: the autoencoder (object-weighted L1 + L2, a small KL), a pool of latents encoded
once, then the UNet and the text encoder together (epsilon prediction on SD 1.5's noise
schedule, min-SNR weighting, 10% empty captions for classifier-free guidance, EMA weights).
The budget is turned into step counts by timing a few steps on throwaway copies; the counts
are logged, and passing them back (--vae-steps, --unet-steps) with the same seed and threads
replays the run bit for bit. --vae-from reuses an earlier run's autoencoder and gives its time
to the UNet. Writes a StableDiffusionPipeline folder and DIR/train_log.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from edge.converters.default_model import data, models
from edge.converters.default_model.config import ModelConfig, TrainConfig, to_json
from edge.eval.scenes import eval_scenes
from edge.eval.scorer import score, summarize

LOG_EVERY = 25  # steps per logged loss (mean over the window)


@dataclass(frozen=True)
class Plan:
    vae_steps: int
    pool_size: int
    unet_steps: int
    seconds_per_step: dict[str, float]  # measured: 'vae', 'unet', and 'encode' per scene


def _schedule(optimizer: torch.optim.Optimizer, steps: int, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to cfg.lr_floor of the peak rate."""
    warmup = min(cfg.warmup_steps, max(1, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Ema:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_models(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


# ------------------------------------------------------------------------------------ VAE stage


def vae_step(vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator,
             cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """Object-weighted L1 + L2 reconstruction of a posterior sample + a small KL.

    Pixels unlike the image's corner (the background) weigh 1 + cfg.object_weight: with a plain
    loss the decoder long settles for painting the background everywhere.
    """
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample  # (B, 3, H, W)
    err = recon - x
    is_object = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()  # (B, 1, H, W)
    weight = 1 + cfg.object_weight * is_object
    weight = weight / weight.mean(dim=(1, 2, 3), keepdim=True)
    rec = (weight * (err.abs() + err**2)).mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    parts = {"l1": err.abs().mean().item(), "rec": rec.item(), "kl": kl.item()}
    return rec + cfg.kl_weight * kl, parts


@torch.no_grad()
def init_vae(vae: AutoencoderKL, logvar: float) -> None:
    """Start the posterior narrow (log-variance `logvar`), so early latent samples carry the image."""
    half = vae.quant_conv.bias.shape[0] // 2
    vae.quant_conv.bias[half:] = logvar


def train_vae(vae: AutoencoderKL, steps: int, cfg: TrainConfig, size: int, rng: np.random.Generator,
              generator: torch.Generator) -> list[dict]:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    schedule = _schedule(optimizer, steps, cfg)
    log, window, start = [], [], time.time()
    for step in range(steps):
        x = data.images(data.sample_scenes(rng, cfg.vae_batch, cfg.two_object_prob), size)  # (B, 3, H, W)
        loss, parts = vae_step(vae, x, generator, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append(parts)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            entry = {"step": step + 1, "seconds": round(time.time() - start, 1),
                     **{k: float(np.mean([w[k] for w in window])) for k in window[0]}}
            log.append(entry)
            window = []
            print(f"vae  {entry['step']:6d}/{steps}  l1 {entry['l1']:.4f}  kl {entry['kl']:.2f}  "
                  f"{entry['seconds']:.0f}s", flush=True)
    return log


@torch.no_grad()
def vae_report(vae: AutoencoderKL, size: int) -> dict[str, float]:
    """Scorer accuracy on reconstructions of the evaluation scenes: the ceiling for the whole model."""
    scenes = eval_scenes()
    x = data.images(scenes, size)  # (N, 3, H, W)
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 64]).latent_dist.mean).sample for i in range(0, len(x), 64)])
    results = [score(img, s) for img, s in zip(data.to_uint8(recon), scenes)]
    return {"l1": float((recon - x).abs().mean()), **summarize(results)}


# ----------------------------------------------------------------------------------- UNet stage


def diffusion_step(unet: UNet2DConditionModel, text: CLIPTextModel, tokenizer: CLIPTokenizer,
                   noise_sched: DDPMScheduler, latents: torch.Tensor, captions: list[str],
                   generator: torch.Generator, cfg: TrainConfig, objects: torch.Tensor, labels: torch.Tensor,
                   head: torch.nn.Module | None) -> torch.Tensor:
    """Epsilon-prediction loss, min-SNR weighted, for one batch of scaled latents.

    Latent pixels covered by an object weigh 1 + cfg.unet_object_weight (an object is ~10 % of the
    image: with a plain loss, where it goes matters little). With `head`, the text encoder's pooled
    output must also tell a single object's position (cross-entropy, weight cfg.aux_position_weight):
    without it the edge words never separate — the UNet does not use them, so they get no gradient.
    """
    b = latents.shape[0]
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=generator)  # (B,)
    noise = torch.randn(latents.shape, generator=generator)  # (B, C, h, w)
    noisy = noise_sched.add_noise(latents, noise, t)
    encoded = text(data.token_ids(tokenizer, captions))
    pred = unet(noisy, t, encoder_hidden_states=encoded.last_hidden_state).sample  # (B, C, h, w)
    weight = 1 + cfg.unet_object_weight * objects  # (B, 1, h, w)
    per_sample = (((pred - noise) ** 2) * weight).mean(dim=(1, 2, 3)) / weight.mean(dim=(1, 2, 3))  # (B,)
    if cfg.min_snr_gamma > 0:
        alpha_bar = noise_sched.alphas_cumprod[t]
        snr = alpha_bar / (1 - alpha_bar)
        per_sample = per_sample * torch.clamp(snr, max=cfg.min_snr_gamma) / snr
    loss = per_sample.mean()
    if head is not None and (labels >= 0).any():
        logits = head(encoded.pooler_output)  # (B, positions)
        loss = loss + cfg.aux_position_weight * torch.nn.functional.cross_entropy(logits, labels, ignore_index=-1)
    return loss


def position_head(text: CLIPTextModel, cfg: TrainConfig) -> torch.nn.Module | None:
    """The training-only position classifier on the text encoder (not saved)."""
    from edge.eval.scenes import POSITIONS

    return torch.nn.Linear(text.config.hidden_size, len(POSITIONS)) if cfg.aux_position_weight > 0 else None


def train_unet(unet: UNet2DConditionModel, text: CLIPTextModel, pool: data.LatentPool, steps: int,
               cfg: TrainConfig, rng: np.random.Generator, generator: torch.Generator) -> list[dict]:
    tokenizer, noise_sched = models.load_tokenizer(), models.noise_scheduler()
    head = position_head(text, cfg)
    params = list(unet.parameters()) + list(text.parameters()) + ([] if head is None else list(head.parameters()))
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr)
    schedule = _schedule(optimizer, steps, cfg)
    ema = Ema([unet, text], cfg.ema_decay) if cfg.ema_decay > 0 else None
    log, window, start = [], [], time.time()
    for step in range(steps):
        latents, captions, objects, labels = pool.batch(rng, cfg.unet_batch, generator, cfg.caption_dropout)
        loss = diffusion_step(unet, text, tokenizer, noise_sched, latents, captions, generator, cfg, objects,
                              labels, head)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(step)
        window.append(loss.item())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            entry = {"step": step + 1, "seconds": round(time.time() - start, 1), "loss": float(np.mean(window))}
            log.append(entry)
            window = []
            print(f"unet {entry['step']:6d}/{steps}  loss {entry['loss']:.4f}  {entry['seconds']:.0f}s", flush=True)
    if ema is not None:
        ema.copy_to_models()
    return log


# ------------------------------------------------------------------------------------- planning


def _time_steps(step_fn, n: int = 3) -> float:
    step_fn()  # warm-up
    start = time.time()
    for _ in range(n):
        step_fn()
    return (time.time() - start) / n


def calibrate(text: CLIPTextModel, unet: UNet2DConditionModel, vae: AutoencoderKL, cfg: TrainConfig,
              size: int) -> dict[str, float]:
    """Seconds per training step of each stage, and per encoded scene, on throwaway copies."""
    text, unet, vae = copy.deepcopy(text), copy.deepcopy(unet), copy.deepcopy(vae)
    rng, generator = np.random.default_rng(12345), torch.Generator().manual_seed(12345)
    tokenizer, noise_sched = models.load_tokenizer(), models.noise_scheduler()

    def step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, ema: Ema | None) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(0)

    vae_opt = torch.optim.AdamW(vae.parameters(), lr=0.0)
    head = position_head(text, cfg)
    unet_opt = torch.optim.AdamW(list(unet.parameters()) + list(text.parameters())
                                 + ([] if head is None else list(head.parameters())), lr=0.0)
    ema = Ema([unet, text], cfg.ema_decay) if cfg.ema_decay > 0 else None
    scenes = data.sample_scenes(rng, 64, cfg.two_object_prob)
    pool = data.build_pool(vae, scenes, size)

    def vae_once() -> None:
        x = data.images(data.sample_scenes(rng, cfg.vae_batch, cfg.two_object_prob), size)
        step(vae_step(vae, x, generator, cfg)[0], vae_opt, None)

    def unet_once() -> None:
        latents, captions, objects, labels = pool.batch(rng, cfg.unet_batch, generator, cfg.caption_dropout)
        loss = diffusion_step(unet, text, tokenizer, noise_sched, latents, captions, generator, cfg, objects,
                              labels, head)
        step(loss, unet_opt, ema)

    encode = _time_steps(lambda: data.build_pool(vae, scenes, size), 1) / len(scenes)
    return {"vae": _time_steps(vae_once), "unet": _time_steps(unet_once), "encode": encode}


def pool_size(unet_steps: int, cfg: TrainConfig) -> int:
    """Scenes to encode: each drawn about cfg.pool_reuse times. A function of the step count
    only, so that replaying the step counts replays the run."""
    return int(np.clip(unet_steps * cfg.unet_batch // cfg.pool_reuse, 512, cfg.pool_max))


def plan_steps(seconds: dict[str, float], budget_s: float, cfg: TrainConfig, train_vae: bool = True,
               vae_steps: int | None = None, unet_steps: int | None = None) -> Plan:
    """Split the budget: vae_share to the VAE, unet_share to the UNet, the rest to the latent pool
    and saving. Without a VAE stage its share goes to the UNet. Given step counts win."""
    if budget_s <= 0:
        raise ValueError(f"time budget {budget_s:.0f}s is used up by calibration; give more --minutes")
    if vae_steps is None:
        vae_steps = max(1, int(cfg.vae_share * budget_s / seconds["vae"])) if train_vae else 0
    if unet_steps is None:
        unet_share = cfg.unet_share + (0.0 if train_vae else cfg.vae_share)
        unet_steps = max(1, int(unet_share * budget_s / seconds["unet"]))
    return Plan(vae_steps, pool_size(unet_steps, cfg), unet_steps, seconds)


# ---------------------------------------------------------------------------------------- train


def _seed(seed: int, threads: int) -> tuple[np.random.Generator, torch.Generator]:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return np.random.default_rng(seed), torch.Generator().manual_seed(seed)


def _vae_stage(vae: AutoencoderKL, steps: int, cfg: TrainConfig, size: int, rng: np.random.Generator,
               generator: torch.Generator) -> tuple[list[dict], dict[str, float]]:
    init_vae(vae, cfg.init_logvar)
    vae.train()
    log = train_vae(vae, steps, cfg, size, rng, generator)
    vae.eval()
    return log, vae_report(vae, size)


def train(out: Path, model_cfg: ModelConfig, cfg: TrainConfig, minutes: float, vae_steps: int | None = None,
          unet_steps: int | None = None, vae_from: Path | None = None) -> dict:
    """Train all three stages within `minutes`, save the pipeline to `out`, return the log.

    `vae_steps` / `unet_steps` override the budget's step counts (to replay a logged run);
    `vae_from` (a folder this script wrote) reuses its autoencoder and skips that stage.
    """
    start = time.time()
    rng, generator = _seed(cfg.seed, cfg.threads)
    text, unet, vae = models.build_models(model_cfg)
    if vae_from is not None:
        vae = models.load_vae(vae_from, model_cfg)
    sizes = models.weight_sizes(text, unet, vae)
    models.check_budget(sizes)
    size = model_cfg.image_size

    seconds = calibrate(text, unet, vae, cfg, size)
    plan = plan_steps(seconds, minutes * 60 - (time.time() - start) - 10, cfg, train_vae=vae_from is None,
                      vae_steps=vae_steps, unet_steps=unet_steps)
    print(f"plan: {plan.vae_steps} VAE steps, {plan.pool_size} pooled latents, {plan.unet_steps} UNet steps "
          f"(s/step: vae {seconds['vae']:.3f}, unet {seconds['unet']:.3f})", flush=True)
    torch.manual_seed(cfg.seed + 1)  # calibration may have drawn from the global generator

    timings = {"calibrate": time.time() - start}
    t0 = time.time()
    vae_log, vae_quality = [], {}
    if plan.vae_steps > 0:
        vae_log, vae_quality = _vae_stage(vae, plan.vae_steps, cfg, size, rng, generator)
    timings["vae"] = time.time() - t0

    t0 = time.time()
    pool = data.build_pool(vae, data.sample_scenes(rng, plan.pool_size, cfg.two_object_prob), size)
    vae.register_to_config(scaling_factor=pool.scaling_factor)
    timings["pool"] = time.time() - t0

    t0 = time.time()
    unet_log = train_unet(unet, text, pool, plan.unet_steps, cfg, rng, generator)
    timings["unet"] = time.time() - t0

    out.mkdir(parents=True, exist_ok=True)
    models.save_pipeline(out, text.eval(), unet.eval(), vae)
    models.load_pipeline(out)  # fails loudly if anything comes back in the wrong dtype
    timings["total"] = time.time() - start
    log = {
        "seed": cfg.seed, "threads": cfg.threads, "minutes": minutes,
        "vae_from": None if vae_from is None else str(vae_from),
        "model_config": to_json(model_cfg), "train_config": to_json(cfg),
        "plan": {"vae_steps": plan.vae_steps, "pool_size": plan.pool_size, "unet_steps": plan.unet_steps,
                 "seconds_per_step": seconds},
        "samples_per_second": {"vae": plan.vae_steps * cfg.vae_batch / max(timings["vae"], 1e-9),
                               "unet": plan.unet_steps * cfg.unet_batch / timings["unet"]},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "sizes": sizes, "saved_bytes": models.saved_bytes(out),
        "scaling_factor": pool.scaling_factor, "vae_reconstruction": vae_quality,
        "vae_log": vae_log, "unet_log": unet_log,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the diffusers pipeline and train_log.json")
    ap.add_argument("--minutes", type=float, default=45.0, help="time budget for everything (default 45)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--vae-steps", type=int, default=None, help="override the budget's VAE step count")
    ap.add_argument("--unet-steps", type=int, default=None, help="override the budget's UNet step count")
    ap.add_argument("--vae-from", type=Path, default=None, help="reuse the autoencoder of an earlier --out folder")
    a = ap.parse_args(argv)
    log = train(a.out, ModelConfig(), TrainConfig(seed=a.seed, threads=a.threads), a.minutes,
                vae_steps=a.vae_steps, unet_steps=a.unet_steps, vae_from=a.vae_from)
    print(json.dumps({k: log[k] for k in ("plan", "samples_per_second", "timings_s", "saved_bytes",
                                          "vae_reconstruction")}, indent=1))


if __name__ == "__main__":
    main()
