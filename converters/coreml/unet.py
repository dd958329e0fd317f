"""The UNet as a flat list of named stages, built from a diffusers UNet2DConditionModel with ANE layers.

A stage reads named tensors and writes one (`conv_in`, `down0.1`, `mid`, `up1.0`, ...), so the same list runs
whole (`UNetANE`) or cut into chunks (`UNetChunk`): a chunk is a run of stages whose inputs are the graph
inputs or tensors an earlier chunk wrote, and whose outputs are what later chunks read. Apple's Swift
`Unet` feeds each chunk the previous chunk's outputs merged with the original inputs (sample, timestep,
encoder_hidden_states), so a tensor that skips a chunk (a long UNet skip connection) is passed through it.

Inputs follow Apple's package: sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, D, 1, 77).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from edge.converters.coreml.ane import (Downsample, ResnetBlockANE, SpatialTransformerANE, TimeEmbeddingANE,
                                        Upsample, same)

GRAPH_INPUTS = ("sample", "timestep", "encoder_hidden_states")
OUTPUT = "noise_pred"


class Stage(nn.Module):
    """One step: `inputs` -> `output`. `kind` says which of the forward paths below it takes."""

    def __init__(self, kind: str, inputs: tuple[str, ...], output: str, **modules: nn.Module | None):
        super().__init__()
        self.kind, self.inputs, self.output = kind, inputs, output
        for name, module in modules.items():
            setattr(self, name, module)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.kind == "time":
            return self.embed(xs[0])  # (B, T, 1, 1)
        if self.kind == "conv":  # conv_in, a resampler
            return self.conv(xs[0])  # (B, C, H', W')
        if self.kind == "out":
            return self.conv(F.silu(self.norm(xs[0])))  # (B, 4, h, w)
        if self.kind == "layer":  # x, temb, context
            x = self.resnet(xs[0], xs[1])
            return x if self.attention is None else self.attention(x, xs[2])  # (B, C, H, W)
        if self.kind == "up_layer":  # x, skip, temb, context
            x = self.resnet(torch.cat([xs[0], xs[1]], dim=1), xs[2])  # (B, C, H, W)
            return x if self.attention is None else self.attention(x, xs[3])
        if self.kind == "mid":  # x, temb, context
            x = self.resnet0(xs[0], xs[1])
            x = self.attention(x, xs[2]) if self.attention is not None else x
            return self.resnet1(x, xs[1])  # (B, C, H, W)
        raise AssertionError(self.kind)


def build_stages(unet) -> list[Stage]:
    """The stages of diffusers' UNet2DConditionModel forward, in order, with weights taken explicitly (shared)."""
    cfg = unet.config
    if cfg.addition_embed_type is not None or cfg.class_embed_type is not None or cfg.center_input_sample:
        raise ValueError("UNets with class/addition embeddings or centred input (SDXL, ...) have no ANE rewrite; "
                         "SD 1.x and 2.x UNets do")
    ctx, temb = "encoder_hidden_states", "temb"
    stages = [Stage("time", ("timestep",), temb, embed=TimeEmbeddingANE(unet.time_proj, unet.time_embedding)),
              Stage("conv", ("sample",), "conv_in", conv=same(unet.conv_in))]
    skips, x = ["conv_in"], "conv_in"

    def attention(block, j):
        attns = getattr(block, "attentions", None)
        return SpatialTransformerANE(attns[j]) if attns is not None else None

    for i, block in enumerate(unet.down_blocks):
        for j, resnet in enumerate(block.resnets):
            name = f"down{i}.{j}"
            stages.append(Stage("layer", (x, temb, ctx), name, resnet=ResnetBlockANE(resnet),
                                attention=attention(block, j)))
            skips.append(name)
            x = name
        for sampler in block.downsamplers or ():
            name = f"down{i}.ds"
            stages.append(Stage("conv", (x,), name, conv=Downsample(sampler)))
            skips.append(name)
            x = name
    mid = unet.mid_block
    stages.append(Stage("mid", (x, temb, ctx), "mid", resnet0=ResnetBlockANE(mid.resnets[0]),
                        attention=SpatialTransformerANE(mid.attentions[0]) if mid.attentions else None,
                        resnet1=ResnetBlockANE(mid.resnets[1])))
    x = "mid"
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            name = f"up{i}.{j}"
            stages.append(Stage("up_layer", (x, skips.pop(), temb, ctx), name, resnet=ResnetBlockANE(resnet),
                                attention=attention(block, j)))
            x = name
        for sampler in block.upsamplers or ():
            name = f"up{i}.us"
            stages.append(Stage("conv", (x,), name, conv=Upsample(sampler)))
            x = name
    stages.append(Stage("out", (x,), OUTPUT, norm=same(unet.conv_norm_out), conv=same(unet.conv_out)))
    return stages


