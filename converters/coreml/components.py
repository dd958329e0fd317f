"""The Core ML graphs, named and shaped as Apple's Swift package (ml-stable-diffusion) loads them.

| file (Apple name)   | inputs (float32)                                           | outputs (float32)        |
|---------------------|------------------------------------------------------------|--------------------------|
| TextEncoder         | input_ids (1, 77) token ids as floats                      | last_hidden_state (1, 77, D), pooled_outputs (1, D) |
| Unet / UnetChunkK   | sample (2, 4, h, w), timestep (2,), encoder_hidden_states (2, D, 1, 77) | noise_pred (2, 4, h, w) |
| VAEDecoder          | z (1, 4, h, w): latents already divided by the scaling factor | image (1, 3, 8h, 8w) in ~[-1, 1] |
| VAEEncoder          | sample (1, 3, 8h, 8w), diagonal_noise (1, 4, h, w), noise (1, 4, h, w), sqrt_alphas_cumprod (1, 1), sqrt_one_minus_alphas_cumprod (1, 1) | latent_dist (1, 4, h, w): scaled, noised latents |

Shapes are fixed at conversion (Core ML's Neural Engine wants static shapes); batch 2 is the UNet's
classifier-free-guidance pair, as Apple's `Unet.predictNoise` feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from edge.converters.coreml.ane import use_attention
from edge.converters.coreml.unet import UNetANE
from edge.converters.coreml.vae import DecoderANE, EncoderANE

APPLE_NAMES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder",
               "vae_encoder": "VAEEncoder"}
UNET_BATCH = 2


class TextEncoderCoreML(nn.Module):
    """CLIP text model taking float token ids (Core ML inputs are float32 in Apple's package)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids.to(torch.int64), return_dict=False)
        return out[0], out[1]  # (1, 77, D), (1, D)


class VAEDecoderCoreML(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.decoder = DecoderANE(vae)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (1, 3, 8h, 8w)


class VAEEncoderCoreML(nn.Module):
    """Encode, sample the posterior with given noise, scale, and noise to the img2img start step (Apple's I/O)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = EncoderANE(vae)
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, sample: torch.Tensor, diagonal_noise: torch.Tensor, noise: torch.Tensor,
                sqrt_alphas_cumprod: torch.Tensor, sqrt_one_minus_alphas_cumprod: torch.Tensor) -> torch.Tensor:
        mean, logvar = self.encoder(sample).chunk(2, dim=1)  # (1, 4, h, w) each
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        latents = (mean + std * diagonal_noise) * self.scaling  # (1, 4, h, w)
        return sqrt_alphas_cumprod * latents + sqrt_one_minus_alphas_cumprod * noise  # (1, 4, h, w)


@dataclass
class Graph:
    """One Core ML graph to make: the module to trace, its reference, example inputs, tensor specs."""

    name: str  # text_encoder, unet, vae_decoder, vae_encoder
    module: nn.Module  # traced for Core ML
    reference: Callable[..., tuple[torch.Tensor, ...]]  # the diffusers computation it must match
    inputs: list[dict]  # [{"name", "dtype", "shape"}] in argument order
    outputs: list[dict]
    example: Callable[[torch.Generator], tuple[torch.Tensor, ...]]


def _f32(name: str, shape: list[int]) -> dict:
    return {"name": name, "dtype": "float32", "shape": shape}


def graphs(pipe, latent_hw: tuple[int, int], only: tuple[str, ...] | None = None,
           attention: str = "split_einsum") -> Iterator[Graph]:
    """The graphs (default all four) at latent size `latent_hw`, from a diffusers StableDiffusionPipeline (fp32,
    eval), built one at a time as iterated; UNet and VAE attention computed by `attention` (ane.ATTENTION)."""
    te, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    seq, dim, vocab = te.config.max_position_embeddings, te.config.hidden_size, te.config.vocab_size
    ctx_dim, c = unet.config.cross_attention_dim, vae.config.latent_channels
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = latent_hw
    lat1, lat2, img = [1, c, h, w], [UNET_BATCH, unet.config.in_channels, h, w], [1, 3, h * f, w * f]

    def te_example(g):
        ids = torch.randint(0, vocab - 1, (1, seq), generator=g)
        ids[0, 0], ids[0, seq // 2:] = vocab - 2, vocab - 1  # start token, a prompt, then end/padding tokens
        return (ids.float(),)

    def te_reference(ids):
        return tuple(te(ids.long(), return_dict=False)[:2])

    def unet_example(g):
        return (torch.randn(*lat2, generator=g), torch.tensor([981.0, 981.0]),
                torch.randn(UNET_BATCH, ctx_dim, 1, seq, generator=g))

    def unet_reference(sample, t, ctx):
        return (unet(sample, t, ctx.squeeze(2).transpose(1, 2), return_dict=False)[0],)  # (B, 77, D) for diffusers

    def dec_reference(z):
        return (vae.decode(z, return_dict=False)[0],)

    def enc_example(g):
        return (torch.rand(*img, generator=g) * 2 - 1, torch.randn(*lat1, generator=g),
                torch.randn(*lat1, generator=g), torch.tensor([[0.6]]), torch.tensor([[0.8]]))

    def enc_reference(sample, diag, noise, a, b):
        dist = vae.encode(sample, return_dict=False)[0]
        return (a * (dist.mean + dist.std * diag) * vae.config.scaling_factor + b * noise,)

    makers = {
        "text_encoder": lambda: Graph(
            "text_encoder", TextEncoderCoreML(te).eval(), te_reference, [_f32("input_ids", [1, seq])],
            [_f32("last_hidden_state", [1, seq, dim]), _f32("pooled_outputs", [1, dim])], te_example),
        "unet": lambda: Graph(
            "unet", UNetANE.from_diffusers(unet), unet_reference,
            [_f32("sample", lat2), _f32("timestep", [UNET_BATCH]),
             _f32("encoder_hidden_states", [UNET_BATCH, ctx_dim, 1, seq])],
            [_f32("noise_pred", lat2)], unet_example),
        "vae_decoder": lambda: Graph(
            "vae_decoder", VAEDecoderCoreML(vae).eval(), dec_reference, [_f32("z", lat1)], [_f32("image", img)],
            lambda g: (torch.randn(*lat1, generator=g),)),
        "vae_encoder": lambda: Graph(
            "vae_encoder", VAEEncoderCoreML(vae).eval(), enc_reference,
            [_f32("sample", img), _f32("diagonal_noise", lat1), _f32("noise", lat1),
             _f32("sqrt_alphas_cumprod", [1, 1]), _f32("sqrt_one_minus_alphas_cumprod", [1, 1])],
            [_f32("latent_dist", lat1)], enc_example),
    }
    for name in only if only is not None else tuple(makers):
        if name not in makers:
            raise ValueError(f"unknown Core ML graph {name!r}; expected some of {tuple(makers)}")
        graph = makers[name]()  # one at a time: a full-size UNet rewrite holds GBs
        use_attention(graph.module, attention)
        yield graph
