"""Attention kernels: four ways to compute softmax(q kᵀ · scale) v, chosen at convert time by name.

Every kernel has the same signature and the same result (to float rounding):

    kernel(q, k, v, heads, chunk=None, scale=None) -> out
        q      (B, Sq, C)   queries, heads packed along channels (C = heads * d)
        k, v   (B, Sk, C)   keys and values (Sk = Sq for self-attention, 77 for text cross-attention)
        heads  int          number of heads; C must divide by it
        chunk  int | None   query rows per slice; only `sliced` uses it (and needs it; the CLI defaults it)
        scale  float | None score scale; None means d ** -0.5
        out    (B, Sq, C)

They differ only in the graph they leave behind when a module that calls them is exported:

| kernel         | largest intermediate        | use when |
|----------------|-----------------------------|----------|
| `original`     | (B·heads, Sq, Sk) scores    | memory is plentiful, or the runtime fuses attention |
| `sliced`       | (B·heads, chunk, Sk) scores | peak memory matters (SD 1.5, 512 px: 512 MiB of scores) |
| `split_einsum` | (B, Sk, 1, Sq) per head     | Core ML / the Neural Engine, which runs per-head einsums |
|                |                             | in (B, C, 1, S) well; on onnxruntime CPU it is ~10x slower |
| `fused`        | tiles of the scores, inside | onnxruntime: one `com.microsoft.MultiHeadAttention` node,|
|                | onnxruntime's kernel        | which runs flash attention on CPU (SD 1.5 64x64 self-    |
|                |                             | attention: 0.23 s vs 0.60 s as MatMul-Softmax-MatMul)    |

Measured peaks: benchmarks/attention_memory.py.

Pick one with `get_kernel(name)`; nothing here reads a global or patches a library.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

Kernel = Callable[..., torch.Tensor]

# `sliced`'s chunk when none is asked for (`edge convert --attention sliced`). SD 1.5's largest attention is the
# self-attention at the 64x64 latent of a 512 px image: 4096 query rows and keys, 8 heads, so its whole score
# matrix is 8 x 4096 x 4096 float32 = 512 MiB per image. 1024 rows hold it to 128 MiB (a quarter; 4 slices per
# call), and it is the chunk the SD 1.5 memory-budget runs in benchmarks/RESULTS.md were measured with.
DEFAULT_CHUNK = 1024


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, c = x.shape
    return x.reshape(b, s, heads, c // heads).transpose(1, 2).reshape(b * heads, s, c // heads)  # (B·H, S, d)


def _merge_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    bh, s, d = x.shape
    return x.reshape(bh // heads, heads, s, d).transpose(1, 2).reshape(bh // heads, s, heads * d)  # (B, S, C)


def _scale(q: torch.Tensor, heads: int, scale: float | None) -> float:
    return (q.shape[-1] // heads) ** -0.5 if scale is None else scale


def original(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
             chunk: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Plain softmax(q kᵀ) v over all query rows at once: the reference, and the fastest where memory allows."""
    s = _scale(q, heads, scale)
    q = _split_heads(q * s, heads)  # (B·H, Sq, d); scaled here, where it is Sk/d times cheaper than on the scores
    k, v = _split_heads(k, heads), _split_heads(v, heads)  # (B·H, Sk, d)
    scores = torch.matmul(q, k.transpose(1, 2))  # (B·H, Sq, Sk)
    out = torch.matmul(scores.softmax(dim=-1), v)  # (B·H, Sq, d)
    return _merge_heads(out, heads)  # (B, Sq, C)


def _query_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    # q (B·H, Sq, d) already scaled, k and v (B·H, Sk, d). Compiled by TorchScript below, so that the loop
    # over query rows is exported as one ONNX Loop whose trip count is ceil(Sq / chunk) at run time. A Python
    # loop would be unrolled by the tracer into slices with the trace's constant bounds: wrong at other sizes.
    kt = k.transpose(1, 2)  # (B·H, d, Sk)
    rows: list[torch.Tensor] = []
    for start in range(0, q.shape[1], chunk):
        scores = torch.matmul(q[:, start:start + chunk], kt)  # (B·H, ≤chunk, Sk)
        rows.append(torch.matmul(scores.softmax(dim=-1), v))  # (B·H, ≤chunk, d)
    return torch.cat(rows, dim=1)  # (B·H, Sq, d)


with warnings.catch_warnings():
    # TorchScript is deprecated, as is the TorchScript-based ONNX exporter the converter uses; the two go together.
    warnings.simplefilter("ignore", DeprecationWarning)
    _query_chunks_scripted = torch.jit.script(_query_chunks)


