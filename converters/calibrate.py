"""Calibration inputs for static int8: what the UNet sees along its own denoising trajectories.

Static quantization fixes every quantized activation's scale when the bundle is written, so the inputs it
is calibrated on must span what the runtime will feed: latents from pure noise (t near T) to nearly clean
(t near 0), under conditional and unconditional text. They come from running the exported fp32 graph the
way `edge generate` does — Euler steps, classifier-free guidance as one batch-2 call — on a few prompts, so
the ranges are the model's own rather than a guess about them. The VAE decoder is not calibrated: on the
default model, scales fitted to a few trajectories' clean latents gave 11 dB on a held-out prompt's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge.converters.sources import stated_config
from edge.schedulers import make_scheduler, scheduler_config_from_dict

PROMPTS = (
    "a red circle on a blue background",
    "a photo of a cat sitting on a wooden table, soft light",
    "a green triangle at the top left on a white background",
    "a mountain landscape at sunset, oil painting",
)
CALIBRATION_STEPS = 4  # Euler steps per prompt; each step is one calibration sample (a batch-2 call)
GUIDANCE = 7.5


def calibrate(pipe, unet_onnx: Path, *, prompts: int = 2, steps: int = CALIBRATION_STEPS, seed: int = 0,
              threads: int | None = None) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """UNet inputs for static int8: every step of `prompts` Euler trajectories of `steps` steps at the
    model's native size to calibrate on, and one more trajectory, on another prompt and noise, held out
    and batched into one feed to check the quantized graph against fp32 with.

    `pipe` is the diffusers pipeline being converted (its tokenizer and text encoder give the embeddings);
    `unet_onnx` is the fp32 graph just exported, which predicts the noise that moves each trajectory on.
    """
    from edge.sessions import open_session, session_options

    if not 1 <= prompts < len(PROMPTS) or steps < 1:
        raise ValueError(f"calibration: prompts must be 1..{len(PROMPTS) - 1} and steps >= 1, got {prompts}, {steps}")
    session = open_session(unet_onnx, session_options(threads or None))
    sample = pipe.unet.config.sample_size
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    rng = np.random.default_rng(seed)
    config = stated_config(pipe.scheduler.config)  # what the model states; the scheduler fills in its own defaults
    feeds: list[dict[str, np.ndarray]] = []
    for prompt in PROMPTS[:prompts + 1]:
        context = np.concatenate([_embed(pipe, ""), _embed(pipe, prompt)])  # (2, seq, dim): uncond, cond
        scheduler = make_scheduler("euler", scheduler_config_from_dict(config))
        scheduler.set_timesteps(steps)
        x = rng.standard_normal((1, pipe.unet.config.in_channels, h, w)).astype(np.float32)
        x *= np.float32(scheduler.init_noise_sigma)
        for i, t in enumerate(scheduler.timesteps):
            scaled = scheduler.scale_model_input(x, i).astype(np.float32)
            feed = {"sample": np.concatenate([scaled, scaled]), "timestep": np.full((2,), t, np.float32),
                    "encoder_hidden_states": context}
            feeds.append(feed)
            uncond, cond = session.run(None, feed)[0]
            x = scheduler.step((uncond + GUIDANCE * (cond - uncond))[None], i, x).astype(np.float32)
    held_out = {k: np.concatenate([f[k] for f in feeds[-steps:]]) for k in feeds[0]}  # (2 * steps, ...)
    return feeds[:-steps], held_out


def _embed(pipe, prompt: str) -> np.ndarray:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0].float().numpy()
