"""Export each Stable Diffusion component to ONNX and check it against the torch module.

Each component is a thin torch wrapper with plain tensor inputs and outputs, a spec of those tensors
(names, dtypes, shapes with named dynamic axes) and a way to draw random inputs for the parity check.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from edge.metrics import max_abs_diff, psnr
from edge.sessions import open_session

OPSET = 17
ONE_FILE_LIMIT = 1_800_000_000  # protobuf's hard limit is 2 GiB; above this, weights go to a .data file by default


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask` (B, 77) int64, 1 = attend: compel's default down-weighting masks a fragment's tokens
        out of attention (edge.prompts); all ones is the plain encoder."""
        return self.text_encoder(input_ids, attention_mask=attention_mask, return_dict=False)[0]  # (B, 77, D)


class UNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """`timestep_cond` (B, time_cond_proj_dim): an LCM-distilled UNet's guidance embedding
        (edge.stages.guidance_embedding)."""
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         return_dict=False)[0]  # (B, C, h, w)


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]  # (B, 3, 8h, 8w), roughly in [-1, 1]


class VaeEncoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(sample, return_dict=False)[0]
        return dist.mean, dist.std  # (B, C, h, w) each


def _some_masked(batch: int, seq: int) -> torch.Tensor:
    """(batch, seq) int64 attention masks: the first row all ones (the plain encoder), the others with a fifth of
    the tokens after the first masked out, as compel's down-weighting does. Their own generator: the other
    components' example inputs stay the draws they were before the mask existed."""
    g = torch.Generator().manual_seed(seq)
    mask = (torch.rand(batch, seq, generator=g) > 0.2).to(torch.int64)
    mask[0], mask[:, 0] = 1, 1
    return mask


@dataclass(frozen=True)
class Spec:
    """One component: the module to export, its tensors, and example / parity inputs."""

    name: str
    module: torch.nn.Module
    inputs: list[dict]  # [{"name", "dtype", "shape"}], shape entries int or dynamic-axis name
    outputs: list[dict]
    example: Callable[[torch.Generator, int, int], tuple[torch.Tensor, ...]]  # (gen, latent_h, latent_w) -> inputs


def component_specs(pipe) -> list[Spec]:
    """The four graphs of a bundle, from a diffusers StableDiffusionPipeline."""
    te_cfg, unet_cfg, vae_cfg = pipe.text_encoder.config, pipe.unet.config, pipe.vae.config
    seq, dim, vocab = te_cfg.max_position_embeddings, te_cfg.hidden_size, te_cfg.vocab_size
    c = vae_cfg.latent_channels
    f = 2 ** (len(vae_cfg.block_out_channels) - 1)
    lat = ["batch", c, "height", "width"]
    img = ["batch", 3, "image_height", "image_width"]
    embedded = getattr(unet_cfg, "time_cond_proj_dim", None)  # an LCM UNet's guidance embedding width, or None

    def f32(name, shape):
        return {"name": name, "dtype": "float32", "shape": shape}

    return [
        Spec(
            "text_encoder", TextEncoder(pipe.text_encoder),
            [{"name": "input_ids", "dtype": "int64", "shape": ["batch", seq]},
             {"name": "attention_mask", "dtype": "int64", "shape": ["batch", seq]}],
            [f32("last_hidden_state", ["batch", seq, dim])],
            lambda g, h, w: (torch.randint(0, vocab, (2, seq), generator=g), _some_masked(2, seq)),
        ),
        Spec(
            "unet", UNet(pipe.unet),
            # in_channels: 4, or 9 for an inpainting UNet (latents + mask + masked-image latents)
            [f32("sample", ["batch", unet_cfg.in_channels, "height", "width"]), f32("timestep", ["batch"]),
             # "context": 77 per prompt window; longer prompts are encoded in windows and concatenated
             f32("encoder_hidden_states", ["batch", "context", unet_cfg.cross_attention_dim])]
            + ([f32("timestep_cond", ["batch", embedded])] if embedded else []),
            [f32("noise_pred", lat)],
            lambda g, h, w: (
                torch.randn(2, unet_cfg.in_channels, h, w, generator=g),
                torch.rand(2, generator=g) * 999,
                torch.randn(2, seq, unet_cfg.cross_attention_dim, generator=g),
            ) + ((torch.randn(2, embedded, generator=g),) if embedded else ()),
        ),
        Spec(
            "vae_decoder", VaeDecoder(pipe.vae),
            [f32("latent_sample", lat)], [f32("sample", img)],
            lambda g, h, w: (torch.randn(1, c, h, w, generator=g),),
        ),
        Spec(
            "vae_encoder", VaeEncoder(pipe.vae),
            [f32("sample", img)], [f32("latent_mean", lat), f32("latent_std", lat)],
            lambda g, h, w: (torch.rand(1, 3, h * f, w * f, generator=g) * 2 - 1,),
        ),
    ]


