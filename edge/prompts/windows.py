"""Tokenising weighted fragments, and laying the tokens out in 77-token windows the way each tool does.

CLIP sees 77 positions: BOS, up to 75 prompt tokens, EOS, padding. Longer prompts are cut into windows of at
most 75 tokens, each wrapped and padded to 77 and encoded on its own; the conditionings are concatenated along
the sequence. Where the cuts fall differs, and each syntax follows its tool so a prompt means what it meant there:
- a1111: windows fill to 75 tokens, but when a window is full and a comma lies within its last 20 tokens, the
  text after the comma moves to the next window (A1111's comma_padding_backtrack, default 20); BREAK starts a new
  window (an empty one if the current window is empty).
- compel: a window ends after its last '.' when there is one within the 75, else its last ',', '.', ';' or ':',
  else at its last word end, else at 75 tokens (compel's SplitLongTextMode.SENTENCES, Compel's default).
- none: plain 75-token cuts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..tokenizer import ClipTokenizer
from .parsed import BREAK, Fragment, Fragments

WINDOW = 75  # prompt tokens per window: the text encoder's 77 positions less BOS and EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
BREAK_ID = -1  # a BREAK in a Stream


def token_ids(tokenizer: ClipTokenizer, text: str) -> list[int]:
    """`text`'s ids without BOS/EOS, never truncated.

    ClipTokenizer.encode cuts to max_length and reports the cut in `dropped`: a copy with room for no token says
    how many there are, a second with room for exactly that many returns them.
    """
    probe = copy.copy(tokenizer)
    probe.max_length = 2
    n = probe.encode(text).dropped
    if n == 0:
        return []
    probe.max_length = n + 2
    return probe.encode(text).ids[0, 1:n + 1].tolist()


def word_ends(tokenizer: ClipTokenizer, text: str) -> list[bool]:
    """For each of `text`'s tokens, whether it ends a CLIP word (its vocabulary entry ends in '</w>').

    ClipTokenizer has no id-to-token lookup, so this asks encode(): the last token of any text ends a word, and
    the tokens of a prefix of a word are the word's first tokens exactly where the prefix ends on a word end.
    """
    ids, flags = token_ids(tokenizer, text), []
    for word in text.split():
        mine = token_ids(tokenizer, word)
        ends = [False] * len(mine)
        for i in range(1, len(word) + 1):
            head = token_ids(tokenizer, word[:i])
            if head and mine[:len(head)] == head:
                ends[len(head) - 1] = True
        flags += ends
    if len(flags) != len(ids):  # whitespace Python and CLIP split differently: only the last token is certain
        flags = [False] * len(ids)
        flags[-1:] = [True] * min(1, len(ids))
    return flags


@dataclass(frozen=True)
class Stream:
    """A prompt's tokens in order, before windowing."""

    ids: list[int]  # BREAK_ID where an A1111 BREAK stood
    weights: list[float]  # the weight of each token's fragment
    fragments: list[int]  # index, into `texts`, of each token's fragment
    texts: tuple[str, ...]  # the fragments' texts


def tokenize(fragments: Fragments, tokenizer: ClipTokenizer) -> Stream:
    """Each fragment tokenised on its own, as A1111 and compel both do, then concatenated."""
    ids, weights, owner, texts = [], [], [], []
    for item in fragments:
        if item is BREAK:
            ids.append(BREAK_ID)
            weights.append(1.0)
            owner.append(-1)
            continue
        assert isinstance(item, Fragment)
        part = token_ids(tokenizer, item.text)
        ids += part
        weights += [item.weight] * len(part)
        owner += [len(texts)] * len(part)
        texts.append(item.text)
    return Stream(ids, weights, owner, tuple(texts))


def plain_windows(stream: Stream, tokenizer: ClipTokenizer) -> list[list[int]]:
    """75-token cuts; an empty prompt is one empty window."""
    n = len(stream.ids)
    return [list(range(a, min(a + WINDOW, n))) for a in range(0, max(n, 1), WINDOW)]


