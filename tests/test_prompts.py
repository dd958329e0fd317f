"""Prompt weighting (edge.prompts) against compel itself and against A1111's published rule, on the tiny model.

Our side runs as the device does: the bundle's tokenizer and its ONNX text encoder through onnxruntime. compel
runs on the same model's torch text encoder and transformers tokenizer, from the diffusers folder.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO
from edge.metrics import psnr
from edge.prompts import (BREAK, Blend, PromptError, detect_syntax, encode_empty, encode_pair, encode_weighted,
                          pad_to_same_length, parse_prompt)
from edge.sessions import open_session
from edge.tokenizer import ClipTokenizer

MIN_DB = 60.0


@pytest.fixture(scope="module")
def tiny(models, bundles, tmp_path_factory):
    """The tiny model as the runtime sees it (bundle tokenizer + ONNX text encoder, whose attention_mask input
    compel's default down-weighting uses) and as compel sees it."""
    import torch
    from compel import Compel, DownweightMode
    from transformers import CLIPTextModel, CLIPTokenizer

    bundle, folder = bundles["folder-epsilon"], models["folder-epsilon"]
    tok = ClipTokenizer(bundle / "tokenizer" / "vocab.json", bundle / "tokenizer" / "merges.txt")
    session = open_session(bundle / "text_encoder.onnx")
    hf_tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    te = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()

    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    example = (torch.zeros(1, 77, dtype=torch.int64),)
    scratch = tmp_path_factory.mktemp("prompts")

    # A1111 restores each window's mean: with the tiny encoder's untrained final LayerNorm (bias 0) that mean is
    # ~1e-9, rounding noise, and the rule is ill-conditioned. Trained CLIP's is far from 0; so is this copy's,
    # exported with the converter's own exporter.
    from edge.converters.onnx_export import Spec, TextEncoder, export

    biased = copy.deepcopy(te)
    norm = biased.final_layer_norm if hasattr(biased, "final_layer_norm") else biased.text_model.final_layer_norm
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.bias.copy_(0.3 + 0.5 * torch.randn(norm.bias.shape, generator=g))
        norm.weight.copy_(1 + 0.2 * torch.randn(norm.weight.shape, generator=g))
    spec = Spec("text_encoder", TextEncoder(biased), [{"name": "input_ids", "dtype": "int64", "shape": [1, 77]}],
                [{"name": "last_hidden_state", "dtype": "float32", "shape": [1, 77, 32]}], None)
    export(spec, scratch / "text_encoder_biased.onnx", example, tmp_path_factory.mktemp("scratch"))
    biased_session = open_session(scratch / "text_encoder_biased.onnx")

    def compel(text: str, remove: bool = False):
        mode = DownweightMode.REMOVE if remove else DownweightMode.MASK
        c = Compel(tokenizer=hf_tok, text_encoder=te, truncate_long_prompts=False, downweight_mode=mode)
        with torch.no_grad():
            return c, c.build_conditioning_tensor(text)

    return SimpleNamespace(
        tok=tok, hf_tok=hf_tok, te=te, compel=compel, biased_te=biased,
        biased_encode=lambda ids: biased_session.run(None, {"input_ids": ids})[0],
        encode=lambda ids: session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0],
        encode_masked=lambda ids, mask: session.run(None, {"input_ids": ids, "attention_mask": mask})[0],
    )


def ours(tiny, prompt: str, syntax: str = "compel", remove: bool = False, **kw) -> np.ndarray:
    return encode_weighted(prompt, tiny.tok, tiny.encode, syntax, encode_masked=tiny.encode_masked,
                           downweight="remove" if remove else "mask", **kw)


# ---------------------------------------------------------------- compel: parser and conditioning against compel

