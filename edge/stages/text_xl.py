"""SDXL's text conditioning: (prompt, negative prompt, size) -> the UNet's context, (B, 77k + 2, D1 + D2).

Both text encoders' penultimate hidden states side by side, each encoder's weighted and windowed on its own as
edge.prompts does for one (compel and A1111 weight SDXL's encoders so: A1111 restores each encoder's window mean
separately), then the added conditions as the last two rows
(converters/sdxl.py): the second encoder's pooled embedding of the prompt, and the time ids (original size, crop
top-left, target size; diffusers' defaults: the generation's size, no crop). Without a negative prompt, SDXL
bundles whose model says `force_zeros_for_empty_prompt` condition the unguided half on zeros, as diffusers does.

The refiner has the second encoder only: its states are the whole text part, and its time ids end in an aesthetic
score instead of the target size (the manifest's: 6 for the prompt, 2.5 for the negative, diffusers' defaults).

The encoders run one after the other, the first on every window before the second is opened, so under a memory
budget (`one_at_a_time`) the first is freed before the second loads: the stage holds the larger of the two, not
both (full-size SDXL int8: 0.75 against 0.85 GB, measured).
"""

from __future__ import annotations

import numpy as np

from edge.graphs import Graphs
from edge.prompts import encode_pair, encode_weighted, parse_prompt
from edge.prompts.parsed import Blend, Fragment
from edge.stages.text import windows_allowed
from edge.tokenizer import ClipTokenizer


def second_ids(ids: np.ndarray, eos: int, pad: int) -> np.ndarray:
    """(B, 77) ids of the first tokenizer as the second tokenizes them: the same tokens, padded with its own
    pad id after each row's first end-of-text (SDXL's second tokenizer pads with "!", id 0)."""
    out = ids.copy()
    for row in out:
        ends = np.flatnonzero(row == eos)
        if len(ends):
            row[ends[0] + 1:] = pad
    return out


def pooled_text(prompt: str, syntax: str) -> str:
    """What the pooled embedding is taken of: the prompt's words without weighting syntax, as A1111 pools its
    first window's tokens; compel pools the prompt as written, syntax and all (compel.py: get_pooled_embeddings of
    the text it was given), so compel-syntax prompts are pooled as written."""
    parsed = parse_prompt(prompt, syntax)
    if parsed.syntax == "compel":
        return prompt
    part = parsed.parts[0]
    fragments = part.prompts[0] if isinstance(part, Blend) else part
    return "".join(f.text for f in fragments if isinstance(f, Fragment))


def condition_rows(pooled: np.ndarray, time_ids: list[float], width: int) -> np.ndarray:
    """(1, 2, width): the pooled embedding (1, P) and the time ids, each zero-padded to the context's width."""
    rows = np.zeros((1, 2, width), np.float32)
    rows[0, 0, : pooled.shape[-1]] = pooled[0]
    rows[0, 1, : len(time_ids)] = time_ids
    return rows


def encode_text_xl(graphs: Graphs, tokenizer: ClipTokenizer, prompt: str, negative_prompt: str, guided: bool,
                   copies: int, syntax: str, size: tuple[int, int], one_at_a_time: bool = False) -> np.ndarray:
    """(2N, L + 2, D) as [unconditional x N, conditional x N] when guided, else (N, L + 2, D). `one_at_a_time`:
    the first text encoder is freed before the second is loaded."""
    cond = graphs.manifest.conditioning
    refiner = cond.get("encoders") == ["text_encoder_2"]
    windows = windows_allowed(graphs)

    def weighted(encode_masked) -> list[np.ndarray]:  # [negative, prompt] or [prompt], (1, L, D) each
        how = {"encode_masked": encode_masked, "downweight": "mask"}
        encode = lambda ids: encode_masked(ids, np.ones_like(ids))  # noqa: E731
        if not guided:
            return [encode_weighted(prompt, tokenizer, encode, syntax, windows, **how)]
        return list(encode_pair(prompt, negative_prompt, tokenizer, encode, syntax, windows, **how))[::-1]

    parts = []  # each encoder's states, in the order the context lays them side by side
    if not refiner:
        first = graphs.open("text_encoder")[0]
        parts.append(weighted(lambda ids, mask: graphs.run("text_encoder", first, {"input_ids": ids,
                                                                                    "attention_mask": mask})[0]))
        del first
        if one_at_a_time:
            graphs.free("text_encoder")
    second = graphs.open("text_encoder_2")[0]

    def run_second(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:  # [(1, 77, D2), (1, P)]
        feeds = {"input_ids": second_ids(ids, tokenizer.eos_id, cond["pad_id_2"]), "attention_mask": mask}
        return graphs.run("text_encoder_2", second, feeds)

    def pooled(text: str) -> np.ndarray:  # (1, P), of the prompt's first 77 tokens, as diffusers takes it
        ids = tokenizer.encode(pooled_text(text, syntax)).ids
        return run_second(ids, np.ones_like(ids))[1]

    parts.append(weighted(lambda ids, mask: run_second(ids, mask)[0]))
    states = [np.concatenate(s, axis=-1) for s in zip(*parts)]
    h, w = size
    time_ids = [float(h), float(w), 0.0, 0.0, float(h), float(w)][: cond["time_ids"]]
    negative_ids = time_ids
    if "aesthetic_score" in cond:  # the refiner: original size, crop, aesthetic score
        time_ids, negative_ids = ([*time_ids[:4], float(cond[k])] for k in ("aesthetic_score",
                                                                              "negative_aesthetic_score"))
    zeros = cond.get("force_zeros_for_empty_prompt", True) and not negative_prompt
    extras = [pooled(negative_prompt), pooled(prompt)] if guided else [pooled(prompt)]
    if guided and zeros:
        states[0], extras[0] = np.zeros_like(states[1]), np.zeros_like(extras[1])
    width = states[-1].shape[-1]
    ids = [negative_ids, time_ids] if guided else [time_ids]
    rows = [np.concatenate([s, condition_rows(p, i, width)], axis=1) for s, p, i in zip(states, extras, ids)]
    return np.concatenate([np.repeat(r, copies, axis=0) for r in rows]).astype(np.float32)  # (B, L + 2, D)
