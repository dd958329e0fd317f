"""CLIP's byte-level BPE tokenizer, built on the `tokenizers` package from a bundle's vocab.json and merges.txt.

The normaliser and pre-tokeniser are CLIP's (lower-cased, whitespace folded, CLIP's word regex), so ids
match transformers' CLIPTokenizer, which Stable Diffusion pipelines use.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # (1, max_length) int64
    dropped: int  # prompt tokens cut to fit max_length


class ClipTokenizer:
    def __init__(self, vocab_file: Path, merges_file: Path, max_length: int = 77, pad_token: str = EOS):
        vocab = read_vocab(Path(vocab_file))
        merges = read_merges(Path(merges_file))
        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise ValueError(f"{vocab_file}: token {token!r} is missing from the vocabulary")
        try:
            bpe = models.BPE(
                vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                fuse_unk=False, unk_token=EOS,
            )
        except Exception as e:  # the tokenizers binding raises its own exception type
            raise ValueError(f"{merges_file} does not match {vocab_file} ({e}); expected the BPE merges of that "
                             "vocabulary") from None
        self._tok = Tokenizer(bpe)
        self._tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        self._tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        self._tok.add_special_tokens([BOS, EOS])  # typed in a prompt, they stay one token each
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        self._expand: dict[str, str] = {}  # a multi-vector word -> its tokens (textual inversion)

    def add_words(self, tokens: list[str]) -> list[int]:
        """New vocabulary entries (a textual-inversion embedding's, one per vector), matched whole in prompts
        whatever their case; the first stands for all of them. Returns their ids, after the vocabulary's."""
        tokens = [t.lower() for t in tokens]
        taken = [t for t in tokens if self._tok.token_to_id(t) is not None]
        if taken:
            raise ValueError(f"token {taken[0]!r} is already in the vocabulary: give the embedding another token")
        self._tok.add_tokens([AddedToken(t, single_word=False, normalized=True) for t in tokens])
        if len(tokens) > 1:
            self._expand[tokens[0]] = " ".join(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def encode(self, text: str) -> Encoded:
        """[BOS] prompt [EOS] [PAD]..., cut to max_length; `dropped` says how many prompt tokens did not fit."""
        for word, tokens in self._expand.items():
            text = re.sub(rf"(?<![\w_]){re.escape(word)}(?![\w_])", tokens, text, flags=re.IGNORECASE)
        body = self._tok.encode(text, add_special_tokens=False).ids
        room = self.max_length - 2
        dropped = max(0, len(body) - room)
        ids = [self.bos_id, *body[:room], self.eos_id]
        ids += [self.pad_id] * (self.max_length - len(ids))
        return Encoded(ids=np.asarray([ids], dtype=np.int64), dropped=dropped)

    def encode_prompt(self, text: str, what: str = "prompt") -> np.ndarray:
        """encode(), warning when the prompt is truncated (as diffusers does, but saying how many tokens)."""
        enc = self.encode(text)
        if enc.dropped:
            warnings.warn(
                f"{what} is longer than the text encoder's {self.max_length} tokens: "
                f"the last {enc.dropped} tokens were dropped",
                stacklevel=2,
            )
        return enc.ids


def read_vocab(path: Path) -> dict[str, int]:
    """CLIP's vocab.json: a JSON object of token -> integer id; any other content is refused, naming the file."""
    expected = "expected CLIP's vocabulary, a JSON object mapping each token to an integer id"
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({e}); {expected}") from None
    if not isinstance(vocab, dict) or not vocab:
        what = "an empty object" if vocab == {} else f"a JSON {type(vocab).__name__}"
        raise ValueError(f"{path}: holds {what}; {expected}")
    bad = next((k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)), None)
    if bad is not None:
        raise ValueError(f"{path}: token {bad!r} maps to {vocab[bad]!r}; {expected}")
    return vocab


def read_merges(path: Path) -> list[tuple[str, str]]:
    """CLIP's merges.txt: an optional "#version" line, then one merge per line, two tokens separated by a space."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); expected BPE merges, two tokens per line") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{path}: line {n} is {line[:60]!r}; expected a BPE merge, two tokens separated by "
                             "a space")
        merges.append((pair[0], pair[1]))
    if not merges:
        raise ValueError(f"{path}: holds no merges; expected BPE merges, two tokens per line")
    return merges
