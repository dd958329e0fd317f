"""LoRA files as low-rank weight changes, in numpy: read in the layouts people have, resolved against a model's
weight names, and turned into W + scale * alpha / rank * up @ down.

Layouts read (a .safetensors file; pickles are refused):
- diffusers / PEFT: `unet.<module>.lora_A.weight` + `lora_B.weight` (alpha in the file's `lora_adapter_metadata`,
  else alpha = rank), older `unet.<module>.lora.down.weight` + `lora.up.weight`, the attention-processor form
  `...attn1.processor.to_q_lora.down.weight`, `text_encoder.<module>...` for the text encoder;
- kohya / A1111: `lora_unet_<module with _>.lora_down.weight` + `.lora_up.weight` + `.alpha`, `lora_te_...` for
  the text encoder (`lora_te1_` / `lora_te2_`: SDXL's two).
A down weight of shape (rank, in, kh, kw) with an up of (out, rank, 1, 1) is LoRA on a convolution (LoCon).

`module` names are the diffusers model's own (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
`text_model.encoder.layers.0.self_attn.q_proj`); each layer changes the weight `module + ".weight"`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.bundle import sha256_file
from edge.weights_io import WeightsError, read_safetensors

# the file's component prefix -> the bundle component it changes
PEFT_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
UNSUPPORTED = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lora_magnitude_vector": "DoRA", "lora_mid": "LoCon with a "
               "Tucker mid weight", "diff_b": "a full bias difference", ".diff": "a full weight difference"}
SCALE_RULE = "a finite number"


class LoraError(ValueError):
    """A LoRA file that cannot be applied: which file, and why."""


@dataclass(frozen=True)
class Layer:
    """One low-rank change: weight += scale * (alpha / rank) * up @ down."""

    component: str
    module: str  # the LoRA's own name for the module, as written in the file (resolved later)
    kohya: bool  # the name has "_" for "." (kohya), to be looked up among the model's module names
    down: np.ndarray  # (rank, in) or (rank, in, kh, kw)
    up: np.ndarray  # (out, rank) or (out, rank, 1, 1)
    alpha: float
    file: str = ""  # the LoRA file's name, for errors

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """alpha / rank * up @ down, shaped as the weight it changes (`shape`, torch's layout)."""
        up = self.up.reshape(self.up.shape[0], -1).astype(np.float32)
        down = self.down.reshape(self.rank, -1).astype(np.float32)
        d = (self.alpha / self.rank) * (up @ down)
        if d.size != math.prod(shape):
            raise LoraError(f"LoRA {self.file} layer {self.module}: its change has shape {list(d.shape)}, the model's weight "
                            f"{list(shape)}; is this LoRA for another model?")
        return d.reshape(shape)


@dataclass(frozen=True)
class LoraFile:
    path: Path
    sha256: str
    layers: tuple[Layer, ...]

    @property
    def name(self) -> str:
        return self.path.stem


def parse_scale(value: object, what: str) -> float:
    """A LoRA scale: a finite number (negative allowed: it subtracts the LoRA)."""
    try:
        scale = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LoraError(f"{what}: scale {value!r} is not a number; expected {SCALE_RULE}") from None
    if isinstance(value, bool) or not math.isfinite(scale):
        raise LoraError(f"{what}: scale {value!r} is not {SCALE_RULE}")
    return scale


def read_lora(path: Path | str) -> LoraFile:
    """Every layer of a LoRA file, in whichever of the layouts above it is written."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    try:
        tensors, metadata = read_safetensors(path)
    except WeightsError as e:
        raise LoraError(str(e)) from None
    for key in tensors:
        for marker, kind in UNSUPPORTED.items():
            if marker in key:
                raise LoraError(f"{path}: {kind} weights ({key}) are not LoRA up/down pairs; edge reads LoRA and "
                                "LoCon (lora_down/lora_up, lora_A/lora_B)")
    alphas = _metadata_alphas(metadata)
    groups: dict[tuple[str, str, bool], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            raise LoraError(f"{path}: key {key!r} is not a LoRA weight in a layout edge reads (diffusers/PEFT "
                            "unet.….lora_A.weight, kohya lora_unet_….lora_down.weight)")
        component, module, kohya, part = parsed
        groups.setdefault((component, module, kohya), {})[part] = value
    layers = []
    for (component, module, kohya), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            have = ", ".join(sorted(parts))
            raise LoraError(f"{path}: layer {module} has {have} but not both its down and up weights")
        down, up = parts["down"], parts["up"]
        if up.shape[1] != down.shape[0]:
            raise LoraError(f"{path}: layer {module}: up {list(up.shape)} and down {list(down.shape)} disagree on "
                            "the rank")
        alpha = float(parts["alpha"].reshape(-1)[0]) if "alpha" in parts else alphas.get(component, down.shape[0])
        layers.append(Layer(component, module, kohya, down, up, alpha, path.name))
    if not layers:
        raise LoraError(f"{path} holds no LoRA weights")
    return LoraFile(path, sha256_file(path), tuple(layers))


PEFT_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                 (".lora.up.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))
PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


def _parse_key(key: str) -> tuple[str, str, bool, str] | None:
    """(component, module, kohya-style name, down|up|alpha) of one tensor name, or None."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            module, _, part = key[len(prefix):].partition(".")
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
            return (component, module, True, part) if part else None
    name = key.removeprefix("base_model.model.")
    head, _, rest = name.partition(".")
    component = PEFT_PREFIXES.get(head)
    if component is None:
        component, rest = "unet", name  # a PEFT save of the UNet alone
    for suffix, part in PEFT_SUFFIXES:
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            module = PROCESSOR.sub(lambda m: "." + (m[1] if m[1] != "to_out" else "to_out.0"), module)
            return component, module, False, part
    return None


def _metadata_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """component -> lora_alpha from diffusers' `lora_adapter_metadata` (PEFT's LoraConfig, per component)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError:
        return {}
    return {key.rsplit(".", 1)[0]: float(v) for key, v in packed.items()
            if key.endswith(".lora_alpha") and isinstance(v, (int, float))}



@dataclass(frozen=True)
class Resolved:
    """A LoRA's layers matched to a model's weights: (component, weight name) -> layers, and what matched nothing."""

    changes: dict[tuple[str, str], list[tuple[Layer, float]]]
    unmatched: list[str]


def resolve(loras: list[tuple[LoraFile, float]], weights: dict[str, set[str]],
            strict_partial: bool = False, warn=None) -> Resolved:
    """Match each LoRA's layers to the model's weight names (`weights`: component -> names such as
    `down_blocks.0.resnets.0.conv1.weight`). A LoRA that matches nothing is refused (wrong model); one that matches
    only partly is refused with `strict_partial`, else reported through `warn` with the counts."""
    dotted = {c: {_canonical(c, n.removesuffix(".weight")): n for n in names} for c, names in weights.items()}
    underscored = {c: {k.replace(".", "_"): n for k, n in table.items()} for c, table in dotted.items()}
    changes: dict[tuple[str, str], list[tuple[Layer, float]]] = {}
    unmatched_all = []
    for lora, scale in loras:
        unmatched = []
        for layer in lora.layers:
            table = (underscored if layer.kohya else dotted).get(layer.component, {})
            target = table.get(_canonical(layer.component, layer.module))
            if target is None:
                unmatched.append(f"{layer.component}:{layer.module}")
                continue
            changes.setdefault((layer.component, target), []).append((layer, scale))
        if len(unmatched) == len(lora.layers):
            raise LoraError(f"LoRA {lora.path.name}: none of its {len(lora.layers)} layers matches a weight of this "
                            f"model (e.g. {unmatched[0]}); is it for another architecture (SD 1.x, SD 2.x, SDXL)?")
        if unmatched:
            message = (f"LoRA {lora.path.name}: {len(unmatched)} of its {len(lora.layers)} layers match no weight of "
                       f"this model and are not applied (e.g. {unmatched[0]})")
            if strict_partial:
                raise LoraError(message)
            if warn is not None:
                warn(message)
        unmatched_all += unmatched
    return Resolved(changes, unmatched_all)


def _canonical(component: str, module: str) -> str:
    """One name for a text encoder module with or without transformers' older `text_model.` nesting (LoRA files
    keep it; transformers 5 dropped it)."""
    if component.startswith("text_encoder"):
        return module.removeprefix("text_model.").removeprefix("text_model_")
    return module


def apply_changes(base: np.ndarray, changes: list[tuple[Layer, float]], transposed: bool) -> np.ndarray:
    """base + sum of scale * delta, in base's dtype; `transposed`: base is stored (in, out) as ONNX MatMul keeps a
    Linear weight."""
    shape = base.shape[::-1] if transposed else base.shape
    total = np.zeros(shape, np.float32)
    for layer, scale in changes:
        total += scale * layer.delta(shape)
    if transposed:
        total = total.T
    return (base.astype(np.float32) + total).astype(base.dtype)
