"""ControlNet at convert time: each ControlNet exported as its own graph, and the UNet exported to take the
residuals a ControlNet adds (after each down-block layer and the mid block) as inputs.

A ControlNet graph: (sample, timestep, encoder_hidden_states, controlnet_cond (B, 3, H, W) in [0, 1]) ->
down_residual_0 … down_residual_{n-1}, mid_residual, at conditioning scale 1 (the runtime scales, sums several
ControlNets' residuals and skips a ControlNet outside its guidance window: edge/stages/control.py). The UNet
graph then has those residuals as inputs, zeros when no ControlNet runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edge.converters.onnx_export import Spec
from edge.converters.sources import PICKLE_SUFFIXES
from edge.validate import split_suffix

PREFIX = "controlnet_"  # component name: controlnet_<name>


class ControlNetError(ValueError):
    """A ControlNet that cannot be converted with this model: which, and why."""


def residual_layout(unet_config) -> list[tuple[int, int]]:
    """(channels, stride) of each down-block residual a ControlNet gives this UNet, then the mid block's."""
    out = unet_config.block_out_channels
    layout = [(out[0], 1)]
    for i, channels in enumerate(out):
        layout += [(channels, 2 ** i)] * unet_config.layers_per_block
        if i < len(out) - 1:
            layout.append((channels, 2 ** (i + 1)))
    return layout + [(out[-1], 2 ** (len(out) - 1))]


def residual_names(unet_config) -> list[str]:
    n = len(residual_layout(unet_config)) - 1
    return [f"down_residual_{k}" for k in range(n)] + ["mid_residual"]


def _split(source: str) -> tuple[Path, str]:
    """`SOURCE[:NAME]` -> (path, name); the name defaults to the folder's or file's."""
    path_text, name = split_suffix(source)
    path = Path(path_text)
    return path, (name or (path.stem if path.suffix else path.name)).replace("-", "_")


def load_name(source: str) -> str:
    return _split(source)[1]


def control_inputs(unet_config) -> list[dict]:
    """What the manifest says of the UNet's residual inputs: name, channels, stride (latent pixels per pixel)."""
    return [{"name": n, "channels": c, "stride": s}
            for n, (c, s) in zip(residual_names(unet_config), residual_layout(unet_config))]


def load_controlnet(source: str, allow_pickle: bool = False):
    """(name, diffusers ControlNetModel) from a diffusers folder or a single-file checkpoint; `SOURCE:NAME` names
    it (default: the folder's or file's name)."""
    from diffusers import ControlNetModel

    path, name = _split(source)
    if not name.isidentifier():
        raise ControlNetError(f"--controlnet {source}: name {name!r} must be letters, digits, - and _")
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ControlNetError(f"refusing to load {path}: {path.suffix} checkpoints are Python pickles, and "
                              "unpickling runs whatever code the file contains; use its .safetensors")
    if path.is_dir() and (path / "config.json").is_file():
        model = ControlNetModel.from_pretrained(path, local_files_only=True)
    elif path.is_file():
        model = ControlNetModel.from_single_file(str(path), local_files_only=True)
    else:
        raise ControlNetError(f"--controlnet {path}: expected a diffusers ControlNetModel folder (with "
                              "config.json) or a single-file .safetensors checkpoint")
    return name, model.eval()


def check_fits(name: str, controlnet, unet) -> None:
    """A ControlNet is made for one UNet shape: its residuals must be the UNet's down-block outputs."""
    c, u = controlnet.config, unet.config
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim"):
        if getattr(c, key) != getattr(u, key) and list(getattr(c, key) or []) != list(getattr(u, key) or []):
            raise ControlNetError(f"ControlNet {name}: its {key} {getattr(c, key)} is not the UNet's "
                                  f"{getattr(u, key)}; it was trained for another model")


class ControlNet(torch.nn.Module):
    def __init__(self, controlnet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                                    return_dict=False)
        return (*down, mid)


class ControlledUNet(torch.nn.Module):
    """The UNet with a ControlNet's residuals as inputs."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=residuals[:-1],
                         mid_block_additional_residual=residuals[-1], return_dict=False)[0]


def _residual_tensors(unet_config, batch: int, h: int, w: int, g: torch.Generator, scale: float = 1.0):
    return tuple(torch.randn(batch, c, -(-h // s), -(-w // s), generator=g) * scale
                 for c, s in residual_layout(unet_config))


def _residual_specs(unet_config) -> list[dict]:
    return [{"name": n, "dtype": "float32", "shape": ["batch", c, f"height_{s}", f"width_{s}"]}
            for n, (c, s) in zip(residual_names(unet_config), residual_layout(unet_config))]


def controlled_unet_spec(unet_spec: Spec, unet) -> Spec:
    """The UNet's spec with the residual inputs added (examples: small random residuals)."""
    cfg = unet.config

    def example(g, h, w):
        base = unet_spec.example(g, h, w)
        return (*base, *_residual_tensors(cfg, base[0].shape[0], h, w, g, scale=0.1))

    return Spec("unet", ControlledUNet(unet), unet_spec.inputs + _residual_specs(cfg), unet_spec.outputs, example)


def controlnet_spec(name: str, controlnet, unet_spec: Spec, vae_scale: int) -> Spec:
    cfg = controlnet.config
    inputs = unet_spec.inputs[:3] + [{"name": "controlnet_cond", "dtype": "float32",
                                      "shape": ["batch", 3, "image_height", "image_width"]}]
    inputs[0] = {**inputs[0], "shape": ["batch", cfg.in_channels, "height", "width"]}

    def example(g, h, w):
        sample, t, context = unet_spec.example(g, h, w)[:3]
        return sample[:, : cfg.in_channels], t, context, torch.rand(sample.shape[0], 3, h * vae_scale,
                                                                     w * vae_scale, generator=g)

    return Spec(PREFIX + name, ControlNet(controlnet), inputs, _residual_specs(cfg), example)


def with_controlnets(specs: list[Spec], unet, sources: tuple[str, ...], vae_scale: int) -> tuple[list[Spec], dict]:
    """The component specs with each ControlNet of `sources` added and the UNet taking their residuals (unchanged
    without any); also {name: ControlNetModel}."""
    controls = dict(load_controlnet(c) for c in sources)
    if len(controls) != len(sources):
        raise ControlNetError("two --controlnet have the same name; name them SOURCE:NAME")
    if not controls:
        return specs, controls
    for name, controlnet in controls.items():
        check_fits(name, controlnet, unet)
    plain_unet = next(s for s in specs if s.name == "unet")
    specs = [controlled_unet_spec(s, unet) if s.name == "unet" else s for s in specs]
    return specs + [controlnet_spec(n, c, plain_unet, vae_scale) for n, c in controls.items()], controls