COMPEL_PARSE = [
    "a red cat", "a cat++ on a mat--", "(a red cat)1.3 sitting", "(a (red)1.5 cat)0.5 x", "cat+, dog-",
    "a, b,c...d", '"a cat"1.2 and "dog"-', "(a)(b) hello(world)", "red-haired girl+", "(x).5", "(x)1.",
    "a (b, c.) d", '("a cat", "a dog").blend(0.3, 0.7)', "(cat, dog).and(1, 0.5)",
    '("a", "b").blend(1,1,no_normalize)', "a \\(b\\) c", "", "   ", "cat.attend(1.2) dog", "(a cat)  1.2",
    '"a \\"quoted\\" word"+ ok', "word.attend(++) x", "(a, (b)1.1)0.9", "--ar 16:9", "a+b c-d",
    "(x)--  (y)+++", "masterpiece, best quality, 1girl, (blue eyes)1.2, long hair--, smile+", "(3.5 inch)1.1 floppy",
    "cat++dog", "(empty ())", "a (b) (c)1.0 d", '("a cat++", "a (dog)0.5 house").blend(1, 2)',
    '("a red cat", "(blue)-- sky").and(0.5, 1.5)', "(cat:1.2) [x]", "((a b)1.2 c)0.8 d+++",
]


def _compel_parts(conjunction):
    from compel.prompt_parser import Blend as CompelBlend

    parts = []
    for p in conjunction.prompts:
        if isinstance(p, CompelBlend):
            parts.append((tuple(tuple((f.text, f.weight) for f in q.children) for q in p.prompts),
                          tuple(p.weights), p.normalize_weights))
        else:
            parts.append(tuple((f.text, f.weight) for f in p.children))
    return parts, list(conjunction.weights)


@pytest.mark.parametrize("prompt", COMPEL_PARSE)
def test_compel_parse_matches_compel(prompt):
    from compel import Compel

    parsed = parse_prompt(prompt, "compel")
    mine = [(tuple(tuple((f.text, f.weight) for f in q) for q in p.prompts), p.weights, p.normalize)
            if isinstance(p, Blend) else tuple((f.text, f.weight) for f in p) for p in parsed.parts]
    assert (mine, list(parsed.weights)) == _compel_parts(Compel.parse_prompt_string(prompt))


COMPEL_PROMPTS = [
    "a red circle on a blue background",
    "a red++ circle on a blue-- background",
    "(a red circle)1.3 on a (blue background)0.7",
    "(a (red)1.5 circle)0.8, (blue)+ background",
    '"a red circle"1.2 and "a blue square"-',
    "masterpiece, best quality, (blue eyes)1.2, long hair--, smile+",
    "a cat.attend(1.2) sitting, ((on a mat)0.5)0.5",
    "(red)0 circle",
    '("a red circle", "a blue square").blend(0.7, 0.3)',
    '("a red circle", "a (blue)-- square").blend(1, 2, no_normalize)',
    '("a red circle", "a blue background").and()',
    '("a red circle", "a blue++ background").and(1, 0.5)',
    "",
]


@pytest.mark.parametrize("remove", [False, True], ids=["mask", "remove"])
@pytest.mark.parametrize("prompt", COMPEL_PROMPTS)
def test_compel_conditioning_matches_compel(tiny, prompt, remove):
    """compel's default (masked) down-weighting and its DownweightMode.REMOVE, both against compel."""
    _, theirs = tiny.compel(prompt, remove=remove)
    mine = ours(tiny, prompt, remove=remove)
    assert mine.shape == tuple(theirs.shape) and mine.dtype == np.float32
    assert psnr(theirs.numpy(), mine) >= MIN_DB


def test_compel_weights_change_the_conditioning(tiny):
    """The comparisons above would pass on a no-op; weights must move the output, and the two modes differ."""
    plain = ours(tiny, "a red circle on a blue background")
    up, down = ours(tiny, "a red++ circle on a blue background"), ours(tiny, "a red circle on a blue-- background")
    down_removed = ours(tiny, "a red circle on a blue-- background", remove=True)
    for weighted in (up, down, down_removed):
        assert psnr(plain, weighted) < MIN_DB - 5
    assert psnr(down, down_removed) < MIN_DB - 5


