"""Small read-only index over an ONNX graph plus a node builder: producers, consumers,
constants, opset-aware op emission and a stable topological sort. Pure onnx + numpy."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import UnsafeLocationError


class GraphIndex:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = {i.name for i in self.graph.input} - set(self.initializers)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self._dep_memo: dict[str, bool] = {}

    def const_value(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant output (None when computed or not loaded).

        Only reads inline data: a weight kept in external data is never pulled into memory.
        """
        t = self.initializers.get(name)
        if t is None:
            node = self.producer.get(name)
            if node is None or node.op_type != "Constant":
                return None
            for a in node.attribute:
                if a.name == "value":
                    t = a.t
                elif a.name in ("value_float", "value_int"):
                    return np.array(helper.get_attribute_value(a))
                elif a.name in ("value_floats", "value_ints"):
                    return np.array(helper.get_attribute_value(a))
            if t is None:
                return None
        if t.data_location == TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(t)

    def const_dims(self, name: str) -> list[int] | None:
        """Dims of an initializer or Constant tensor, without loading external data."""
        t = self.initializers.get(name)
        if t is not None:
            return list(t.dims)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return list(a.t.dims)
        return None

    def is_data_independent(self, name: str) -> bool:
        """True when `name` does not depend on input data (constants, or computed from Shape).

        Iterative with a memo: a 40-block ViT-g chain is deeper than Python's recursion limit.
        """
        memo = self._dep_memo
        stack = [name]
        while stack:
            t = stack[-1]
            if t in memo:
                stack.pop()
                continue
            if t in self.initializers:
                memo[t] = True
            elif t in self.graph_inputs:
                memo[t] = False
            else:
                node = self.producer.get(t)
                if node is None:
                    memo[t] = False
                elif node.op_type in ("Constant", "Shape", "Size"):
                    memo[t] = True
                else:
                    pending = [i for i in node.input if i and i not in memo]
                    if pending:
                        stack.extend(pending)
                        continue
                    memo[t] = all(memo[i] for i in node.input if i)
            stack.pop()
        return memo[name]

    def is_scalar_const(self, name: str) -> bool:
        """A data-independent operand of size 1 (a scale)."""
        if not self.is_data_independent(name):
            return False
        dims = self.const_dims(name)
        if dims is not None:
            return int(np.prod(dims)) == 1
        return True  # computed from shapes only: the exporters' sqrt(1/sqrt(Dh)) chains

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def ancestors_ops(self, name: str, limit: int = 100000) -> set[str]:
        out: set[str] = set()
        stack, seen = [name], set()
        while stack and len(seen) < limit:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            node = self.producer.get(t)
            if node is not None:
                out.add(node.op_type)
                stack.extend(i for i in node.input if i)
        return out


class Builder:
    """Emits nodes and constants with a name prefix, choosing attribute vs input forms by opset."""

    def __init__(self, index: GraphIndex, prefix: str):
        self.ix = index
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._n = 0
        taken = set(index.producer) | set(index.initializers) | {i.name for i in index.graph.input}
        self._taken = taken

    def name(self, hint: str) -> str:
        self._n += 1
        n = f"{self.prefix}/{hint}_{self._n}"
        while n in self._taken:
            self._n += 1
            n = f"{self.prefix}/{hint}_{self._n}"
        self._taken.add(n)
        return n

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: Iterable[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1, hint: str | None = None) -> str:
        # axes moved from attribute to input: ReduceSum at opset 13, the other reductions at 18
        as_input = self.ix.opset >= (13 if op_type == "ReduceSum" else 18)
        if as_input:
            return self.op(op_type, [x, self.const("axes", np.array(axes, dtype=np.int64))], hint, keepdims=keepdims)
        return self.op(op_type, [x], hint, axes=axes, keepdims=keepdims)

    def insert_into(self, model: onnx.ModelProto) -> None:
        """Add the emitted initializers and nodes to `model`, its nodes then sorted topologically."""
        model.graph.initializer.extend(self.initializers)
        available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
        nodes = toposort(list(model.graph.node) + self.nodes, available)
        del model.graph.node[:]
        model.graph.node.extend(nodes)

    def slice_last(self, x: str, start: int, end: int | None = None, hint: str | None = None) -> str:
        stop = np.iinfo(np.int64).max if end is None else end
        return self.op(
            "Slice",
            [
                x,
                self.const("starts", np.array([start], dtype=np.int64)),
                self.const("ends", np.array([stop], dtype=np.int64)),
                self.const("axes", np.array([-1], dtype=np.int64)),
            ],
            hint,
        )


