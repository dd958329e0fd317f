"""What a prompt string means once parsed: weighted text fragments, blends and conjunctions.

Both parsers (parse_a1111.py, parse_compel.py) produce these, so tokenising and weighting never look at
prompt syntax again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union


class PromptError(ValueError):
    """A prompt that cannot be parsed: `column` (1-based, in the string the caller passed) says where."""

    def __init__(self, prompt: str, index: int, message: str):
        self.prompt, self.column = prompt, index + 1
        start = max(0, min(index - 40, len(prompt) - 80))  # show up to 80 characters around the column
        shown = re.sub(r"\s", " ", prompt[start:start + 80])
        super().__init__(f"prompt column {self.column}: {message}\n  {shown}\n  {' ' * (index - start)}^")


@dataclass(frozen=True)
class Fragment:
    """A run of text and the weight of every token it tokenises to."""

    text: str
    weight: float = 1.0


class _Break:
    """A1111's BREAK: the next fragment starts a new 75-token window."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK = _Break()

Fragments = tuple[Union[Fragment, _Break], ...]  # one token sequence: fragments (and, for A1111, BREAKs)


@dataclass(frozen=True)
class Blend:
    """compel's `("a", "b").blend(w1, w2)`: the conditionings of `prompts`, summed with `weights`
    (divided by their sum when `normalize`)."""

    prompts: tuple[Fragments, ...]
    weights: tuple[float, ...]
    normalize: bool = True


@dataclass(frozen=True)
class ParsedPrompt:
    """A whole prompt: `parts` are encoded separately, each scaled by its weight (away from the empty prompt's
    conditioning) and concatenated along the sequence, as compel's `.and()` does; every other prompt has one part
    of weight 1."""

    syntax: str  # "a1111", "compel" or "none"
    parts: tuple[Union[Fragments, Blend], ...]
    weights: tuple[float, ...]