def test_pipeline_downweights_as_compel_does_by_default(tiny, bundles):
    """The bundle's text encoder takes an attention mask, so `generate` down-weights as compel's default does
    (the fragment masked out of attention), not by removing it."""
    from edge import Pipeline

    pipe = Pipeline.load(bundles["folder-epsilon"], preload=False)
    prompt = "a red circle on a blue-- background"
    mine = pipe.encode_text(prompt, "", guided=False, copies=1, syntax="compel")  # (1, 77, D)
    assert psnr(tiny.compel(prompt)[1].numpy(), mine) >= MIN_DB
    assert psnr(tiny.compel(prompt, remove=True)[1].numpy(), mine) < MIN_DB - 5


def test_masked_downweight_needs_a_masked_encoder(tiny):
    with pytest.raises(ValueError, match=r"down-weights 'mat'.*downweight='remove'"):
        encode_weighted("a cat on a mat--", tiny.tok, tiny.encode, "compel")
    up = encode_weighted("a cat++ on a mat", tiny.tok, tiny.encode, "compel")  # up-weights need no mask
    assert psnr(tiny.compel("a cat++ on a mat")[1].numpy(), up) >= MIN_DB


COMPEL_ERRORS = [
    ("(a cat", 1, "never closed"),
    ("a cat)", 6, "closes no"),
    ('"a cat', 1, "never closed"),
    ("(a = b)", 4, "cannot read '='"),
    ("(x)-1", 5, "not a weight"),
    ("(x)1.2.3", 7, "not a weight"),
    ('("a", "b").blend(1)', 18, "2 prompts and 1 weights"),
    ('a cat, ("x", "y").blend(1,1)', 18, "whole prompt"),
    ('("x", "y").and(1) and more', 19, "text after"),
    ('("x", "y").and(1, no_normalize)', 16, "not a weight"),
    ("(a cat).swap(dog)", 8, "swap"),
    ("withLora(foo, 0.5) cat", 1, "withLora"),
]


@pytest.mark.parametrize("prompt,column,message", COMPEL_ERRORS)
def test_compel_errors_name_the_column(prompt, column, message):
    with pytest.raises(PromptError, match=message) as e:
        parse_prompt(prompt, "compel")
    assert e.value.column == column and isinstance(e.value, ValueError)


def test_blend_weights_summing_to_zero_are_refused(tiny):
    with pytest.raises(ValueError, match="sum to 0"):
        ours(tiny, '("a", "b").blend(1, -1)')


# ---------------------------------------------------------------- A1111: parser, and weights against the rule

