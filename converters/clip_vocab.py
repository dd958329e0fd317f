"""Build the CLIP BPE tokenizer files (vocab.json, merges.txt) from OpenAI's merge list.

No model hub is reachable here, so the tokenizer that every SD 1.x/2.x model uses is rebuilt
from `bpe_simple_vocab_16e6.txt.gz`, which the `open_clip_torch` wheel ships. The result is
byte-identical in content to the Hub's `openai/clip-vit-large-patch14` tokenizer: 49,408 tokens.

    python -m edge.converters.clip_vocab path/to/bpe_simple_vocab_16e6.txt.gz OUT_DIR

The built files are committed under `converters/assets/clip_tokenizer/`; this script is how
they were made.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 256 * 2 - 2  # byte tokens, byte+</w> tokens, two specials


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build(gz_path: Path, out_dir: Path) -> None:
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{gz_path}: built {len(vocab)} tokens, expected {VOCAB_SIZE}; is this CLIP's merge list?")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gz", type=Path)
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    build(a.gz, a.out)
