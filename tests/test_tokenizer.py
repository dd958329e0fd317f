"""Our CLIP tokenizer gives transformers' ids, and says when it truncates."""

from __future__ import annotations

import pytest

from edge.tokenizer import ClipTokenizer

ASSETS = "converters/assets/clip_tokenizer"
PROMPTS = [
    "a red circle on a blue background",
    "A RED Circle,  on a   blue\tbackground!!",
    "photo of an astronaut riding a horse on mars, 4k, trending on artstation",
    "it's a cat's toy; they'll've 3.14 ½ ² café naïve “quotes” — dash",
    "日本語のテキスト 🐱 emoji",
    "",
    "a <|endoftext|> b <|startoftext|>",
    "word " * 90,
]


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import CLIPTokenizer

    from conftest import REPO

    return ClipTokenizer(REPO / ASSETS / "vocab.json", REPO / ASSETS / "merges.txt"), CLIPTokenizer.from_pretrained(REPO / ASSETS)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_transformers(tokenizers, prompt):
    ours, theirs = tokenizers
    expected = theirs(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours.encode(prompt).ids[0].tolist() == expected


def test_truncation_warns_with_count(tokenizers):
    ours, _ = tokenizers
    with pytest.warns(UserWarning, match="the last 15 tokens were dropped"):
        ids = ours.encode_prompt("word " * 90)
    assert ids.shape == (1, 77) and ids[0, -1] == ours.eos_id


def test_short_prompt_does_not_warn(tokenizers, recwarn):
    ours, _ = tokenizers
    ours.encode_prompt("a cat")
    assert not recwarn.list
