"""ControlNet, a stage of the denoiser: before each UNet call, every ControlNet whose guidance window holds this
step turns (latents, timestep, text, control image) into residuals, scaled and summed across ControlNets, that
the UNet adds after its down-block layers and its mid block (converters/controlnet.py). Outside every window, or
with none given, the UNet gets zeros, which is the plain UNet.

The window is diffusers': a ControlNet runs at step i of n when start <= i / n and (i + 1) / n <= end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edge.graphs import Graphs

PREFIX = "controlnet_"


@dataclass(frozen=True)
class Control:
    name: str  # the bundle's ControlNet (edge convert --controlnet SOURCE:NAME)
    image: np.ndarray  # (1, 3, H, W) float32 in [0, 1], the generation's size
    scale: float = 1.0
    start: float = 0.0  # fraction of the steps before which it does not run
    end: float = 1.0  # fraction after which it does not run


def names(manifest) -> list[str]:
    return [n.removeprefix(PREFIX) for n in manifest.components if n.startswith(PREFIX)]


def check_controls(manifest, controls, height: int, width: int) -> list[Control]:
    """Each control names a ControlNet of the bundle, has an image of the generation's size, a finite scale and a
    window 0 <= start < end <= 1; returns them as a list."""
    controls = list(controls or ())
    have = names(manifest)
    for c in controls:
        if not isinstance(c, Control):
            raise ValueError(f"control {c!r}: expected an edge.stages.control.Control")
        if c.name not in have:
            raise ValueError(f"control {c.name!r}: this bundle has "
                             + (f"ControlNets {', '.join(have)}" if have else "no ControlNet (edge convert MODEL "
                                "--controlnet DIR)"))
        if c.image.ndim != 4 or c.image.shape[:2] != (1, 3) or c.image.shape[2:] != (height, width):
            got = "x".join(map(str, c.image.shape[:1:-1])) if c.image.ndim == 4 else str(list(c.image.shape))
            raise ValueError(f"control image for {c.name} is {got}; this generation is {width}x{height}: give a "
                             "control image of the generation's size")
        if isinstance(c.scale, bool) or not isinstance(c.scale, (int, float)) or not math.isfinite(c.scale):
            raise ValueError(f"control {c.name}: scale {c.scale!r} is not a finite number")
        if not 0 <= c.start < c.end <= 1:
            raise ValueError(f"control {c.name}: guidance window start {c.start} / end {c.end}; expected "
                             "0 <= start < end <= 1")
    return controls


def describe_control(c: Control) -> dict:
    """What a generation records of a control (PNG parameters)."""
    return {"name": c.name, "scale": c.scale, "start": c.start, "end": c.end}


def active(control: Control, step: int, steps: int) -> bool:
    return not (step / steps < control.start or (step + 1) / steps > control.end)


def residuals(graphs: Graphs, controls: list[Control], sample: np.ndarray, t: float, context: np.ndarray,
              step: int, steps: int, per_call: bool = False) -> dict[str, np.ndarray] | None:
    """The summed, scaled residuals of the ControlNets active at this step (None: none is); `per_call`: each
    ControlNet loaded for this call and freed after it (the memory plan's choice), else kept loaded."""
    total, outputs = None, None
    for c in controls:
        if not active(c, step, steps):
            continue
        name = PREFIX + c.name
        component = graphs.manifest.components[name]
        session = graphs.load(component, 0) if per_call else graphs.open(name)[0]
        channels = component.inputs[0].shape[1]
        feeds = {"sample": sample[:, :channels], "timestep": np.full((sample.shape[0],), t, np.float32),
                 "encoder_hidden_states": context,
                 "controlnet_cond": np.repeat(c.image.astype(np.float32), sample.shape[0], axis=0)}
        outputs = [o.name for o in session.get_outputs()]
        scaled = [r * np.float32(c.scale) for r in graphs.run(name, session, feeds)]
        total = scaled if total is None else [a + b for a, b in zip(total, scaled)]
        del session
    return None if total is None else dict(zip(outputs, total))


def controlled(unet: Callable, graphs: Graphs, plan, controls: list[Control], timesteps, start: int) -> Callable:
    """`unet` (sample, t, context, cache, reuse, residuals) as the denoiser's UNet, with the controls' residuals:
    the step is found from t among the timesteps the run takes (img2img: from `start` on)."""
    per_call = plan is not None and plan.control_per_call
    run = [float(t) for t in timesteps[start:]]
    index = {t: i for i, t in reversed(list(enumerate(run)))}

    def call(sample, t, context, cache=None, reuse=False):
        extra = residuals(graphs, controls, sample, t, context, index[float(t)], len(run), per_call)
        return unet(sample, t, context, cache, reuse, residuals=extra)

    return call


def control_image(image) -> np.ndarray:
    """A control image (PIL image or path) as (1, 3, H, W) float32 in [0, 1], as diffusers' control image processor
    makes it (RGB, not normalised to [-1, 1])."""
    from edge.images import load_image

    return (np.asarray(load_image(image), np.float32) / 255.0).transpose(2, 0, 1)[None]


def parse_control(text: str, manifest, start: float = 0.0, end: float = 1.0) -> Control:
    """`IMAGE[:NAME][:SCALE]` (the CLI's --control): NAME may be left out when the bundle has one ControlNet."""
    parts = text.split(":")
    scale = 1.0
    if len(parts) > 1:
        try:
            scale = float(parts[-1])
            parts = parts[:-1]
        except ValueError:
            pass
    have = names(manifest)
    name = parts[-1] if len(parts) > 1 and parts[-1] in have else None
    path = ":".join(parts[:-1] if name else parts)
    if name is None:
        if len(have) != 1:
            raise ValueError(f"--control {text}: say which ControlNet (IMAGE:NAME[:SCALE]); this bundle has "
                             + (", ".join(have) or "none (edge convert MODEL --controlnet DIR)"))
        name = have[0]
    return Control(name, control_image(path), scale, start, end)