def sliced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
           chunk: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Query rows `chunk` at a time, so no score tensor exceeds (B·heads, chunk, Sk) at any input size.

    Use it where peak memory matters more than speed. Exported, it is an ONNX Loop (trip count computed from
    the run-time sequence length), not an unrolled chain of slices, so the bound holds at every latent size.
    """
    assert chunk is not None and chunk > 0, f"sliced needs a positive chunk, got {chunk!r}"
    s = _scale(q, heads, scale)
    q = _split_heads(q * s, heads)  # (B·H, Sq, d)
    k, v = _split_heads(k, heads), _split_heads(v, heads)  # (B·H, Sk, d)
    out = _query_chunks_scripted(q, k, v, chunk)  # (B·H, Sq, d)
    return _merge_heads(out, heads)  # (B, Sq, C)


def split_einsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 chunk: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Apple's ANE form: (B, C, 1, S) layout, one einsum per head, softmax over keys on axis 1.

    Use it for graphs headed to Core ML / the Neural Engine, which handles 4-D channel-first tensors and many
    small einsums better than batched 3-D matmuls. The transposes in and out are the price of the shared
    (B, S, C) signature; a model kept in (B, C, 1, S) throughout, as Apple's is, would not need them.
    """
    s = _scale(q, heads, scale)
    d = q.shape[-1] // heads
    q = (q * s).transpose(1, 2).unsqueeze(2)  # (B, C, 1, Sq)
    k = k.transpose(1, 2).unsqueeze(2)  # (B, C, 1, Sk)
    v = v.transpose(1, 2).unsqueeze(2)  # (B, C, 1, Sk)
    qs = q.split(d, dim=1)  # heads × (B, d, 1, Sq)
    ks = k.transpose(1, 3).split(d, dim=3)  # heads × (B, Sk, 1, d)
    vs = v.split(d, dim=1)  # heads × (B, d, 1, Sk)
    weights = [torch.einsum("bchq,bkhc->bkhq", qh, kh) for qh, kh in zip(qs, ks)]  # heads × (B, Sk, 1, Sq)
    weights = [w.softmax(dim=1) for w in weights]  # heads × (B, Sk, 1, Sq)
    outs = [torch.einsum("bkhq,bchk->bchq", w, vh) for w, vh in zip(weights, vs)]  # heads × (B, d, 1, Sq)
    out = torch.cat(outs, dim=1)  # (B, C, 1, Sq)
    return out.squeeze(2).transpose(1, 2)  # (B, Sq, C)


@torch.library.custom_op("edge::multi_head_attention", mutates_args=())
def _multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """`original` as one opaque torch op, so that the exporter sees a single node it can translate (below)."""
    return original(q, k, v, heads, None, scale)


@_multi_head_attention.register_fake
def _(q, k, v, heads, scale):
    return torch.empty_like(q)  # (B, Sq, C)


def _multi_head_attention_onnx(g, q, k, v, heads, scale):
    """TorchScript-exporter translation: onnxruntime's contrib node, q/k/v in (B, S, C), heads and scale as attributes."""
    from torch.onnx import symbolic_helper

    out = g.op("com.microsoft::MultiHeadAttention", q, k, v,
               num_heads_i=symbolic_helper._get_const(heads, "i", "heads"),
               scale_f=symbolic_helper._get_const(scale, "f", "scale"))
    out.setType(q.type())  # (B, Sq, C)
    return out


torch.onnx.register_custom_op_symbolic("edge::multi_head_attention", _multi_head_attention_onnx, 1)


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
          chunk: int | None = None, scale: float | None = None) -> torch.Tensor:
    """onnxruntime's own attention: exported as one `com.microsoft.MultiHeadAttention` node (q, k, v in (B, S, C)).

    Use it for ONNX bundles run by onnxruntime (every standard build, x86 and ARM, has the contrib ops): its CPU
    kernel is flash attention — the score matrix is processed in cache-sized tiles and never materialised — so
    it is both the fastest and the leanest kernel there. Other ONNX runtimes do not know the node, and Core ML
    conversion does not go through ONNX; in torch it computes exactly `original`.
    """
    return _multi_head_attention(q, k, v, heads, float(_scale(q, heads, scale)))


KERNELS: dict[str, Kernel] = {"original": original, "sliced": sliced, "split_einsum": split_einsum, "fused": fused}


def get_kernel(name: str) -> Kernel:
    """The kernel called `name`; a ValueError that lists the known names otherwise."""
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; expected one of {', '.join(KERNELS)}")
    return KERNELS[name]
