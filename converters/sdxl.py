"""SDXL's graphs: two text encoders (penultimate hidden states; the second also gives the pooled embedding) and a
UNet that takes the pooled embedding and the size conditioning (`time_ids`) beside the text.

So that every stage of the runtime that passes the text conditioning along (guidance halves, batch-1 calls, UNet
chunks) carries the added conditions unchanged, they ride in the UNet's `encoder_hidden_states` as its last
CONDITION_ROWS rows: row -2 the pooled embedding, row -1 the time ids, each zero-padded to the context width.
The UNet graph slices them off before the first block (`XLUNet`); `edge.stages.text_xl` writes them.

The refiner is the same with the second text encoder only (its states are the whole text part) and time ids that
end in an aesthetic score; the bundle's family is `sdxl-refiner` (edge.refiner hands it the base's latents).
"""

from __future__ import annotations

import torch

from edge.converters.onnx_export import Spec, _some_masked, component_specs

CONDITION_ROWS = 2  # pooled text embedding, time ids
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' StableDiffusionXLImg2ImgPipeline defaults


def is_xl(pipe) -> bool:
    """Whether the pipeline is SDXL-shaped: a second text encoder and a UNet with text-and-time added conditions."""
    return getattr(pipe, "text_encoder_2", None) is not None and \
        getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


class PenultimateTextEncoder(torch.nn.Module):
    """CLIPTextModel -> its penultimate layer's hidden states (B, 77, D), as SDXL conditions on."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-2]


class PooledTextEncoder(torch.nn.Module):
    """CLIPTextModelWithProjection -> (penultimate hidden states (B, 77, D2), projected pooled embedding (B, P))."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class XLUNet(torch.nn.Module):
    """UNet2DConditionModel with text-and-time conditions, taking them as the context's last two rows."""

    def __init__(self, unet: torch.nn.Module, pooled: int, time_ids: int):
        super().__init__()
        self.unet, self.pooled, self.time_ids = unet, pooled, time_ids

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        text = encoder_hidden_states[:, :-CONDITION_ROWS]  # (B, L, D)
        added = {"text_embeds": encoder_hidden_states[:, -2, : self.pooled],  # (B, P)
                 "time_ids": encoder_hidden_states[:, -1, : self.time_ids]}  # (B, T)
        return self.unet(sample, timestep, text, added_cond_kwargs=added, return_dict=False)[0]


def is_refiner(pipe) -> bool:
    """SDXL's refiner: the second text encoder only, its states the whole context; aesthetic-score time ids."""
    return is_xl(pipe) and getattr(pipe, "text_encoder", None) is None


def family(pipe) -> str:
    return "sdxl-refiner" if is_refiner(pipe) else "sdxl"


def added_widths(pipe) -> tuple[int, int]:
    """(pooled embedding width, number of time ids): 6 ids for a base model (original size, crop, target size),
    5 for a refiner (with the aesthetic score); the UNet's added-embedding input is pooled + ids x time width."""
    cfg, pooled = pipe.unet.config, pipe.text_encoder_2.config.projection_dim
    ids, rest = divmod(cfg.projection_class_embeddings_input_dim - pooled, cfg.addition_time_embed_dim)
    if rest or ids not in (5, 6):
        raise ValueError(f"SDXL UNet added-embedding width {cfg.projection_class_embeddings_input_dim} with a pooled "
                         f"width of {pooled}: expected {pooled} + 5 or 6 time ids x {cfg.addition_time_embed_dim}")
    return pooled, ids