A1111_PARSE = [
    ("a red circle", [("a red circle", 1.0)]),
    ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
    ("a [red] circle", [("a ", 1.0), ("red", 1 / 1.1), (" circle", 1.0)]),
    ("a (red:1.3) circle", [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]),
    ("((red)) circle", [("red", 1.21), (" circle", 1.0)]),
    ("a ((red:1.5) circle:0.8)", [("a ", 1.0), ("red", 1.2), (" circle", 0.8)]),
    ("[[blue]] (sky:0.5)", [("blue", 1 / 1.21), (" ", 1.0), ("sky", 0.5)]),
    ("an \\(escaped\\) bracket \\[too\\]", [("an (escaped) bracket [too]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a red circle BREAK a blue background", [("a red circle", 1.0), BREAK, ("a blue background", 1.0)]),
    ("(red BREAK circle:1.2)", [("red", 1.2), BREAK, ("circle", 1.2)]),
    ("BREAK a blue background", [("", 1.0), BREAK, ("a blue background", 1.0)]),
    ("", [("", 1.0)]),
    ("(red: 1.5 ) circle", [("red", 1.5), (" circle", 1.0)]),
    ("a \\\\ backslash", [("a \\ backslash", 1.0)]),
    ("colon: fine (style: anime)", [("colon: fine ", 1.0), ("style: anime", 1.1)]),
    ("(worst quality:1.4), (low quality:1.4), blurry", [("worst quality", 1.4), (", ", 1.0),
                                                        ("low quality", 1.4), (", blurry", 1.0)]),
]


@pytest.mark.parametrize("prompt,expected", A1111_PARSE)
def test_a1111_parse(prompt, expected):
    (fragments,) = parse_prompt(prompt, "a1111").parts
    got = [f if f is BREAK else (f.text, f.weight) for f in fragments]
    assert got == [e if e is BREAK else (e[0], pytest.approx(e[1], rel=1e-12)) for e in expected]


A1111_ERRORS = [
    ("a (red circle", 3, "never closed"),
    ("a red) circle", 6, "closes no bracket"),
    ("a [red) circle", 7, r"closes the '\['"),
    ("(red:1.2.3)", 6, "not a number"),
    ("[cat:dog:0.5]", 5, "prompt editing"),
    ("[cat|dog]", 5, "alternation"),
    ("a <lora:foo:0.8>", 3, "extra networks"),
    ("a cat AND a dog", 7, "AND"),
]


@pytest.mark.parametrize("prompt,column,message", A1111_ERRORS)
def test_a1111_errors_name_the_column(prompt, column, message):
    with pytest.raises(PromptError, match=message) as e:
        parse_prompt(prompt, "a1111")
    assert e.value.column == column


def a1111_reference(pieces, tiny) -> tuple[np.ndarray, list[int]]:
    """A1111's published rule, written out plainly from modules/sd_hijack_clip.py and sd_emphasis.py ("Original"):
    fragments tokenised one by one; 75-token chunks, where BREAK starts the next and a full chunk hands the
    tokens after a comma within its last 20 to the next; each chunk encoded as BOS + chunk + EOS padding;
    hidden states multiplied per token, then rescaled so the chunk's mean is unchanged. (1, 77k, D), lengths"""
    import torch

    hf = tiny.hf_tok
    comma = hf.convert_tokens_to_ids(",</w>")
    chunks, cur, last_comma = [], [], -1
    for piece in pieces:
        if piece is BREAK:
            chunks.append(cur)
            cur, last_comma = [], -1
            continue
        for t in hf(piece[0], add_special_tokens=False).input_ids:
            if t == comma:
                last_comma = len(cur)
            elif len(cur) == 75 and last_comma != -1 and 75 - last_comma <= 20:
                chunks.append(cur[:last_comma + 1])
                cur, last_comma = cur[last_comma + 1:], -1
            if len(cur) == 75:
                chunks.append(cur)
                cur, last_comma = [], -1
            cur.append((t, piece[1]))
    if cur or not chunks:
        chunks.append(cur)
    zs = []
    with torch.no_grad():
        for chunk in chunks:
            ids = [hf.bos_token_id] + [t for t, _ in chunk] + [hf.eos_token_id] * (76 - len(chunk))
            mult = torch.tensor([1.0] + [w for _, w in chunk] + [1.0] * (76 - len(chunk)))
            z = tiny.biased_te(torch.tensor([ids]))[0][0]  # (77, D)
            mean = z.mean()
            z = z * mult[:, None]
            zs.append(z * (mean / z.mean()))
    return torch.cat(zs)[None].numpy(), [len(c) for c in chunks]


TAGS = ("highly detailed, sharp focus, soft light, studio photograph, pastel colours, smooth gradient, "
        "award winning, minimalist composition, centred subject, clean edges, ")
LONG_A1111 = "a (red circle:1.2) on a [blue] background, " + TAGS * 6  # 188 tokens
LONG_A1111_PIECES = [("a ", 1.0), ("red circle", 1.2), (" on a ", 1.0), ("blue", 1 / 1.1),
                     (" background, " + TAGS * 6, 1.0)]
A1111_WEIGHTED = A1111_PARSE[:12] + [(LONG_A1111, LONG_A1111_PIECES),
                                     ("a red circle BREAK BREAK a blue background",
                                      [("a red circle", 1.0), BREAK, ("", 1.0), BREAK, ("a blue background", 1.0)])]


@pytest.mark.parametrize("prompt,pieces", A1111_WEIGHTED)
def test_a1111_conditioning_matches_the_published_rule(tiny, prompt, pieces):
    reference, lengths = a1111_reference(pieces, tiny)
    mine = encode_weighted(prompt, tiny.tok, tiny.biased_encode, "a1111")
    assert mine.shape == reference.shape
    assert psnr(reference, mine) >= MIN_DB
    if prompt == LONG_A1111:  # the comma backtrack moved text to the next window: not plain 75-token cuts
        assert len(lengths) >= 3 and lengths[0] < 75


def test_a1111_weights_change_the_conditioning(tiny):
    """Well below the gate: an implementation that ignored weights would fail the comparisons above."""
    plain = encode_weighted("a red circle", tiny.tok, tiny.biased_encode, "a1111")
    for prompt in ("a (red:1.3) circle", "a [red] circle"):
        assert psnr(plain, encode_weighted(prompt, tiny.tok, tiny.biased_encode, "a1111")) < MIN_DB - 5


# ---------------------------------------------------------------- long prompts and the negative prompt

SENTENCES = ("a photograph of a red circle on a blue background, highly detailed, sharp focus. "
             "the circle sits in the middle of the frame, lit from the left, with a soft shadow. "
             "behind it the background fades from deep navy to a pale sky blue, smooth and even. ")


def long_prompt(tiny, tokens: int = 200) -> str:
    """The first words of SENTENCES (repeated) that make exactly `tokens` tokens."""
    words = (SENTENCES * 4).split()
    for n in range(1, len(words)):
        text = " ".join(words[:n])
        if len(tiny.hf_tok(text, add_special_tokens=False).input_ids) == tokens:
            return text
    raise AssertionError(f"no prefix of SENTENCES has {tokens} tokens")


@pytest.mark.parametrize("variant", ["plain", "weighted", "words only"])
@pytest.mark.parametrize("remove", [False, True], ids=["mask", "remove"])
def test_long_prompt_matches_compel(tiny, variant, remove):
    """200 tokens take 3 windows (231 positions), cut where compel cuts: after a sentence, else a phrase, else a
    word (the "words only" prompt has no punctuation and multi-token words, so cuts fall between words)."""
    prompt = long_prompt(tiny)
    if variant == "weighted":
        prompt = prompt.replace("red circle", "(red circle)1.3").replace("soft shadow", "(soft shadow)0.6")
    elif variant == "words only":
        prompt = " ".join(["a cat photorealistic"] * 50)  # 200 tokens: "photorealistic" is two
    _, theirs = tiny.compel(prompt, remove=remove)
    mine = ours(tiny, prompt, remove=remove)
    assert mine.shape == tuple(theirs.shape) == (1, 231, 32)
    assert psnr(theirs.numpy(), mine) >= MIN_DB


def test_negative_prompt_is_padded_to_the_positive(tiny):
    prompt, negative = long_prompt(tiny), "blurry, (low quality)0.5"
    compel, pos = tiny.compel(prompt)
    _, neg = tiny.compel(negative)
    pos_t, neg_t = compel.pad_conditioning_tensors_to_same_length([pos, neg])
    mine_pos, mine_neg = encode_pair(prompt, negative, tiny.tok, tiny.encode, "compel",
                                     encode_masked=tiny.encode_masked)
    assert mine_pos.shape == mine_neg.shape == (1, 231, 32)
    assert psnr(pos_t.detach().numpy(), mine_pos) >= MIN_DB and psnr(neg_t.detach().numpy(), mine_neg) >= MIN_DB
    short_pos, long_neg = encode_pair(negative, prompt, tiny.tok, tiny.encode, encode_masked=tiny.encode_masked)
    assert short_pos.shape == long_neg.shape == (1, 231, 32)  # whichever is shorter is padded


def test_pad_to_same_length_appends_empty_windows(tiny):
    empty = encode_empty(tiny.tok, tiny.encode)  # (1, 77, D)
    a, b = ours(tiny, "a red circle"), ours(tiny, long_prompt(tiny))
    pa, pb = pad_to_same_length([a, b], empty)
    assert pb is b and pa.shape == b.shape
    np.testing.assert_array_equal(pa[:, :77], a)
    np.testing.assert_array_equal(pa[:, 77:154], empty)
    np.testing.assert_array_equal(pa[:, 154:], empty)
    with pytest.raises(ValueError, match="expected"):
        pad_to_same_length([a, b[:, :100]], empty)


def test_max_windows_cuts_like_the_classic_tokenizer(tiny):
    """syntax "none" with one window is exactly the 77-token conditioning the pipeline computed before."""
    prompt = long_prompt(tiny)
    with pytest.warns(UserWarning, match="the last 125 tokens were dropped"):
        one = encode_weighted(prompt, tiny.tok, tiny.encode, "none", max_windows=1)
    np.testing.assert_array_equal(one, tiny.encode(tiny.tok.encode(prompt).ids))
    whole = encode_weighted(prompt, tiny.tok, tiny.encode, "none")
    assert whole.shape == (1, 231, 32)


# ---------------------------------------------------------------- syntax detection and argument checks

DETECT = [
    ("a red circle on a blue background", "none"),
    ("a (red) circle", "a1111"),
    ("a (red:1.3) circle", "a1111"),
    ("a [red] circle", "a1111"),
    ("a red circle BREAK blue", "a1111"),
    ("an \\(escaped\\) bracket", "a1111"),
    ("a red++ circle", "compel"),
    ("a red+ circle", "compel"),
    ("a circle, blue-", "compel"),
    ("(a red circle)1.3", "compel"),
    ("(a red circle)-", "compel"),
    ('"a red circle"0.8', "compel"),
    ('("a", "b").blend(1, 1)', "compel"),
    ("red-haired, state-of-the-art", "none"),
    ("a 5-year-old (boy)", "a1111"),
]


@pytest.mark.parametrize("prompt,syntax", DETECT)
def test_detect_syntax(prompt, syntax):
    assert detect_syntax(prompt) == syntax


def test_mixed_syntax_is_refused():
    with pytest.raises(PromptError, match="syntax='a1111' or syntax='compel'") as e:
        detect_syntax("a red++ circle, (blue:1.2)")
    assert e.value.column == 22  # the ':1.2)'


def test_arguments_are_checked(tiny):
    for kw, message in [({"syntax": "sd"}, "expected one of"), ({"max_windows": 0}, "integer >= 1"),
                        ({"downweight": "drop"}, "expected one of")]:
        with pytest.raises(ValueError, match=message):
            encode_weighted("a cat", tiny.tok, tiny.encode, **kw)
    with pytest.raises(ValueError, match=r"expected \(1, 77, D\)"):
        encode_weighted("a cat", tiny.tok, lambda ids: np.zeros((77, 32), np.float32))


def test_runtime_import_needs_no_torch():
    code = ("import json, sys, edge.prompts; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'transformers', 'diffusers', 'compel'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_a1111_rule_on_a_text_encoder_with_zero_mean_tokens(bundles):
    """The tests' tiny text encoder's final layer norm has no bias, so each token's mean is 0 and A1111's rescale
    would divide 0 by 0 (a NaN, black picture): unweighted it is the plain encoding, weighted it stays finite."""
    from edge import Pipeline

    pipe = Pipeline.load(bundles["folder-epsilon"])
    prompt = "a red circle on a blue background"
    plain = pipe.encode_text(prompt, "", guided=True, copies=1, syntax="none")
    assert abs(float(plain[1].mean())) < 1e-6 * float(np.abs(plain[1]).mean())  # the case this is about
    assert np.array_equal(pipe.encode_text(prompt, "", guided=True, copies=1, syntax="a1111"), plain)
    weighted = pipe.encode_text("a (red:1.3) circle on a blue background", "", guided=True, copies=1, syntax="a1111")
    assert np.isfinite(weighted).all() and not np.array_equal(weighted, plain)
