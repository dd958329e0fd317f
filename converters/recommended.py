"""What a model is meant to be sampled with: the manifest's `recommended` steps, guidance and scheduler.

Few-step models say so through their scheduler config: an LCM model ships diffusers' LCMScheduler (4 steps, no
classifier-free guidance: LCM-LoRA and LCM-fused models; an LCM-distilled UNet takes the guidance scale as an
input instead, diffusers' 8.5 by default), SD-Turbo / SDXL-Turbo an Euler sampler with "trailing"
timesteps (1 step, guidance off). SDXL base is sampled as diffusers' StableDiffusionXLPipeline suggests
(guidance 5). Everything else gets edge.bundle.GENERATION_DEFAULTS.
"""

from __future__ import annotations

from typing import Any

from edge.bundle import GENERATION_DEFAULTS
from edge.converters.sdxl import is_xl

EULER = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a"}


def recommended(pipe, scheduler: dict[str, Any]) -> dict[str, Any]:
    """{steps, guidance, scheduler, why} for the model `pipe` whose scheduler config (as diffusers loaded it) is
    `scheduler`."""
    cls = scheduler.get("_class_name", type(pipe.scheduler).__name__)
    if getattr(pipe.unet.config, "time_cond_proj_dim", None):  # diffusers' LatentConsistencyModelPipeline defaults
        return {"steps": 4, "guidance": 8.5, "scheduler": "lcm",
                "why": "an LCM-distilled UNet: guidance is its input (time_cond_proj_dim), one pass per step"}
    if cls == "LCMScheduler":
        return {"steps": 4, "guidance": 1.0, "scheduler": "lcm", "why": "the model's scheduler is LCMScheduler"}
    if cls in EULER and scheduler.get("timestep_spacing") == "trailing":
        return {"steps": 1, "guidance": 0.0, "scheduler": EULER[cls],
                "why": f"a Turbo model: {cls} with trailing timesteps"}
    if is_xl(pipe):
        return {**GENERATION_DEFAULTS, "steps": 30, "guidance": 5.0,
                "why": "SDXL refiner" if pipe.text_encoder is None else "SDXL base"}
    return {**GENERATION_DEFAULTS, "why": "edge's defaults"}


def refusal(pipe, options) -> str | None:
    """Why the model's UNet cannot be converted with these options yet, or None."""
    if not getattr(pipe.unet.config, "time_cond_proj_dim", None):
        return None
    given = [flag for flag, on in (("--controlnet", options.controlnets), ("--deep-cache", options.deep_cache),
                                   ("--token-merging", options.token_merging),
                                   ("--activations static", options.activations == "static"),
                                   ("--target coreml", "coreml" in options.targets)) if on]
    if given:
        return (f"{given[0]} with an LCM-distilled UNet (its guidance embedding, time_cond_proj_dim) is not built "
                "yet; convert it without, or use LCM-LoRA on its base model")
    return None