def a1111_windows(stream: Stream, tokenizer: ClipTokenizer) -> list[list[int]]:
    """A1111's tokenize_line: BREAK, and a full window hands the text after a nearby comma to the next."""
    comma = token_ids(tokenizer, ",")[0]
    windows: list[list[int]] = []
    chunk: list[int] = []
    last_comma = -1
    for s, tid in enumerate(stream.ids):
        if tid == BREAK_ID:
            windows.append(chunk)
            chunk, last_comma = [], -1
            continue
        if tid == comma:
            last_comma = len(chunk)
        elif len(chunk) == WINDOW and last_comma != -1 and WINDOW - last_comma <= COMMA_BACKTRACK:
            windows.append(chunk[:last_comma + 1])
            chunk, last_comma = chunk[last_comma + 1:], -1
        if len(chunk) == WINDOW:
            windows.append(chunk)
            chunk, last_comma = [], -1
        chunk.append(s)
    if chunk or not windows:
        windows.append(chunk)
    return windows


def compel_windows(stream: Stream, tokenizer: ClipTokenizer) -> list[list[int]]:
    """compel's _chunk_and_pad_token_ids with SplitLongTextMode.SENTENCES: cut after the last sentence end,
    else phrase end, else word end, within each 75 tokens."""
    sentence = {token_ids(tokenizer, ".")[0]}
    phrase = {token_ids(tokenizer, p)[0] for p in ".,;:"}
    ends: list[bool] = []

    def word_end(s: int) -> bool:
        if not ends:  # only long prompts with no punctuation in a window need these: found on first use
            for text in stream.texts:
                ends.extend(word_ends(tokenizer, text))
        return ends[s]

    rules: list[Callable[[int], bool]] = [lambda s: stream.ids[s] in sentence, lambda s: stream.ids[s] in phrase,
                                          word_end]
    rest, windows = list(range(len(stream.ids))), []
    while True:
        split = WINDOW
        if len(rest) > WINDOW:
            head = rest[:WINDOW]
            found = (next((k + 1 for k in range(WINDOW - 1, -1, -1) if rule(head[k])), None) for rule in rules)
            split = next((k for k in found if k is not None), WINDOW)
        windows.append(rest[:split])
        rest = rest[split:]
        if not rest:
            return windows


@dataclass(frozen=True)
class Windows:
    """A token sequence laid out for the text encoder."""

    ids: np.ndarray  # (k, 77) int64: BOS, tokens, EOS, padding
    weights: np.ndarray  # (k, 77) float32: each token's weight, 1 on BOS, EOS and padding
    spans: tuple[tuple[int, int] | None, ...]  # per fragment: first and last flat index (window * 77 + slot)
    dropped: int  # prompt tokens in windows past max_windows


def lay_out(stream: Stream, windows: list[list[int]], tokenizer: ClipTokenizer, max_windows: int | None) -> Windows:
    """BOS + window + EOS + padding per window, keeping the first `max_windows`."""
    kept = windows if max_windows is None else windows[:max_windows]
    dropped = sum(len(w) for w in windows[len(kept):])
    size = WINDOW + 2
    ids = np.full((len(kept), size), tokenizer.pad_id, dtype=np.int64)  # (k, 77)
    weights = np.ones((len(kept), size), dtype=np.float32)  # (k, 77)
    ids[:, 0] = tokenizer.bos_id
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for w, window in enumerate(kept):
        ids[w, 1:1 + len(window)] = [stream.ids[s] for s in window]
        ids[w, 1 + len(window)] = tokenizer.eos_id
        weights[w, 1:1 + len(window)] = [stream.weights[s] for s in window]
        for slot, s in enumerate(window, start=1):
            first.setdefault(stream.fragments[s], w * size + slot)
            last[stream.fragments[s]] = w * size + slot
    spans = tuple((first[f], last[f]) if f in first else None for f in range(len(stream.texts)))
    return Windows(ids, weights, spans, dropped)


POLICIES = {"a1111": a1111_windows, "compel": compel_windows, "none": plain_windows}
