"""The denoiser: one UNet call (whole graph, or chunk by chunk), classifier-free guidance, and the denoising
loop as a generator of latents (progress, previews and cancellation are the caller's).

Where ControlNet would add its residuals: `unet_call`'s `env` (the chunks' shared feeds), before the chunk
that reads them.

DeepCache (converters/deep_cache.py): with `cache_interval` N > 1 on a bundle cut for it, every N-th step runs
the whole UNet and keeps its deep feature; the steps between skip the deep chunk (or chunks) and reuse it.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np

from edge.graphs import Graphs
from edge.plan import Plan

# (sample, timestep, context, cache) -> noise prediction; cache: None, or DeepCache's store for this call's batch
UNet = Callable[..., np.ndarray]


def unet_call(graphs: Graphs, plan: Plan | None, sample: np.ndarray, t: float, context: np.ndarray,
              cache: dict | None = None, reuse: bool = False,
              residuals: dict[str, np.ndarray] | None = None, inputs: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(B, C, h, w) -> noise prediction. Chunks the plan does not keep resident load for this call only.

    DeepCache: with `reuse` the deep chunk is skipped and `cache` (what it made at the last full step) stands in
    for its outputs; without, a given `cache` is filled with them.
    A UNet converted with ControlNets takes their `residuals` (edge.stages.control); zeros where none is given.
    `inputs`: the graph's further inputs (an LCM UNet's guidance embedding, edge.stages.guidance_embedding).
    Logged in `graphs.timed_calls` as one "unet" entry: all its chunks, and loading those not resident.
    """
    start = time.time()
    env = {"sample": sample, "timestep": np.full((sample.shape[0],), t, dtype=np.float32),
           "encoder_hidden_states": context, **(inputs or {})}
    component = graphs.manifest.components["unet"]
    for r in component.control_inputs:  # (B, channels, h / stride, w / stride), rounded up as the UNet's
        env[r["name"]] = residuals[r["name"]] if residuals is not None else np.zeros(
            (sample.shape[0], r["channels"], -(-sample.shape[2] // r["stride"]), -(-sample.shape[3] // r["stride"])),
            np.float32)
    per_call = plan is not None and plan.unet_per_call
    keep = plan.unet_keep if per_call else len(component.graphs)
    sessions = graphs.open("unet", keep)  # the resident chunks; the others load for this call only
    chunks = component.chunks or (None,)
    last_use = {n: k for k, c in enumerate(component.chunks) for n in c.inputs}
    deep = set(component.deep_cache.get("skip_chunks", ())) if cache is not None else set()
    for k, chunk in enumerate(chunks):
        if k in deep and reuse:
            env.update(cache)  # the deep features of the last full step
            continue
        session = sessions[k] if k < keep else graphs.load(component, k)
        if keep <= k + 1 < len(chunks):
            graphs.prefetch(component, k + 1)  # the next chunk's read overlaps this one's run
        names = [o.name for o in session.get_outputs()]
        feeds = {i.name: env[i.name] for i in session.get_inputs()}
        env.update(zip(names, graphs.run("unet", session, feeds, names, timed=False)))
        if k in deep:  # this step's deep features, for the cached steps that follow
            cache.update({n: env[n] for n in component.deep_cache["cached"] if n in names})
        del session, feeds
        if chunk is not None:  # drop what no later chunk reads
            env = {n: v for n, v in env.items() if last_use.get(n, -1) > k or n == "noise_pred"}
    if graphs.timed_calls is not None:
        graphs.timed_calls.append(("unet", start, time.time()))
    return env["noise_pred"]


Blend = Callable[[int, np.ndarray], np.ndarray]  # (step index just taken, latents) -> latents


def denoise(unet: UNet, x: np.ndarray, context: np.ndarray, sched, guidance: float, rng: np.random.Generator,
            two_calls: bool = False, start: int = 0, extra: np.ndarray | None = None,
            blend: Blend | None = None, cache_interval: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (latents after each scheduler step, the model's estimate of the clean latents at that step) from step
    index `start` (img2img starts part-way). The estimate is what a preview should show: the noisy latents are
    mostly noise until the last steps.

    `context` is [unconditional x N, conditional x N] when guided (twice x's batch); `two_calls` runs the
    two halves as batch-1 calls (half the activations, same result) where the memory plan asks for it.
    Inpainting: `extra` (N, E, h, w) is concatenated to the UNet's input channels (a 9-channel inpainting
    UNet's mask and masked-image latents); `blend` runs after each step (a 4-channel UNet's latent blending).
    `cache_interval` N > 1: DeepCache, the whole UNet on every N-th step only (one store per UNet call of a step).
    """
    guided = context.shape[0] == 2 * x.shape[0]
    caches = ([{}, {}] if guided and two_calls else [{}]) if cache_interval > 1 else [None, None]
    for i in range(start, len(sched.timesteps)):
        t = sched.timesteps[i]
        reuse = (i - start) % cache_interval != 0
        x_in = sched.scale_model_input(x, i).astype(np.float32)  # (N, C, h, w)
        if extra is not None:
            x_in = np.concatenate([x_in, extra.astype(np.float32)], axis=1)  # (N, C + E, h, w)
        if guided and two_calls:
            uncond_ctx, cond_ctx = np.split(context, 2)
            out = np.concatenate([unet(x_in, t, uncond_ctx, caches[0], reuse),
                                  unet(x_in, t, cond_ctx, caches[-1], reuse)])
        else:
            out = unet(np.concatenate([x_in, x_in]) if guided else x_in, t, context, caches[0], reuse)  # (B, C, h, w)
        if guided:
            uncond, cond = np.split(out, 2)
            out = uncond + np.float32(guidance) * (cond - uncond)
        noise = rng.standard_normal(x.shape, dtype=np.float32) if sched.needs_noise else None
        x0 = sched.denoised(out, i, x).astype(np.float32)  # (N, C, h, w)
        x = sched.step(out, i, x, noise=noise)
        if blend is not None:
            x = blend(i, x)
        yield x, x0