class UNetANE(nn.Module):
    """The whole UNet: (sample, timestep, encoder_hidden_states (B, D, 1, 77)) -> noise_pred."""

    def __init__(self, stages: list[Stage]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    @classmethod
    def from_diffusers(cls, unet) -> "UNetANE":
        return cls(build_stages(unet)).eval()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        env = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        for stage in self.stages:
            env[stage.output] = stage(*(env[n] for n in stage.inputs))
        return env[OUTPUT]  # (B, 4, h, w)


def feature_name(tensor: str) -> str:
    """Core ML feature names are identifiers: `down0.1` -> `down0_1`."""
    return tensor.replace(".", "_")


class UNetChunk(nn.Module):
    """Stages [start, end) of the UNet as one graph: `inputs` -> `outputs` (names of tensors, in order).

    A pass-through output (a tensor this chunk reads only to hand on) is written as `<name>_c<k>`, because a
    Core ML feature cannot be both an input and an output of one model; `input_features` and
    `output_features` are the Core ML feature names of `inputs` and `outputs`.
    """

    def __init__(self, stages: list[Stage], inputs: list[str], outputs: list[str], input_features: list[str],
                 output_features: list[str]):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.inputs, self.outputs = inputs, outputs
        self.input_features, self.output_features = input_features, output_features

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = dict(zip(self.inputs, xs))
        produced = set()
        for stage in self.stages:
            env[stage.output] = stage(*(env[n] for n in stage.inputs))
            produced.add(stage.output)
        # A tensor handed on unchanged still needs an op of its own to be a distinct graph output.
        return tuple(env[n] if n in produced else env[n] * 1.0 for n in self.outputs)


def stage_bytes(stage: Stage, bytes_per_weight: float) -> int:
    return int(sum(p.numel() for p in stage.parameters()) * bytes_per_weight)


def plan_chunks(stages: list[Stage], bytes_per_weight: float, n: int | None = None,
                max_bytes: int = 1_000_000_000) -> list[tuple[int, int]]:
    """Stage ranges [start, end): `n` chunks with the largest as small as possible, or (n None) the fewest
    chunks under `max_bytes` of weights each. Weight size is what a chunk's weight file will hold."""
    sizes = [stage_bytes(s, bytes_per_weight) for s in stages]
    if n is None:
        too_big = [(s.output, b) for s, b in zip(stages, sizes) if b > max_bytes]
        if too_big:
            raise ValueError(f"UNet stage {too_big[0][0]} alone holds {too_big[0][1] / 1e6:.0f} MB of weights, over "
                             f"the {max_bytes / 1e6:.0f} MB chunk limit; use --split-unet N or a stronger compression")
        n = next(k for k in range(1, len(stages) + 1) if _min_max_partition(sizes, k)[0] <= max_bytes)
    if n > len(stages):
        raise ValueError(f"--split-unet {n}: this UNet has only {len(stages)} stages to cut between")
    return _min_max_partition(sizes, n)[1]


def _min_max_partition(sizes: list[int], n: int) -> tuple[int, list[tuple[int, int]]]:
    """Cut `sizes` into `n` non-empty contiguous runs minimising the largest run's sum (dynamic programming)."""
    m = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(n + 1)]  # best[k][i]: first i stages in k runs
    cut = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for i in range(k, m + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    ranges, i = [], m
    for k in range(n, 0, -1):
        ranges.append((cut[k][i], i))
        i = cut[k][i]
    return int(best[n][m]), ranges[::-1]


def make_chunks(stages: list[Stage], ranges: list[tuple[int, int]]) -> list[UNetChunk]:
    """The chunk modules for `ranges`, with the inputs and outputs Apple's chained Swift `Unet` can feed."""
    produced_in = {s.output: k for k, (a, b) in enumerate(ranges) for s in stages[a:b]}
    read_in: dict[str, set[int]] = {}
    for k, (a, b) in enumerate(ranges):
        for s in stages[a:b]:
            for name in s.inputs:
                read_in.setdefault(name, set()).add(k)
    chunks = []
    feature_of = {n: n for n in GRAPH_INPUTS}  # tensor -> the feature name that carries it now
    for k, (a, b) in enumerate(ranges):
        mine = {s.output for s in stages[a:b]}
        needs = [n for s in stages[a:b] for n in s.inputs if n not in mine]
        later = lambda name: any(r > k for r in read_in.get(name, ()))  # noqa: E731
        passing = [n for n, p in produced_in.items() if p < k and later(n)]  # handed on through this chunk
        inputs = list(dict.fromkeys(needs + passing))
        outputs = [s.output for s in stages[a:b] if later(s.output) or s.output == OUTPUT] + \
                  [n for n in passing if n not in mine]
        input_features = [feature_of[n] for n in inputs]
        for n in outputs:
            feature_of[n] = feature_name(n) if n not in inputs else f"{feature_name(n)}_c{k + 1}"
        chunks.append(UNetChunk(stages[a:b], inputs, outputs, input_features, [feature_of[n] for n in outputs]))
    return chunks
