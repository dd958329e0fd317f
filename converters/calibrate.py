"""Calibration inputs for static int8: what the UNet sees along its own denoising trajectories.

Static quantization fixes every quantized activation's scale when the bundle is written, so the inputs it
is calibrated on must span what the runtime will feed: latents from pure noise (t near T) to nearly clean
(t near 0), under conditional and unconditional text. They come from running the exported fp32 graph the
way `edge generate` does — Euler steps, classifier-free guidance as one batch-2 call — on a few prompts, so
the ranges are the model's own rather than a guess about them. The VAE decoder is not calibrated: on the
default model, scales fitted to a few trajectories' clean latents gave 11 dB on a held-out prompt's.

A bundle with ControlNets is calibrated on trajectories the ControlNets steer (their residuals summed at scale 1,
from a control image of an outline and a filled shape, what edge and mask ControlNets see): the UNet on every
step both with those residuals and with zeros (the same bundle runs without a ControlNet), each ControlNet on
the inputs it gets there.
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


def calibrate(pipe, unet_onnx: Path, *, controls: dict | None = None, prompts: int = 2,
              steps: int = CALIBRATION_STEPS, seed: int = 0, threads: int | None = None
              ) -> dict[str, tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]]:
    """Inputs for static int8, per graph ("unet", and "controlnet_<name>" for each of `controls`): every step of
    `prompts` Euler trajectories of `steps` steps at the model's native size to calibrate on, and one more
    trajectory, on another prompt and noise, held out and batched into one feed to check the quantized graph
    against fp32 with.

    `pipe` is the diffusers pipeline being converted (its tokenizer and text encoder give the embeddings);
    `unet_onnx` is the fp32 graph just exported, which predicts the noise that moves each trajectory on;
    `controls` ({name: diffusers ControlNetModel}) steer them, the UNet graph taking their residuals as inputs.
    """
    from edge.converters.controlnet import PREFIX, residual_names
    from edge.sessions import open_session, session_options

    if not 1 <= prompts < len(PROMPTS) or steps < 1:
        raise ValueError(f"calibration: prompts must be 1..{len(PROMPTS) - 1} and steps >= 1, got {prompts}, {steps}")
    controls = controls or {}
    names = residual_names(pipe.unet.config)
    session = open_session(unet_onnx, session_options(threads or None))
    sample = pipe.unet.config.sample_size
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    rng = np.random.default_rng(seed)
    config = stated_config(pipe.scheduler.config)  # what the model states; the scheduler fills in its own defaults
    scale = pipe.vae_scale_factor
    cond_image = np.concatenate([control_image(h * scale, w * scale)] * 2)  # (2, 3, H, W): uncond, cond
    unet: list[list[dict]] = []  # per trajectory: the UNet's feeds, with residuals and (ControlNets) with zeros
    nets: dict[str, list[list[dict]]] = {PREFIX + n: [] for n in controls}
    for prompt in PROMPTS[:prompts + 1]:
        unet.append([])
        for trajectory in nets.values():
            trajectory.append([])
        context = np.concatenate([_embed(pipe, ""), _embed(pipe, prompt)])  # (2, seq, dim): uncond, cond
        scheduler = make_scheduler("euler", scheduler_config_from_dict(config))
        scheduler.set_timesteps(steps)
        x = rng.standard_normal((1, pipe.unet.config.in_channels, h, w)).astype(np.float32)
        x *= np.float32(scheduler.init_noise_sigma)
        for i, t in enumerate(scheduler.timesteps):
            scaled = scheduler.scale_model_input(x, i).astype(np.float32)
            feed = {"sample": np.concatenate([scaled, scaled]), "timestep": np.full((2,), t, np.float32),
                    "encoder_hidden_states": context}
            if controls:
                control_feed = {**feed, "controlnet_cond": cond_image}
                for name in controls:
                    nets[PREFIX + name][-1].append(control_feed)
                added = _residuals(controls, control_feed, names)
                unet[-1].append({**feed, **{k: np.zeros_like(v) for k, v in added.items()}})
                feed = {**feed, **added}
            unet[-1].append(feed)
            uncond, cond = session.run(None, feed)[0]
            x = scheduler.step((uncond + GUIDANCE * (cond - uncond))[None], i, x).astype(np.float32)
    return {"unet": _held_out(unet, paired=bool(controls)), **{n: _held_out(t) for n, t in nets.items()}}


def _held_out(trajectories: list[list[dict]], paired: bool = False) -> tuple[list[dict], dict]:
    """The last trajectory batched into one feed ((2 * steps, ...); `paired`, the UNet's feeds with zeros and with
    residuals for each step: the even steps with residuals, the odd ones with zeros); the others' feeds flat, to
    calibrate on."""
    last = trajectories[-1]
    last = [last[i + (i // 2 + 1) % 2] for i in range(0, len(last), 2)] if paired else last
    held_out = {k: np.concatenate([f[k] for f in last]) for k in last[0]}
    return [f for t in trajectories[:-1] for f in t], held_out


def _residuals(controls: dict, feed: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The sum of every ControlNet's residuals at scale 1, by the UNet's input names."""
    args = [torch.from_numpy(feed[k]) for k in ("sample", "timestep", "encoder_hidden_states", "controlnet_cond")]
    total = None
    with torch.no_grad():
        for net in controls.values():
            down, mid = net(*args, conditioning_scale=1.0, return_dict=False)
            out = [*down, mid]
            total = out if total is None else [a + b for a, b in zip(total, out)]
    return {n: r.float().numpy() for n, r in zip(names, total)}


def control_image(height: int, width: int) -> np.ndarray:
    """(1, 3, H, W) in [0, 1]: a filled disc and a rectangle's outline on black."""
    y, x = np.mgrid[:height, :width].astype(np.float32)
    disc = (y - 0.6 * height) ** 2 + (x - 0.35 * width) ** 2 <= (0.2 * min(height, width)) ** 2
    top, bottom, left, right = (int(f * d) for f, d in ((0.15, height), (0.45, height), (0.5, width), (0.85, width)))
    box = np.zeros((height, width), bool)
    box[top:bottom + 1, [left, right]] = box[[top, bottom], left:right + 1] = True
    return np.broadcast_to((disc | box).astype(np.float32), (1, 3, height, width)).copy()


def _embed(pipe, prompt: str) -> np.ndarray:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0].float().numpy()
