"""LoRA files for the tests, written as people get them: diffusers/PEFT (`save_lora_weights` of PEFT adapters)
and kohya/A1111 (`lora_unet_…_lora_down.weight`, `.alpha`), on a tiny model's UNet (attention and convolutions:
LoCon) and text encoder. Random, non-zero up weights, so every layer changes the picture."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _lora_state(model, targets: list[str], rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    """lora_A / lora_B weights (PEFT's names) for every Linear / Conv2d of `model` whose name ends in one of
    `targets`, random: A (rank, in[, kh, kw]), B (out, rank[, 1, 1])."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not any(
                name == t or name.endswith("." + t) for t in targets):
            continue
        conv = isinstance(m, torch.nn.Conv2d)
        a_shape = (rank, m.in_channels, *m.kernel_size) if conv else (rank, m.in_features)
        b_shape = (m.out_channels, rank, 1, 1) if conv else (m.out_features, rank)
        state[f"{name}.lora_A.weight"] = torch.randn(a_shape, generator=g) * 0.3
        state[f"{name}.lora_B.weight"] = torch.randn(b_shape, generator=g) * 0.3
    return state


def write_diffusers_lora(pipe, path: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                         text_encoder: bool = True) -> Path:
    """pytorch_lora_weights.safetensors as diffusers' save_lora_weights writes it (alpha in its metadata)."""
    from diffusers import StableDiffusionPipeline

    unet = _lora_state(pipe.unet, UNET_TARGETS, rank, alpha, seed)
    te = _lora_state(pipe.text_encoder, TEXT_TARGETS, rank, alpha, seed + 1) if text_encoder else None
    def meta(state):  # what diffusers writes: the adapter's LoraConfig
        modules = sorted({k.rpartition(".lora_")[0] for k in state})
        return {"r": rank, "lora_alpha": alpha, "target_modules": modules}

    path.mkdir(parents=True, exist_ok=True)
    layers = {"unet_lora_layers": unet, "text_encoder_lora_layers": te, "unet_lora_adapter_metadata": meta(unet),
              "text_encoder_lora_adapter_metadata": meta(te) if te else None}
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: its second text encoder too
        from diffusers import StableDiffusionXLPipeline as StableDiffusionPipeline  # noqa: F811

        te2 = _lora_state(pipe.text_encoder_2, TEXT_TARGETS, rank, alpha, seed + 2) if text_encoder else None
        layers |= {"text_encoder_2_lora_layers": te2, "text_encoder_2_lora_adapter_metadata": meta(te2) if te2 else None}
    StableDiffusionPipeline.save_lora_weights(path, **layers)
    return path / "pytorch_lora_weights.safetensors"


def write_kohya_lora(pipe, path: Path, *, rank: int = 4, alpha: float = 2.0, seed: int = 10,
                     text_encoder: bool = True) -> Path:
    """The same kind of LoRA in kohya's layout: lora_unet_<module with _>.lora_down/.lora_up/.alpha, the text
    encoder as lora_te_text_model_…"""
    from safetensors.torch import save_file

    out = {}
    parts = [("lora_unet_", "", _lora_state(pipe.unet, UNET_TARGETS, rank, alpha, seed))]
    xl = getattr(pipe, "text_encoder_2", None) is not None  # SDXL: lora_te1_ / lora_te2_
    if text_encoder:
        parts.append(("lora_te1_" if xl else "lora_te_", "text_model.",
                      _lora_state(pipe.text_encoder, TEXT_TARGETS, rank, alpha, seed + 1)))
    if text_encoder and xl:
        parts.append(("lora_te2_", "text_model.", _lora_state(pipe.text_encoder_2, TEXT_TARGETS, rank, alpha, seed + 2)))
    for prefix, nest, state in parts:
        for key, value in state.items():
            module, _, part = key.rpartition(".lora_")
            module = (nest + module.removeprefix(nest)).replace(".", "_")
            kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[part]
            out[f"{prefix}{module}.{kind}"] = value
            out[f"{prefix}{module}.alpha"] = torch.tensor(float(alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return path
