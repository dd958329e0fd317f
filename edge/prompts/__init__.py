"""Prompt weighting and long prompts: what `(red:1.3)` or `red++` does to the text conditioning.

    cond = encode_weighted("a (red:1.3) circle", tokenizer, encode)             # (1, 77, D)
    cond, uncond = encode_pair(prompt, negative, tokenizer, encode)             # same length, ready for CFG

`encode(ids)` runs the text encoder on (1, 77) int64 ids and returns its last hidden state (1, 77, D) float32,
e.g. `lambda ids: session.run(None, {"input_ids": ids})[0]`. Everything here is numpy on top of it.

Syntaxes (`syntax=`):
- "a1111" - AUTOMATIC1111's: `(word)` x1.1, `[word]` /1.1, `(word:1.3)`, nesting multiplies, `\\(` `\\)` `\\[` `\\]`
  are the characters, `BREAK` starts a new window. Weights by A1111's rule (scale each token's hidden state,
  restore the window's mean). Refused: prompt editing `[a:b:0.5]`, `[a|b]`, `<lora:...>`, composable `AND`.
- "compel" - compel's: `word+` `word++` `word-` `word--` (x1.1 / x0.9 per sign), `(words)1.3` `(words)+`
  `"words"0.8`, `words.attend(1.2)`, nesting, `("a", "b").and(1, 0.5)`, `("a", "b").blend(0.7, 0.3)`
  (`no_normalize` last to skip normalising). Weights by compel's rule for SD 1.x (see weighting.py). Refused:
  `.swap()`, `withLora()`.
- "none" - the text as it is: no weights, as diffusers encodes it (but long prompts are windowed, not cut).
- "auto" (the default) - compel when the prompt uses a construct only compel has (`word+`/`word-` or runs of
  them before a space, punctuation or the end, `word++`/`word--` anywhere, `+`, `-` or a number right after
  `)` or a closing `"`, `.and(`, `.add(`, `.blend(`, `.attend(`); else A1111 when it has `(`, `)`, `[`, `]` or
  `BREAK`, escaped or not (so `(word)` means x1.1, as in A1111, not literal brackets); else "none". One with
  both compel-only and A1111-only constructs (`(x:1.2)`, `[x]`, BREAK) is refused: pass the syntax.
Broken syntax - an unclosed or stray bracket or quote, a weight that is not a number - raises PromptError (a
ValueError) naming the column and what was expected, where A1111 and compel would quietly read it as text.

Long prompts: each token sequence is cut into windows of at most 75 tokens, each encoded as BOS + window +
EOS + padding, and the outputs concatenated, as A1111 and compel (truncate_long_prompts=False) do; where each
tool cuts is described in windows.py. `max_windows` caps the windows of each sequence (a warning says how many
tokens were dropped); None keeps them all. compel's default down-weighting masks the fragment's tokens out of
attention, so it needs `encode_masked(ids, mask)`; with an encoder that takes ids only, pass
downweight="remove" (compel's DownweightMode.REMOVE: re-encode the prompt without the fragment).
A conditioning of 77k positions (k windows, or the parts of an `.and()`) needs a UNet graph whose
encoder_hidden_states sequence axis is not fixed at 77; with one that is, pass max_windows=1 and avoid `.and()`.
"""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np

from ..tokenizer import ClipTokenizer
from .parse_a1111 import parse_a1111
from .parse_compel import parse_compel
from .parsed import BREAK, Blend, Fragment, Fragments, ParsedPrompt, PromptError
from .weighting import (DOWNWEIGHTS, Encoder, MaskedTextEncoder, TextEncoder, a1111_conditioning,
                        compel_conditioning, compel_sequence, pad_to_same_length, plain_conditioning)
from .windows import POLICIES, WINDOW, Windows, lay_out, tokenize

__all__ = ["encode_weighted", "encode_pair", "encode_empty", "pad_to_same_length", "parse_prompt",
           "detect_syntax", "ParsedPrompt", "Fragment", "Blend", "BREAK", "PromptError", "SYNTAXES"]

SYNTAXES = ("auto", "a1111", "compel", "none")
_ESCAPE = re.compile(r"\\.")
_COMPEL_ONLY = [
    (re.compile(r"[)\"]\s*\.(?:and|add|blend|attend)\s*\(|\w\.attend\s*\("), "an operator like .and()"),
    (re.compile(r"(?:\)|[^\s(]\")(?:[+-]|\.?\d)"), "a weight after (...) or \"...\""),
    (re.compile(r"\w(?:\+\+|--)|\w[+-]+(?=[\s,.;:!?)\"]|$)"), "word+ or word-"),
]
_A1111_ONLY = [
    (re.compile(r":\s*[+-]?[.\d]+\s*\)"), "(word:weight)"),
    (re.compile(r"[\[\]]"), "[word]"),
    (re.compile(r"\bBREAK\b"), "BREAK"),
]


def detect_syntax(prompt: str) -> str:
    """"compel", "a1111" or "none", by the rule in this module's docstring."""
    s = _ESCAPE.sub("\0\0", prompt)  # escaped characters mark nothing; keeps columns
    compel = _first(_COMPEL_ONLY, s)
    a1111 = _first(_A1111_ONLY, s)
    if compel and a1111:
        raise PromptError(prompt, a1111[0], f"mixes A1111 syntax ({a1111[1]}, here) with compel syntax "
                                            f"({compel[1]}, column {compel[0] + 1}); pass syntax='a1111' or "
                                            "syntax='compel'")
    if compel:
        return "compel"
    return "a1111" if a1111 or re.search(r"[()]", prompt) else "none"  # escaped brackets too: \( is A1111's


