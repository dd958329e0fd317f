"""A UNet exported in pieces: for models whose whole UNet does not fit in memory while it is exported (SDXL's is
10.3 GB at fp32, and the exporter holds about three copies), each piece is its own torch module and its own ONNX
graph, exported, checked against torch and freed before the next; the pieces are the UNet's chunks in the bundle,
as a split UNet's are (edge.stages.denoise runs them in order, each reading what earlier ones made).

The UNet's forward is cut into stages, each one layer of diffusers' UNet2DConditionModel.forward: `pre` (time and
added embeddings, conv_in), every ResNet / attention / resampler of the down blocks, of the mid block and of the up
blocks (an up-block ResNet takes the skip connection it reads), and `post` (norm, act, conv_out). Pieces are runs of
consecutive stages, cut so that each holds at most `max_bytes` of fp32 weights. What crosses a cut is named: `emb`
(time embedding), `context` (the text states) and `h_<stage>` (the hidden states after a stage; the skip
connections are the down path's, kept until the up-block ResNet that reads them).

The inputs each piece is exported and checked on come from the torch UNet itself, run once, stage by stage, on the
whole UNet's example inputs before any piece is exported: every piece is checked on what it will be given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from edge.converters.onnx_export import Spec

Env = dict[str, torch.Tensor]
PIECE = "unet_piece"  # the pieces' component names while they are exported: unet_piece0, unet_piece1, ...


@dataclass
class Stage:
    name: str
    modules: list[torch.nn.Module]  # whose weights it holds
    run: Callable[[Env], None]  # reads and writes names in the env
    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)

    def bytes(self) -> int:
        return 4 * sum(p.numel() for m in self.modules for p in m.parameters())


def stages(unet, added: tuple[int, int] | None) -> list[Stage]:
    """The UNet's forward as stages; `added` (pooled width, time ids): an SDXL UNet taking them as the context's
    last two rows (converters/sdxl.py), else None."""
    out: list[Stage] = []
    h = "sample"  # the name of the current hidden states
    skips: list[str] = []

    def add(name, modules, run, reads, writes):
        out.append(Stage(name, [m for m in modules if m is not None], run, reads, writes))

    def pre(env: Env) -> None:
        states = env["encoder_hidden_states"]
        extra = {}
        if added is not None:
            pooled, ids = added
            extra = {"text_embeds": states[:, -2, :pooled], "time_ids": states[:, -1, :ids]}
            states = states[:, :-2]
        emb = unet.time_embedding(unet.get_time_embed(sample=env["sample"], timestep=env["timestep"]), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=states, added_cond_kwargs=extra)
        emb = emb + aug if aug is not None else emb
        env["emb"] = unet.time_embed_act(emb) if unet.time_embed_act is not None else emb
        env["context"] = states
        env["h_pre"] = unet.conv_in(env["sample"])

    add("pre", [unet.time_embedding, getattr(unet, "add_embedding", None), unet.conv_in], pre,
        ["sample", "timestep", "encoder_hidden_states"], ["emb", "context", "h_pre"])
    h, skips = "h_pre", ["h_pre"]  # the skip connections: hidden states the up blocks read again

    def resnet(module, src, dst, skip=None):
        def run(env):
            x = env[src] if skip is None else torch.cat([env[src], env[skip]], dim=1)
            env[dst] = module(x, env["emb"])
        return run

    def attention(module, src, dst):
        def run(env):
            env[dst] = module(env[src], encoder_hidden_states=env["context"], return_dict=False)[0]
        return run

    def plain(module, src, dst, **kwargs):
        def run(env):
            env[dst] = module(env[src], **kwargs)
        return run

    for b, block in enumerate(unet.down_blocks):
        attns = list(getattr(block, "attentions", None) or [None] * len(block.resnets))
        for j, (res, attn) in enumerate(zip(block.resnets, attns)):
            name = f"down{b}.res{j}"
            add(name, [res], resnet(res, h, f"h_{name}"), [h, "emb"], [f"h_{name}"])
            h = f"h_{name}"
            if attn is not None:
                name = f"down{b}.attn{j}"
                add(name, [attn], attention(attn, h, f"h_{name}"), [h, "context"], [f"h_{name}"])
                h = f"h_{name}"
            skips.append(h)
        for k, down in enumerate(block.downsamplers or []):
            name = f"down{b}.down{k}"
            add(name, [down], plain(down, h, f"h_{name}"), [h], [f"h_{name}"])
            h = f"h_{name}"
            skips.append(h)

    mid = unet.mid_block
    if mid is not None:
        add("mid.res0", [mid.resnets[0]], resnet(mid.resnets[0], h, "h_mid.res0"), [h, "emb"], ["h_mid.res0"])
        h = "h_mid.res0"
        for j, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):
            add(f"mid.attn{j}", [attn], attention(attn, h, f"h_mid.attn{j}"), [h, "context"], [f"h_mid.attn{j}"])
            h = f"h_mid.attn{j}"
            add(f"mid.res{j + 1}", [res], resnet(res, h, f"h_mid.res{j + 1}"), [h, "emb"], [f"h_mid.res{j + 1}"])
            h = f"h_mid.res{j + 1}"

    for b, block in enumerate(unet.up_blocks):
        attns = list(getattr(block, "attentions", None) or [None] * len(block.resnets))
        for j, (res, attn) in enumerate(zip(block.resnets, attns)):
            skip = skips.pop()
            name = f"up{b}.res{j}"
            add(name, [res], resnet(res, h, f"h_{name}", skip), [h, skip, "emb"], [f"h_{name}"])
            h = f"h_{name}"
            if attn is not None:
                name = f"up{b}.attn{j}"
                add(name, [attn], attention(attn, h, f"h_{name}"), [h, "context"], [f"h_{name}"])
                h = f"h_{name}"
        for k, up in enumerate(block.upsamplers or []):
            name = f"up{b}.up{k}"
            add(name, [up], plain(up, h, f"h_{name}", output_size=None), [h], [f"h_{name}"])
            h = f"h_{name}"

    def post(env: Env) -> None:
        x = env[h]
        if unet.conv_norm_out is not None:
            x = unet.conv_act(unet.conv_norm_out(x))
        env["noise_pred"] = unet.conv_out(x)

    add("post", [unet.conv_norm_out, unet.conv_out], post, [h], ["noise_pred"])
    return out


class Piece(torch.nn.Module):
    """Consecutive stages as one module: positional `inputs` in, `outputs` out."""

    def __init__(self, run: list[Stage], inputs: list[str], outputs: list[str]):
        super().__init__()
        self.stages, self.input_names, self.output_names = run, inputs, outputs
        self.held = torch.nn.ModuleList([m for s in run for m in s.modules])  # named_parameters: its weights

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = dict(zip(self.input_names, args))
        for stage in self.stages:
            stage.run(env)
        return tuple(env[n] for n in self.output_names)


def group(all_stages: list[Stage], max_bytes: int) -> list[list[Stage]]:
    """Consecutive stages packed into pieces of at most `max_bytes` of weights (a larger stage alone)."""
    pieces: list[list[Stage]] = [[]]
    size = 0
    for stage in all_stages:
        b = stage.bytes()
        if pieces[-1] and size + b > max_bytes:
            pieces.append([])
            size = 0
        pieces[-1].append(stage)
        size += b
    return pieces


def piece_specs(unet_spec: Spec, unet, added: tuple[int, int] | None, max_bytes: int,
                sizes: list[tuple[int, int]], seed: int = 0) -> list[Spec]:
    """The UNet's pieces as Specs ("unet_piece0", ...), each with the inputs the torch UNet gives it at each of
    `sizes` (latent height, width): run here, once, before any piece is exported and freed."""
    all_stages = stages(unet, added)
    pieces = group(all_stages, max_bytes)
    later_reads: list[set[str]] = []
    seen: set[str] = {"noise_pred"}
    for run in reversed(pieces):
        later_reads.insert(0, set(seen))
        seen |= {r for s in run for r in s.reads}
    examples: dict[tuple[int, int], Env] = {}
    for hw in sizes:  # the whole chain in torch, at each size
        env = dict(zip([t["name"] for t in unet_spec.inputs], unet_spec.example(torch.Generator().manual_seed(seed),
                                                                                 *hw)))
        with torch.no_grad():
            for stage in all_stages:
                stage.run(env)
        examples[hw] = env
    shapes = _named_shapes(examples[sizes[0]], unet_spec)
    specs = []
    for k, (run, wanted) in enumerate(zip(pieces, later_reads)):
        made = [w for s in run for w in s.writes]
        inputs = list(dict.fromkeys(r for s in run for r in s.reads if r not in made))
        outputs = [w for w in dict.fromkeys(made) if w in wanted]
        module = Piece(run, inputs, outputs)

        def example(g, h, w, names=inputs):
            return tuple(examples[(h, w)][n] for n in names)

        specs.append(Spec(f"{PIECE}{k}", module, [shapes[n] for n in inputs], [shapes[n] for n in outputs],
                          example))
    return specs


def _named_shapes(env: Env, unet_spec: Spec) -> dict[str, dict]:
    """{name: {name, dtype, shape}} with the UNet's dynamic axes: batch, the context's length, and each 4-D tensor's
    height and width named by its stride from the latent (height_2: half the latent's)."""
    given = {t["name"]: t for t in unet_spec.inputs + unet_spec.outputs}
    latent_h = env["sample"].shape[2]
    out = {}
    for name, x in env.items():
        if name in given:
            out[name] = given[name]
            continue
        shape: list = ["batch", *x.shape[1:]]
        if x.ndim == 4:
            s = latent_h // x.shape[2]
            shape[2:] = ["height" if s == 1 else f"height_{s}", "width" if s == 1 else f"width_{s}"]
        elif x.ndim == 3:  # the context: (batch, tokens, width)
            shape[1] = "context"
        out[name] = {"name": name, "dtype": "float32", "shape": shape}
    return out


def merge_pieces(components: dict[str, dict], unet_spec: Spec) -> dict[str, dict]:
    """The exported pieces' records as one "unet" component whose chunks they are (in the pieces' place), its
    parity and precision the worst of theirs; each piece's own record stays in `pieces`."""
    names = [n for n in components if n.startswith(PIECE)]
    parts = [components[n] for n in names]
    chunks = [{"file": p["file"], "files": list(p["files"]), "inputs": p["inputs"], "outputs": p["outputs"],
               "graph_outputs": [t["name"] for t in p["outputs"] if t["name"] == "noise_pred"],
               "weight_bytes": p["bytes"]} for p in parts]
    worst = min(parts, key=lambda p: p["parity"]["psnr_db"])["parity"]
    lowered = [p for p in parts if p["quantization"]]
    quantization = {} if not lowered else {
        **lowered[0]["quantization"],
        "psnr_vs_fp32_db": min(p["quantization"]["psnr_vs_fp32_db"] for p in lowered),
        "psnr_inputs": "each piece on the torch UNet's own intermediate states",
        "kept_fp32_groups": [g for p in lowered for g in p["quantization"]["kept_fp32_groups"]],
        "files": [f for p in lowered for f in p["quantization"]["files"]],
    }
    precisions = {p["precision"] for p in parts}
    unet = {
        "file": chunks[0]["file"],
        "files": {f: h for p in parts for f, h in p["files"].items()},
        "bytes": sum(p["bytes"] for p in parts),
        "parameters": sum(p["parameters"] for p in parts),
        "inputs": unet_spec.inputs,
        "outputs": unet_spec.outputs,
        "parity": {**worst, "reference": "torch, piece by piece (the worst piece)"},
        "attention": parts[0]["attention"],
        "precision": max(precisions, key=len),  # "int8+fp32" over "int8" where a piece kept layers at fp32
        "quantization": quantization,
        "chunks": chunks,
        "pieces": [{"file": p["file"], "parity": p["parity"], "quantization": p["quantization"]} for p in parts],
    }
    out: dict[str, dict] = {}
    for name, record in components.items():
        if name == names[0]:
            out["unet"] = unet
        elif name not in names:
            out[name] = record
    return out