def xl_specs(pipe) -> list[Spec]:
    """The graphs of an SDXL bundle: text_encoder (not in a refiner), text_encoder_2, unet, and the VAE's (as SD's)."""
    refiner = is_refiner(pipe)
    te2, unet_cfg = pipe.text_encoder_2.config, pipe.unet.config
    te1 = te2 if refiner else pipe.text_encoder.config
    seq, context = te2.max_position_embeddings, unet_cfg.cross_attention_dim
    pooled, ids = added_widths(pipe)
    widths = [te2.hidden_size] if refiner else [te1.hidden_size, te2.hidden_size]
    if sum(widths) != context or pooled > context or ids > context:
        raise ValueError(f"SDXL text encoders of widths {' + '.join(map(str, widths))} and pooled width {pooled}; "
                         f"expected them to sum to / fit in the UNet's cross-attention width {context}")

    def f32(name, shape):
        return {"name": name, "dtype": "float32", "shape": shape}

    def token_inputs():
        return [{"name": "input_ids", "dtype": "int64", "shape": ["batch", seq]},
                {"name": "attention_mask", "dtype": "int64", "shape": ["batch", seq]}]

    def tokens(vocab):
        return lambda g, h, w: (torch.randint(0, vocab, (2, seq), generator=g), _some_masked(2, seq))

    def unet_example(g, h, w):
        cond = torch.randn(2, seq + CONDITION_ROWS, context, generator=g)
        cond[:, -1] = 0
        cond[:, -1, :ids] = torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0][:ids])  # sizes, as the runtime writes
        return torch.randn(2, unet_cfg.in_channels, h, w, generator=g), torch.rand(2, generator=g) * 999, cond

    sd = {s.name: s for s in component_specs(_with_text_encoder(pipe) if refiner else pipe)}
    first = [] if refiner else [
        Spec("text_encoder", PenultimateTextEncoder(pipe.text_encoder), token_inputs(),
             [f32("hidden_states", ["batch", seq, te1.hidden_size])], tokens(te1.vocab_size))]
    return first + [
        Spec("text_encoder_2", PooledTextEncoder(pipe.text_encoder_2), token_inputs(),
             [f32("hidden_states", ["batch", seq, te2.hidden_size]), f32("text_embeds", ["batch", pooled])],
             tokens(te2.vocab_size)),
        Spec("unet", XLUNet(pipe.unet, pooled, ids), sd["unet"].inputs, sd["unet"].outputs, unet_example),
        sd["vae_decoder"], sd["vae_encoder"],
    ]


def _with_text_encoder(pipe):
    """The refiner as SD's component_specs reads it (its UNet's and VAE's specs; the text encoder's is not kept)."""
    from types import SimpleNamespace

    return SimpleNamespace(text_encoder=pipe.text_encoder_2, unet=pipe.unet, vae=pipe.vae)


def unused_weights(pipe) -> dict[str, dict[str, dict]]:
    """Weights the graphs leave out because SDXL never reads them: the first text encoder's last layer (it
    conditions on the penultimate one). weights.json marks them `unused`, so that a LoRA touching them is applied
    as diffusers applies it (to no effect) instead of being reported as not matching the model."""
    if is_refiner(pipe):
        return {}
    last = pipe.text_encoder.config.num_hidden_layers - 1
    prefix = f"encoder.layers.{last}."
    names = [n + ".weight" for n, m in pipe.text_encoder.named_modules()  # transformers 5 has no text_model.
             if n.removeprefix("text_model.").startswith(prefix) and isinstance(m, torch.nn.Linear)]
    return {"text_encoder": {n: {"unused": True} for n in names}}


def conditioning_record(pipe) -> dict:
    """What the runtime needs to write the added conditions (the manifest's `conditioning`)."""
    pooled, ids = added_widths(pipe)
    scores = {"aesthetic_score": AESTHETIC_SCORE, "negative_aesthetic_score": NEGATIVE_AESTHETIC_SCORE}
    return {
        "kind": "sdxl",
        "encoders": ["text_encoder_2"] if is_refiner(pipe) else ["text_encoder", "text_encoder_2"],
        **(scores if ids == 5 else {}),  # the refiner's time ids end in one: 6 for the prompt, 2.5 for the negative
        "rows": CONDITION_ROWS,
        "pooled_dim": pooled,
        "time_ids": ids,
        "pad_token_2": str(pipe.tokenizer_2.pad_token),
        "pad_id_2": int(pipe.tokenizer_2.pad_token_id),
        "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
    }


UNSUPPORTED = {  # Options fields an SDXL conversion refuses so far, and why
    "controlnets": "SDXL ControlNets are not built yet",
    "deep_cache": "DeepCache's cut is made for SD 1.x/2.x UNets so far",
    "token_merging": "token merging is made for SD 1.x/2.x UNets so far",
    "loras": "fusing LoRAs into SDXL at convert time is not built yet; apply them at run time (edge generate --lora)",
}


def refusal(pipe, options) -> str | None:
    """Why this SDXL pipeline cannot be converted with these options (edge.converters.convert.Options), or None."""
    if not is_refiner(pipe) and pipe.tokenizer.get_vocab() != pipe.tokenizer_2.get_vocab():
        return "the SDXL model's two tokenizers have different vocabularies; edge expects CLIP's for both"
    for field, why in UNSUPPORTED.items():
        if getattr(options, field):
            return f"--{field.replace('_', '-').rstrip('s')} with an SDXL model: {why}"
    if "coreml" in options.targets:
        return "--target coreml with an SDXL model: Apple's TextEncoder2 / XL UNet layout is not built yet"
    if options.activations == "static":
        return "--activations static with an SDXL model: calibration with the added conditions is not built yet"
    return None
