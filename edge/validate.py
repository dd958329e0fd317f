"""Argument checks shared by the library and the CLI, so both refuse a bad value with the same sentence.

A NaN guidance or a negative seed does not fail where it is passed: it comes out later as a black image
or a numpy error that names neither. Each check here names the value and what is accepted.
"""

from __future__ import annotations

import math
from argparse import ArgumentTypeError
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

# Token merging (converters/tome.py): one destination token per 2x2 window, so at most 3 tokens of 4 can merge.
TOKEN_MERGING_MAX = 0.75
TOKEN_MERGING_RULE = (f"a ratio > 0 and <= {TOKEN_MERGING_MAX:g} (the fraction of tokens merged; one destination "
                      "per 2x2 window)")

FLOAT32_MAX = 3.4028234663852886e38  # the runtime computes in float32: beyond this a "finite" float is inf
GUIDANCE_RULE = "a finite number >= 0 (<= 1 skips the unconditional pass)"


def finite_number(name: str, value: object, *, minimum: float | None = None, above: float | None = None,
                  maximum: float | None = None, rule: str | None = None, typed: str | None = None) -> float:
    """`value` as a float if it is a real, finite (in float32) number within the bounds; else a ValueError
    (`typed`: the text the value was parsed from, shown in the message instead of the value)."""
    ok = isinstance(value, Real) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    ok = ok and math.isfinite(v) and abs(v) <= FLOAT32_MAX
    ok = ok and (minimum is None or v >= minimum) and (above is None or v > above) and (maximum is None or v <= maximum)
    if not ok:
        beyond = " (beyond float32, which the runtime computes in)" if math.isfinite(v) and abs(v) > FLOAT32_MAX else ""
        raise ValueError(f"{name} must be {rule or _number_rule(minimum, above, maximum)}, got "
                         f"{_shown(value) if typed is None else _typed(typed)}{beyond}")
    return v


def whole_number(name: str, value: object, *, minimum: int = 1, maximum: int | None = None,
                 typed: str | None = None) -> int:
    """`value` as an int if it is a whole number (not a bool, not 2.0) within the bounds; else a ValueError."""
    ok = isinstance(value, Integral) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        shown = _shown(value) if typed is None else _typed(typed)
        raise ValueError(f"{name} must be a whole number {bounds}, got {shown}")
    return int(value)


def check_generate(guidance: object, seed: object) -> tuple[float, int]:
    """Pipeline.generate's guidance and seed, checked: NaN or inf guidance would silently write a black image,
    and numpy's own message for a negative seed names no argument."""
    return finite_number("guidance", guidance, rule=GUIDANCE_RULE, minimum=0.0), whole_number("seed", seed, minimum=0)


def check_decoder(manifest: Any, decoder: object) -> str:
    """"full" (the VAE decoder) or "tiny" (the tiny autoencoder), which only bundles converted with one have."""
    if decoder not in ("full", "tiny"):
        raise ValueError(f"decoder must be 'full' or 'tiny', got {_shown(decoder)}")
    if decoder == "tiny" and "tiny_vae_decoder" not in manifest.components:
        raise ValueError("decoder 'tiny': this bundle has no tiny autoencoder; re-convert it with --tiny-vae DIR "
                         "(a diffusers AutoencoderTiny folder such as TAESD's), or decode with 'full'")
    return decoder


def check_cache_interval(manifest: Any, interval: object) -> int:
    """DeepCache's interval: 1 (every step runs the whole UNet), or N > 1 on a bundle cut for it."""
    n = whole_number("cache_interval", interval, minimum=1)
    if n > 1 and not manifest.components["unet"].deep_cache:
        raise ValueError(f"cache_interval {n}: this bundle's UNet is not cut for DeepCache; re-convert it with "
                         "--deep-cache, or use cache_interval 1")
    return n


# Command-line forms: argparse `type=` functions, so a bad value is a parse error (exit 2) naming the flag.

def count_arg(flag: str, minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number within bounds, else a parse error naming the flag, the text and the range."""
    return _arg(int, whole_number, flag, minimum=minimum, maximum=maximum)


def number_arg(flag: str, minimum: float | None = None, above: float | None = None, maximum: float | None = None,
               rule: str | None = None) -> Callable[[str], float]:
    """argparse type: a finite float within bounds (nan, inf and 1e400 are refused), else a parse error."""
    return _arg(float, finite_number, flag, minimum=minimum, above=above, maximum=maximum, rule=rule)


def _arg(convert: Callable[[str], Any], check: Callable[..., Any], flag: str, **bounds: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value: object = convert(text)
        except ValueError:
            value = text  # not a number at all: `check` refuses it, quoting the text
        try:
            return check(flag, value, typed=text, **bounds)
        except ValueError as e:
            raise ArgumentTypeError(str(e)) from None
    return parse


def _number_rule(minimum: float | None, above: float | None, maximum: float | None) -> str:
    bounds = [f"{op} {b:g}" for op, b in ((">=", minimum), (">", above), ("<=", maximum)) if b is not None]
    return " ".join(["a finite number", " and ".join(bounds)]).strip()


def _shown(value: object) -> str:
    """A number as Python prints it (nan, inf, -1, 2.0); anything else quoted, so '7' is not mistaken for 7."""
    return f"{value}" if isinstance(value, Real) and not isinstance(value, bool) else repr(value)


def _typed(text: str) -> str:
    """Command-line text as typed: bare, unless empty or padded with spaces."""
    return text if text and text.strip() == text else repr(text)


def split_suffix(text: str) -> tuple[str, str | None]:
    """`PATH[:SUFFIX]` (--lora FILE:SCALE, --embedding FILE:TOKEN, --controlnet DIR:NAME) -> (PATH, SUFFIX or None):
    what follows the last colon, unless it is part of the path (it holds a slash or a file extension)."""
    path, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail or tail.lower().endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        return text, None
    return path, tail


def lora_arg(text: str) -> tuple[str, float]:
    """argparse type for `--lora FILE[:SCALE]` (scale 1 when left out): a finite scale, else a parse error."""
    import argparse
    import math

    path, tail = split_suffix(text)
    tail = "1" if tail is None else tail
    try:
        scale = float(tail)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora {text!r}: scale {tail!r} is not a number; expected FILE[:SCALE] "
                                         "with SCALE a finite number (e.g. style.safetensors:0.8)") from None
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"--lora {text!r}: scale {tail!r} is not a finite number")
    return path, scale