def tiled_vae_specs(pipe) -> list[Spec]:
    """The VAE decoder cut for tiled decoding (converters/tiled_vae.py): its head, run whole, and its tail,
    run per tile with GroupNorm statistics shared between tiles."""
    from edge.converters.tiled_vae import SharedStatsVaeDecoderTail, VaeDecoderHead

    head, tail = VaeDecoderHead(pipe.vae), SharedStatsVaeDecoderTail(pipe.vae)
    c, m, L, G = pipe.vae.config.latent_channels, head.channels, tail.layers, tail.groups

    def example(g, h, w):
        """Hidden features, and as given statistics those of other features: the graph must apply them (gn_mix 1)."""
        h, w = h * head.upscale, w * head.upscale
        x, other = torch.randn(1, m, h, w, generator=g), torch.randn(1, m, h, w, generator=g)
        weight = torch.rand(1, 1, h, w, generator=g)  # any positive blend weights
        with torch.no_grad():
            stats = tail(other, torch.zeros(L, 2, G), torch.zeros(L), weight)[1]  # (L, 2, G)
        return x, stats, torch.ones(L), weight

    hidden = {"name": "hidden", "dtype": "float32", "shape": [1, m, "hidden_height", "hidden_width"]}
    return [
        Spec("vae_decoder_head", head,
             [{"name": "latent_sample", "dtype": "float32", "shape": [1, c, "height", "width"]}], [hidden],
             lambda g, h, w: (torch.randn(1, c, h, w, generator=g),)),
        Spec("vae_decoder_tiled", tail,
             [hidden, {"name": "gn_stats", "dtype": "float32", "shape": [L, 2, G]},
              {"name": "gn_mix", "dtype": "float32", "shape": [L]},
              {"name": "gn_weight", "dtype": "float32", "shape": [1, 1, "hidden_height", "hidden_width"]}],
             [{"name": "sample", "dtype": "float32", "shape": [1, 3, "image_height", "image_width"]},
              {"name": "gn_local", "dtype": "float32", "shape": [L, 2, G]}],
             example),
    ]


def _dynamic_axes(spec: Spec) -> dict[str, dict[int, str]]:
    return {
        t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
        for t in spec.inputs + spec.outputs
    }


def export(spec: Spec, path: Path, example: tuple[torch.Tensor, ...], scratch: Path,
           external_data_over: int = ONE_FILE_LIMIT) -> tuple[list[Path], int]:
    """Write `spec` to `path`, with weights in `path.data` when they exceed `external_data_over` bytes.

    Returns the files written and the parameter count.
    """
    raw = scratch / f"{spec.name}.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            spec.module.eval(), example, str(raw),
            input_names=[t["name"] for t in spec.inputs],
            output_names=[t["name"] for t in spec.outputs],
            dynamic_axes=_dynamic_axes(spec),
            opset_version=OPSET,
            dynamo=False,
        )
    model = onnx.load(str(raw), load_external_data=True)
    parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    large = sum(t.ByteSize() for t in model.graph.initializer) > external_data_over
    data_name = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True, location=data_name)
    del model
    for leftover in scratch.iterdir():
        leftover.unlink()
    return ([path, path.with_name(data_name)] if large else [path]), parameters


def parity(spec: Spec, path: Path, inputs: tuple[torch.Tensor, ...]) -> dict:
    """Max-abs-diff and PSNR of the onnxruntime graph against the torch module on the same inputs."""
    with torch.no_grad():
        ref = spec.module(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    session = open_session(path)
    feeds = {t["name"]: x.numpy() for t, x in zip(spec.inputs, inputs)}
    got = session.run([t["name"] for t in spec.outputs], feeds)
    del session
    per_output = {
        t["name"]: {"max_abs_diff": max_abs_diff(r.numpy(), g), "psnr_db": round(psnr(r.numpy(), g), 2)}
        for t, r, g in zip(spec.outputs, ref, got)
    }
    return {
        "reference": "torch fp32",
        "inputs": {t["name"]: list(x.shape) for t, x in zip(spec.inputs, inputs)},
        "max_abs_diff": max(v["max_abs_diff"] for v in per_output.values()),
        "psnr_db": min(v["psnr_db"] for v in per_output.values()),
        "outputs": per_output,
    }
