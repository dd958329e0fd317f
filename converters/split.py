"""Cut one ONNX graph (the UNet) into sequential chunks that each load and run alone.

A device whose memory cannot hold the whole UNet runs it chunk by chunk, loading one chunk's weights at a
time, as Apple's `chunk_mlprogram.py` does for Core ML. Chunks are balanced by weight bytes, because weights
are what must fit; among the cut points near each balanced position, the one crossed by the fewest live
tensors wins, because every crossing tensor is an extra output to hold and an extra input to feed.

Cuts follow the graph's topological order. Graph inputs (timestep, encoder_hidden_states) are inputs of
every chunk that reads them; an activation made in chunk i and read in chunk j > i + 1 is an output of
chunk i and an input of chunk j. Weight-only nodes (Constant, Identity of an initializer, ...) are copied
into every chunk that reads them, so constants never cross a cut.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_tensor

from edge.converters.aligned import save_aligned

WINDOW = 0.1  # a cut may sit this fraction of an even share of weights away from its balanced position


def split_graph(
    model_path: Path | str,
    out_dir: Path | str,
    *,
    n: int | None = None,
    max_chunk_bytes: int | None = None,
    at: Sequence[str] | None = None,
    prefix: str = "unet",
    external_data_over: int = 0,
) -> list[dict]:
    """Write `model_path` as `n` chunks, or as the fewest whose weights each fit `max_chunk_bytes`; `at` cuts
    before the first node of each scope it names (node-name prefixes such as "/unet/up_blocks.1/", in graph
    order: the cuts DeepCache skips between), alone or with `n` / `max_chunk_bytes`, which then cut the parts
    between those scopes further (n chunks in all, shared out by weight).

    Files are `out_dir/{prefix}_chunk{i}.onnx`, each chunk's weights of 64 KiB and more page-aligned in its
    `.data` file (converters/aligned.py: onnxruntime maps them, so a chunk loaded for every call copies none;
    inline only where a chunk's weights total at most `external_data_over` bytes). Returns per chunk, in run
    order: file, files (with external data), inputs and outputs ({name, dtype, shape}; shape entries are ints or named dynamic dims, which
    onnx shape inference calls `unk__N` where it cannot carry a name through an op),
    graph_outputs (the original outputs it makes), weight_bytes, nodes, and part (which of the parts between
    the `at` scopes it belongs to; 0 without them).
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    if (n is not None and max_chunk_bytes is not None) or (n is None and max_chunk_bytes is None and at is None):
        raise ValueError(f"split_graph: give n or max_chunk_bytes, at, or at with one of them (got n={n}, "
                         f"max_chunk_bytes={max_chunk_bytes}, at={at})")
    model = onnx.load(str(model_path), load_external_data=False)  # weights are read chunk by chunk
    plan = _Plan(model)
    parts = [0, *(plan.scope_cuts(at, model_path.name) if at else []), len(plan.nodes)]
    spans = list(zip(parts, parts[1:]))
    if n is not None:
        if not len(spans) <= n <= len(plan.nodes):
            raise ValueError(f"split_graph: n={n}; {model_path.name} can be cut into {len(spans)}.."
                             f"{len(plan.nodes)} chunks")
        counts = _share(plan, spans, n)
        cuts = [c for (lo, hi), k in zip(spans, counts) for c in [*plan.cuts(k, lo, hi), hi]][:-1]
    elif max_chunk_bytes is not None:
        cuts = [c for lo, hi in spans for c in [*_fit(plan, max_chunk_bytes, model_path.name, lo, hi), hi]][:-1]
    else:
        cuts = parts[1:-1]
    out_dir.mkdir(parents=True, exist_ok=True)
    bounds = [0, *cuts, len(plan.nodes)]
    return [
        _write_chunk(model, plan, bounds[i], bounds[i + 1], out_dir / f"{prefix}_chunk{i}.onnx",
                     model_path.parent, external_data_over) | {"part": sum(p <= bounds[i] for p in parts[1:-1])}
        for i in range(len(bounds) - 1)
    ]


def _share(plan: "_Plan", spans: Sequence[tuple[int, int]], n: int) -> list[int]:
    """How many of n chunks each span gets: one each, the rest one at a time to the span whose chunks are heaviest
    (never more chunks than a span has nodes)."""
    counts = [1] * len(spans)
    for _ in range(n - len(spans)):
        open_ = [i for i, (lo, hi) in enumerate(spans) if counts[i] < hi - lo]
        i = max(open_, key=lambda i: (plan.cum[spans[i][1]] - plan.cum[spans[i][0]]) / counts[i])
        counts[i] += 1
    return counts


def run_chunks(chunks: Sequence[dict], feeds: dict[str, np.ndarray], folder: Path | str) -> dict[str, np.ndarray]:
    """Run chunks in order, one session alive at a time; returns the original graph's outputs by name."""
    from edge.sessions import open_session

    env = dict(feeds)
    last_use = {t["name"]: i for i, c in enumerate(chunks) for t in c["inputs"]}
    results: dict[str, np.ndarray] = {}
    for i, chunk in enumerate(chunks):
        session = open_session(Path(folder) / chunk["file"])
        names = [t["name"] for t in chunk["outputs"]]
        got = session.run(names, {t["name"]: env[t["name"]] for t in chunk["inputs"]})
        del session
        env.update(zip(names, got))
        results.update({k: env[k] for k in chunk["graph_outputs"]})
        env = {k: v for k, v in env.items() if last_use.get(k, -1) > i}  # drop what no later chunk reads
    return results


class _Plan:
    """The graph's computing nodes in order, the weight bytes each brings, and the tensors crossing each cut."""

    def __init__(self, model: onnx.ModelProto):
        self.all = list(model.graph.node)  # nodes are referred to by index into this list
        self.reads = [_reads(node) for node in self.all]  # inputs, with what Loop/If bodies read from outside
        self.inits = {t.name: t for t in model.graph.initializer}
        self.graph_outputs = [v.name for v in model.graph.output]
        # weight-only nodes: every input is an initializer or made by another weight-only node
        self.const_producer: dict[str, int] = {}
        for k, node in enumerate(self.all):
            if all(i == "" or i in self.inits or i in self.const_producer for i in self.reads[k]):
                self.const_producer.update({o: k for o in node.output})
        computing = [k for k, node in enumerate(self.all) if node.output[0] not in self.const_producer]
        self.nodes = _along(self.all, self.reads, computing, model.graph.input[0].name)
        self.types = _value_types(model)

        made_at = {o: i for i, k in enumerate(self.nodes) for o in self.all[k].output}
        last_use = {name: len(self.nodes) for name in self.graph_outputs}  # outputs cross every later cut
        seen: set[str] = set()
        weight = []  # bytes of the weights each node is first to read
        for i, k in enumerate(self.nodes):
            for name in self.reads[k]:
                if name in made_at:
                    last_use[name] = max(last_use.get(name, 0), i)
            new = self.weights_of([k]) - seen
            seen |= new
            weight.append(sum(self._bytes(w) for w in new))
        self.cum = np.concatenate([[0], np.cumsum(weight)])  # cum[p]: weight before cut p
        live = np.zeros(len(self.nodes) + 2, dtype=np.int64)  # difference arrays over cut positions
        untyped = np.zeros(len(self.nodes) + 2, dtype=np.int64)
        for name, i in made_at.items():
            if last_use.get(name, i) > i:  # live across cuts i + 1 ..= last use
                live[i + 1] += 1
                live[last_use[name] + 1] -= 1
                untyped[i + 1] += name not in self.types
                untyped[last_use[name] + 1] -= name not in self.types
        # a tensor without a known type cannot be declared as a chunk input: never cut across one
        self.crossing = np.where(np.cumsum(untyped) > 0, np.iinfo(np.int64).max // 2, np.cumsum(live))

    def closure(self, ks: Sequence[int]) -> list[int]:
        """The weight-only nodes that nodes `ks` read, directly or through each other, in graph order."""
        found: set[int] = set()
        stack = [i for k in ks for i in self.reads[k] if i in self.const_producer]
        while stack:
            k = self.const_producer[stack.pop()]
            if k not in found:
                found.add(k)
                stack += [i for i in self.reads[k] if i in self.const_producer]
        return sorted(found)

    def weights_of(self, ks: Sequence[int]) -> set[str]:
        """Initializers and Constant outputs that nodes `ks` need."""
        ks = (*self.closure(ks), *ks)
        return ({i for k in ks for i in self.reads[k] if i in self.inits}
                | {self.all[k].output[0] for k in ks if self.all[k].op_type == "Constant"})

    def _bytes(self, name: str) -> int:
        if name in self.inits:
            return _tensor_bytes(self.inits[name])
        values = [a.t for a in self.all[self.const_producer[name]].attribute if a.name == "value"]
        return _tensor_bytes(values[0]) if values else 0

    def chunk_bytes(self, start: int, stop: int) -> int:
        return sum(self._bytes(w) for w in self.weights_of(self.nodes[start:stop]))

    def scope_cuts(self, scopes: Sequence[str], name: str) -> list[int]:
        """The position of the first computing node of each scope; each must come after the one before, and no
        tensor of unknown type may cross it."""
        cuts: list[int] = []
        for scope in scopes:
            found = [i for i, k in enumerate(self.nodes) if self.all[k].name.startswith(scope)]
            if not found or found[0] <= (cuts[-1] if cuts else 0):
                raise ValueError(f"split_graph: {name} has no computing node in scope {scope!r} after the "
                                 "previous cut")
            if self.crossing[found[0]] >= np.iinfo(np.int64).max // 4:
                raise ValueError(f"split_graph: a tensor of unknown type crosses {name}'s cut at {scope!r}")
            cuts.append(found[0])
        return cuts

    def cuts(self, n: int, lo: int = 0, hi: int | None = None) -> list[int]:
        """n - 1 cut positions between positions lo and hi: near k/n of the weights there, fewest crossing
        tensors, then nearest, then earliest."""
        hi = len(self.nodes) if hi is None else hi
        share = (self.cum[hi] - self.cum[lo]) / n
        cuts: list[int] = []
        for k in range(1, n):
            first, last = (cuts[-1] if cuts else lo) + 1, hi - (n - k)  # leave a node for each chunk
            positions = np.arange(first, last + 1)
            target = self.cum[lo] + k * share
            distance = np.abs(self.cum[positions] - target)
            window = positions[distance <= max(WINDOW * share, distance.min())]
            cuts.append(int(min(window, key=lambda p: (self.crossing[p], abs(self.cum[p] - target), p))))
        return cuts


def _fit(plan: _Plan, max_chunk_bytes: int, name: str, lo: int = 0, hi: int | None = None) -> list[int]:
    """The fewest cuts between positions lo and hi that leave every chunk's weights within max_chunk_bytes."""
    hi = len(plan.nodes) if hi is None else hi
    biggest = max(plan.chunk_bytes(i, i + 1) for i in range(lo, hi))
    if max_chunk_bytes < biggest:
        raise ValueError(f"split_graph: max_chunk_bytes={max_chunk_bytes} is below the {biggest} bytes of the "
                         f"largest single node of {name}; no split fits")
    for n in range(max(1, math.ceil((plan.cum[hi] - plan.cum[lo]) / max_chunk_bytes)), hi - lo + 1):
        cuts = plan.cuts(n, lo, hi)
        bounds = [lo, *cuts, hi]
        if all(plan.chunk_bytes(a, b) <= max_chunk_bytes for a, b in zip(bounds, bounds[1:])):
            return cuts
    raise AssertionError("one node per chunk always fits")


def _write_chunk(model: onnx.ModelProto, plan: _Plan, start: int, stop: int, path: Path, base_dir: Path,
                 external_data_over: int) -> dict:
    ks = plan.nodes[start:stop]
    nodes = [plan.all[k] for k in ks]
    made = {o for node in nodes for o in node.output}
    later = {i for k in plan.nodes[stop:] for i in plan.reads[k]}
    inputs = list(dict.fromkeys(i for k in ks for i in plan.reads[k]
                                if i and i not in made and i not in plan.inits and i not in plan.const_producer))
    outputs = [o for node in nodes for o in node.output if o in later or o in plan.graph_outputs]
    inits = []
    for name in sorted(plan.weights_of(ks) & set(plan.inits)):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(plan.inits[name])
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(tensor, str(base_dir))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        inits.append(tensor)
    graph = onnx.helper.make_graph(
        [plan.all[k] for k in (*plan.closure(ks), *ks)], path.stem,
        [plan.types[i] for i in inputs], [plan.types[o] for o in outputs], inits,
    )
    chunk = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                                   producer_name="edge-diffusion split")
    weight_bytes = plan.chunk_bytes(start, stop)
    if weight_bytes > external_data_over:  # weights page-aligned in a .data file: onnxruntime maps them
        files = save_aligned(chunk, path)
    else:
        path.with_name(path.name + ".data").unlink(missing_ok=True)
        onnx.save_model(chunk, str(path))
        files = [path.name]
    del chunk, graph, inits
    onnx.checker.check_model(str(path))
    return {
        "file": path.name,
        "files": files,
        "inputs": [_describe(plan.types[i]) for i in inputs],
        "outputs": [_describe(plan.types[o]) for o in outputs],
        "graph_outputs": [o for o in outputs if o in plan.graph_outputs],
        "weight_bytes": weight_bytes,
        "nodes": len(nodes),
    }


def _along(nodes: Sequence[onnx.NodeProto], reads: Sequence[list[str]], order: list[int], stream: str) -> list[int]:
    """`order` re-sorted so that nodes which do not depend on the `stream` input (the UNet's sample) sit just
    before their first reader, and the rest keep their order: a cut before a block's first node then has all the
    block's work after it. onnxruntime's quantizer moves work on the other inputs to the front of the graph
    (every cross-attention key and value of encoder_hidden_states), where a scope cut would leave it behind."""
    on_stream = {stream}
    depends = {}
    for k in order:
        depends[k] = any(i in on_stream for i in reads[k])
        if depends[k] and nodes[k].op_type not in ("Shape", "Size"):  # the time embedding reads the batch size
            on_stream.update(nodes[k].output)
    readers: dict[str, list[int]] = {}
    for k in order:
        for i in reads[k]:
            readers.setdefault(i, []).append(k)
    key: dict[int, float] = {}
    for k in reversed(order):  # a reader's key is known before its producer's (the order is topological)
        later = [key[r] for o in nodes[k].output for r in readers.get(o, ()) if r in key]
        key[k] = float(k) if depends[k] or not later else min(later) - 0.5
    return sorted(order, key=lambda k: (key[k], k))


def _reads(node: onnx.NodeProto) -> list[str]:
    """A node's inputs plus the outer-scope tensors its subgraphs (Loop, If, Scan bodies) use by name."""
    names = list(node.input)
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {i.name for i in g.input} | {t.name for t in g.initializer}
            for sub in g.node:
                names += [i for i in _reads(sub) if i and i not in inner]
                inner |= set(sub.output)
    return list(dict.fromkeys(names))


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Type and shape of every tensor, symbolic dims kept (onnx names the ones it cannot name `unk__N`)."""
    inferred = onnx.shape_inference.infer_shapes(model)  # weights are not loaded: small at any model size
    types = {v.name: v for v in inferred.graph.value_info if v.type.tensor_type.elem_type}
    types.update({v.name: v for v in (*model.graph.input, *model.graph.output)})  # the export's own names
    return types


def _describe(value: onnx.ValueInfoProto) -> dict:
    t = value.type.tensor_type
    shape = ([d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
             if t.HasField("shape") else None)  # None: rank unknown
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