def op_counts(nodes: Iterable[onnx.NodeProto]) -> dict[str, int]:
    """How many nodes of each op type (a pass result's "inserted ops")."""
    ops: dict[str, int] = {}
    for n in nodes:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def live_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` without those none of whose outputs reach `outputs` (the graph outputs)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    live, stack = set(), [producer[o] for o in outputs if o in producer]
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        stack.extend(producer[x] for x in _all_inputs(nodes[i]) if x in producer)
    return [n for i, n in enumerate(nodes) if i in live]


def remove_dead(model: onnx.ModelProto, read_before: set[str] | None = None) -> None:
    """The graph cleanup after a rewrite, in place: nodes that no longer reach a graph output are
    dropped, then the initializers only they read (an initializer nobody read before, named in
    neither `read_before` nor a remaining node, is kept: it was not ours to drop), the value_info of
    tensors that are gone, and the nodes are sorted topologically."""
    g = model.graph
    before = read_before if read_before is not None else {i for n in g.node for i in _all_inputs(n)}
    kept = live_nodes(list(g.node), {o.name for o in g.output})
    used = {i for n in kept for i in _all_inputs(n)}
    inits = [t for t in g.initializer if t.name in used or t.name not in before]
    del g.initializer[:]
    g.initializer.extend(inits)
    available = {i.name for i in g.input} | {t.name for t in g.initializer}
    kept = toposort(kept, available)
    del g.node[:]
    g.node.extend(kept)
    produced = {o for n in kept for o in n.output} | available
    vi = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(vi)


def toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Stable Kahn sort: keeps the original order wherever dependencies allow."""
    produced_by: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            produced_by[o] = i
    deps: list[set[int]] = []
    users: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        d = {produced_by[x] for x in _all_inputs(n) if x in produced_by and x not in available and produced_by[x] != i}
        deps.append(d)
        for j in d:
            users.setdefault(j, []).append(i)
    ready = [i for i, d in enumerate(deps) if not d]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            deps[u].discard(i)
            if not deps[u]:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle after rewriting")
    return [nodes[i] for i in order]


def _all_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node including those used implicitly by its subgraphs (If/Loop bodies)."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        gs = list(a.graphs) + ([a.g] if a.HasField("g") else [])
        for g in gs:
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                names.extend(i for i in _all_inputs(n) if i not in inner)
    return names


def elem_type_of(model: onnx.ModelProto, name: str) -> int | None:
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if v.name == name and v.type.tensor_type.elem_type:
            return v.type.tensor_type.elem_type
    return None


def infer_weight_free(model: onnx.ModelProto, *, keep_small: int = 0, data_prop: bool = False,
                      keep_value_info: bool = True) -> onnx.ModelProto:
    """onnx shape inference on a weight-free copy: initializers become typed graph inputs, so inline
    weights are neither copied nor scanned. Inline initializers of at most `keep_small` elements
    stay (shape targets, scales), so that data propagation can carry Reshape targets.
    keep_value_info=False ignores the graph's own value_info (trust inference alone). Best effort:
    when inference fails the un-inferred copy is returned."""
    g = model.graph
    small = [t for t in g.initializer
             if t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims)) <= keep_small] if keep_small else []
    small_names = {t.name for t in small}
    typed = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in g.initializer if t.name not in small_names]
    init_names = {t.name for t in g.initializer}
    light_graph = helper.make_graph(
        list(g.node), g.name or "g", [i for i in g.input if i.name not in init_names] + typed, list(g.output),
        initializer=small, value_info=list(g.value_info) if keep_value_info else None,
    )
    light = helper.make_model(light_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    light.functions.extend(model.functions)
    try:
        return onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=data_prop)
    except Exception:  # noqa: BLE001 - inference is best effort; callers fall back
        return light


def infer_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of every tensor (infer_weight_free)."""
    inferred = infer_weight_free(model)
    out = {t.name: t.data_type for t in model.graph.initializer}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.tensor_type.elem_type:
            out[v.name] = v.type.tensor_type.elem_type
    return out


def all_tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers and Constant/attribute tensors, subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for g in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                yield from all_tensors(g)


_TENSOR_HOLDERS = ("GraphProto", "NodeProto", "AttributeProto", "TensorProto", "SparseTensorProto", "FunctionProto",
                   "ModelProto", "TrainingInfoProto")


def external_tensors(model: onnx.ModelProto):
    """(tensor, its "location" entry) for every external-data tensor anywhere in `model`: initializers,
    sparse tensors, attributes, functions, subgraphs. Raw data is never touched."""
    stack = [model]
    while stack:
        m = stack.pop()
        if isinstance(m, TensorProto):
            if m.data_location == TensorProto.EXTERNAL:
                yield from ((m, kv) for kv in m.external_data if kv.key == "location")
            continue
        for field, value in m.ListFields():
            if field.message_type is not None and field.message_type.name in _TENSOR_HOLDERS:
                if hasattr(value, "ListFields"):  # a single message, else a repeated field
                    stack.append(value)
                else:
                    stack.extend(value)


def external_locations(model: onnx.ModelProto) -> list[str]:
    """Relative paths of the external data files a model references (weights need not be loaded)."""
    return sorted({kv.value for _, kv in external_tensors(model)})


def relocate_external(model: onnx.ModelProto, old: str, new: str) -> None:
    """Point every tensor stored in the external file `old` at `new` (same offsets)."""
    for _, kv in external_tensors(model):
        if kv.value == old:
            kv.value = new


def resolve_external_location(base_dir: str | Path, location: str, model_file: str | Path | None = None) -> Path:
    """The file an external-data `location` names, checked by ONNX Runtime's rule: relative, no '..'
    component, no drive or ':', and (symlinks followed, '\\' read both as a character and as a separator)
    inside `base_dir`; not a folder, not `model_file` itself. Raises UnsafeLocationError otherwise."""
    base = Path(base_dir).resolve()
    forms = [PurePosixPath(loc) for loc in dict.fromkeys((location, location.replace("\\", "/")))]
    if not location.strip() or "\x00" in location or ":" in location or location.startswith(("/", "\\")) \
            or any(r.is_absolute() or ".." in r.parts or not r.parts for r in forms):
        raise UnsafeLocationError(
            f"external-data location {location!r} is not a plain relative path inside the model's folder (empty, "
            "absolute, drive-letter and '..' paths are refused); re-save the model with its .data file beside it")
    try:
        targets = [(base / r).resolve() for r in forms]
    except (OSError, RuntimeError) as e:  # symlink loops
        raise UnsafeLocationError(f"external-data location {location!r} cannot be resolved ({e}); "
                                  "replace the link with the data file") from None
    if any(base not in t.parents for t in targets):
        raise UnsafeLocationError(
            f"external-data location {location!r} resolves outside the model's folder {base} (through a "
            "symlink); copy the data file into that folder instead of linking it")
    target = targets[0]
    if model_file is not None and target == Path(model_file).resolve():
        raise UnsafeLocationError(f"external-data location {location!r} is the .onnx file itself; "
                                  "re-save the model with a separate .data file")
    if target.exists() and not target.is_file():
        raise UnsafeLocationError(f"external-data location {location!r} is a folder or a special file, not a "
                                  "regular file inside the model's folder; re-save the model with its .data file")
    return target


def check_external_data(model: onnx.ModelProto, base_dir: str | Path, *,
                        model_file: str | Path | None = None) -> list[Path]:
    """Resolve every external-data location of `model` safely (see resolve_external_location), looking
    at every tensor anywhere in the model (initializers, sparse tensors, attributes, functions, subgraphs);
    returns the files in sorted-location order, as external_locations lists them."""
    return [resolve_external_location(base_dir, loc, model_file) for loc in external_locations(model)]