def _first(patterns, s: str) -> tuple[int, str] | None:
    hits = [(m.start(), what) for pattern, what in patterns if (m := pattern.search(s))]
    return min(hits) if hits else None


def parse_prompt(prompt: str, syntax: str = "auto") -> ParsedPrompt:
    """The fragments and weights `prompt` means in `syntax` ("auto" resolved by detect_syntax)."""
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax={syntax!r}; expected one of {SYNTAXES}")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt is a {type(prompt).__name__}; expected a str")
    syntax = detect_syntax(prompt) if syntax == "auto" else syntax
    if syntax == "compel":
        return parse_compel(prompt)
    parts = parse_a1111(prompt) if syntax == "a1111" else (Fragment(prompt, 1.0),)
    return ParsedPrompt(syntax, (parts,), (1.0,))


def encode_weighted(prompt: str, tokenizer: ClipTokenizer, encode: TextEncoder, syntax: str = "auto",
                    max_windows: int | None = None, *, encode_masked: MaskedTextEncoder | None = None,
                    downweight: str = "mask") -> np.ndarray:
    """The conditioning (1, 77k, D) float32 of one prompt: parsed, tokenised, windowed, encoded, weighted.

    `encode` runs the text encoder on (1, 77) int64 ids; `encode_masked(ids, mask)` the same with a (1, 77) int64
    attention mask (1 = attend), needed only by compel's default down-weighting; `syntax`, `max_windows` and
    `downweight` are described in this module's docstring. Raises PromptError for broken syntax, ValueError for
    a bad argument or an encoder output that is not (1, 77, D).
    """
    _check(tokenizer, max_windows, downweight)
    enc = Encoder(encode, encode_masked, tokenizer)
    return _encode(parse_prompt(prompt, syntax), tokenizer, enc, max_windows, downweight, "prompt")


def encode_pair(prompt: str, negative_prompt: str, tokenizer: ClipTokenizer, encode: TextEncoder,
                syntax: str = "auto", max_windows: int | None = None, *,
                encode_masked: MaskedTextEncoder | None = None,
                downweight: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """The positive and negative conditionings (1, 77k, D), the shorter padded with empty-prompt windows to the
    longer (compel and A1111 both pad so), sharing one memo of encoded windows. With syntax="auto" each prompt's
    syntax is detected on its own."""
    _check(tokenizer, max_windows, downweight)
    enc = Encoder(encode, encode_masked, tokenizer)
    pos = _encode(parse_prompt(prompt, syntax), tokenizer, enc, max_windows, downweight, "prompt")
    neg = _encode(parse_prompt(negative_prompt, syntax), tokenizer, enc, max_windows, downweight,
                  "negative prompt")
    pos, neg = pad_to_same_length([pos, neg], enc.empty()[None])
    return pos, neg


def encode_empty(tokenizer: ClipTokenizer, encode: TextEncoder) -> np.ndarray:
    """The empty prompt's conditioning (1, 77, D): what pad_to_same_length pads with."""
    return Encoder(encode, None, tokenizer).empty()[None]


def _check(tokenizer: ClipTokenizer, max_windows: int | None, downweight: str) -> None:
    if tokenizer.max_length != WINDOW + 2:
        raise ValueError(f"tokenizer.max_length={tokenizer.max_length}; prompt weighting lays out CLIP's "
                         f"{WINDOW + 2}-token windows")
    if max_windows is not None and (not isinstance(max_windows, int) or isinstance(max_windows, bool)
                                    or max_windows < 1):
        raise ValueError(f"max_windows={max_windows!r}; expected an integer >= 1, or None for no limit")
    if downweight not in DOWNWEIGHTS:
        raise ValueError(f"downweight={downweight!r}; expected one of {DOWNWEIGHTS}")


def _sequences(parsed: ParsedPrompt) -> list[Fragments]:
    return [s for part in parsed.parts for s in (part.prompts if isinstance(part, Blend) else (part,))]


def _encode(parsed: ParsedPrompt, tokenizer: ClipTokenizer, enc: Encoder, max_windows: int | None,
            downweight: str, what: str) -> np.ndarray:
    """Dispatch on the syntax; each token sequence is laid out once (compel's "remove" lays out variants)."""
    policy = POLICIES[parsed.syntax]

    @functools.cache
    def layout(fragments: Fragments) -> Windows:
        stream = tokenize(fragments, tokenizer)
        return lay_out(stream, policy(stream, tokenizer), tokenizer, max_windows)

    sequences = _sequences(parsed)
    if parsed.syntax == "compel" and downweight == "mask" and not enc.can_mask:
        faded = next((f for s in sequences for f in s if f.weight < 1 and f.text.strip()), None)
        if faded is not None:
            raise ValueError(f"{what} down-weights {faded.text!r} (x{faded.weight:.3g}): compel's down-weighting "
                             "(downweight='mask') encodes the prompt again with those tokens masked out of "
                             "attention, which needs encode_masked(ids, mask); with a text encoder that takes "
                             "input_ids only, pass downweight='remove' (compel's DownweightMode.REMOVE)")
    if parsed.syntax == "compel":
        cond = compel_conditioning(parsed, lambda s: compel_sequence(s, layout, enc, downweight), enc.empty())
    elif parsed.syntax == "a1111":
        cond = a1111_conditioning(layout(parsed.parts[0]), enc)
    else:
        cond = plain_conditioning(layout(parsed.parts[0]), enc)
    dropped = sum(layout(s).dropped for s in sequences)
    if dropped:
        warnings.warn(f"{what} is longer than max_windows={max_windows} windows of {WINDOW} tokens: the last "
                      f"{dropped} tokens were dropped", stacklevel=3)
    return cond
