"""Recognise an ITAE subgraph by its structure, whatever its node and tensor names and metadata.

What apply_itae inserts around an attention Softmax (itae.py), matched from the Softmax backwards:

    src (q | k^T | v) --[Cast]--> ReduceSumSquare --[Transpose]--> Sqrt --[Transpose]--> norms
        (also accepted: ReduceL2(src), Sqrt(ReduceSum(src*src | src^2)))
    norms --Greater|Less(threshold)--> ... And/Not/Cast/Unsqueeze ... --> cond
    threshold: a constant (absolute) or computed from the norms (relative)

    logit form (min-logit, mask):
        Where(cond, ReduceMin(... logits ...) | constant lowest, logits) --[Cast]--> Softmax
    probability form (scale):
        Softmax = p -> Where(cond, Mul(p, alpha), p) = p' -> Div(p', ReduceSum(p')) -> MatMul(PV)

The norm source must be computed inside this attention block (an ancestor of its Q*K^T logits or
of its V operand), so a Where on unrelated norms is not taken for ITAE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx

from .anchor import attention_layout, consumer_matmul, node_label, score_matmul
from .graph import GraphIndex
from .metadata import ITAE_SETTINGS

COMPARE_OPS = ("Greater", "Less", "GreaterOrEqual", "LessOrEqual")
BOOL_OPS = ("And", "Or", "Not", "Xor", "Cast", "Identity", "Expand", "Unsqueeze", "Squeeze", "Reshape",
            "Transpose", "Tile")
NORM_LAYOUT_OPS = ("Transpose", "Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "Expand")
_PASS = ("Cast", "Identity")


@dataclass(frozen=True)
class ItaeSite:
    """An ITAE subgraph at one attention Softmax."""

    softmax: str  # the Softmax's name (or output)
    form: str  # "logits" (rewrites the Softmax input) | "probabilities" (rewrites its output)
    attenuation: str  # min-logit | mask | scale
    logits: str  # the attention logits before ITAE
    probs: str  # what the PV MatMul reads: the Softmax output, or ITAE's renormalised probabilities
    norm_source: str  # the tensor whose per-token lengths ITAE compares
    source_role: str  # q | k | v (which attention operand that tensor is), or "?"
    comparison: str  # Greater | Less | ...
    threshold: str  # absolute | relative

    def describe(self) -> str:
        return (f"{self.attenuation} on the {self.form} of Softmax {self.softmax}, lengths of "
                f"{self.source_role} ({self.norm_source}) compared ({self.comparison}) with a {self.threshold} "
                "threshold")


class PatchInfo(str):
    """Why a model counts as ITAE-patched. A str (the description, so it prints and serialises as
    before) that also carries `block_index` (0-based among the attention blocks, from the input;
    None when only the metadata says so), `num_blocks` and `site` (ItaeSite or None)."""

    block_index: int | None
    num_blocks: int
    site: ItaeSite | None

    def __new__(cls, description: str, *, block_index: int | None, num_blocks: int, site: ItaeSite | None = None):
        self = super().__new__(cls, description)
        self.block_index = block_index
        self.num_blocks = num_blocks
        self.site = site
        return self

    def to_dict(self) -> dict:
        return {"description": str(self), "block_index": self.block_index, "num_blocks": self.num_blocks,
                "site": asdict(self.site) if self.site else None}


def _skip(ix: GraphIndex, name: str, ops: tuple[str, ...]) -> tuple[str, onnx.NodeProto | None]:
    """Walk up through `ops`; (tensor reached, its producer)."""
    for _ in range(8):
        node = ix.producer.get(name)
        if node is None or node.op_type not in ops:
            return name, node
        name = node.input[0]
    return name, ix.producer.get(name)


def _norm_of(ix: GraphIndex, t: str) -> str | None:
    """The tensor whose L2 lengths `t` holds (Sqrt(ReduceSumSquare(x)) and equivalents), or None."""
    _, node = _skip(ix, t, NORM_LAYOUT_OPS)
    if node is None:
        return None
    if node.op_type == "ReduceL2":
        src = node.input[0]
    elif node.op_type == "Sqrt":
        _, inner = _skip(ix, node.input[0], NORM_LAYOUT_OPS)  # ITAE transposes the sums to key layout
        if inner is None:
            return None
        if inner.op_type == "ReduceSumSquare":
            src = inner.input[0]
        elif inner.op_type == "ReduceSum":
            _, sq = _skip(ix, inner.input[0], _PASS)
            if sq is None or not ((sq.op_type == "Mul" and sq.input[0] == sq.input[1])
                                  or (sq.op_type == "Pow" and _is_two(ix, sq.input[1]))):
                return None
            src = sq.input[0]
        else:
            return None
    else:
        return None
    src, _ = _skip(ix, src, _PASS)
    return None if ix.is_data_independent(src) else src


def _is_two(ix: GraphIndex, name: str) -> bool:
    v = ix.const_value(name)
    return v is not None and v.size == 1 and float(v.reshape(-1)[0]) == 2.0


def _norm_comparison(ix: GraphIndex, cond: str) -> tuple[onnx.NodeProto, str, str] | None:
    """(comparison node, norm source, threshold tensor) of the norm test that `cond` is built from."""
    frontier, seen = [cond], {cond}
    for _ in range(10):
        nxt = []
        for t in frontier:
            node = ix.producer.get(t)
            if node is None:
                continue
            if node.op_type in COMPARE_OPS and len(node.input) == 2:
                for i, other in ((0, 1), (1, 0)):
                    src = _norm_of(ix, node.input[i])
                    if src is not None:
                        return node, src, node.input[other]
                continue
            if node.op_type in BOOL_OPS:
                for i in node.input[:2] if node.op_type != "Expand" else node.input[:1]:
                    if i and i not in seen:
                        seen.add(i)
                        nxt.append(i)
        frontier = nxt
    return None


def _reaches(ix: GraphIndex, starts: list[str], target: str, depth: int = 14) -> bool:
    """Is `target` an ancestor of one of `starts` (data inputs only, within `depth` hops)?"""
    frontier, seen = list(starts), set(starts)
    for _ in range(depth):
        if target in frontier:
            return True
        nxt = []
        for t in frontier:
            node = ix.producer.get(t)
            if node is None:
                continue
            for i in node.input:
                if i and i not in seen and not ix.is_data_independent(i):
                    seen.add(i)
                    nxt.append(i)
        frontier = nxt
    return target in frontier


def _pv_input(ix: GraphIndex, probs: str) -> str | None:
    """The V operand of the MatMul that reads `probs` (through casts), or None."""
    mm = consumer_matmul(ix, probs, lambda c, _t: c.op_type in _PASS)
    return mm.input[1] if mm is not None else None


def _logit_site(ix: GraphIndex, sm: onnx.NodeProto) -> ItaeSite | None:
    _, where = _skip(ix, sm.input[0], _PASS)
    if where is None or where.op_type != "Where" or len(where.input) != 3:
        return None
    found = _norm_comparison(ix, where.input[0])
    if found is None:
        return None
    cmp, src, thr = found
    then, logits = where.input[1], where.input[2]
    if ix.is_data_independent(then):
        attenuation = "mask"
    else:
        _, red = _skip(ix, then, _PASS + ("Expand", "Unsqueeze", "Reshape"))
        if red is None or red.op_type != "ReduceMin":
            return None
        attenuation = "min-logit"
    return _site(ix, sm, "logits", attenuation, logits, sm.output[0], cmp, src, thr)


def _prob_site(ix: GraphIndex, sm: onnx.NodeProto) -> ItaeSite | None:
    probs = sm.output[0]
    for where in ix.consumers.get(probs, []):
        if where.op_type != "Where" or len(where.input) != 3 or where.input[2] != probs:
            continue
        scaled = ix.producer.get(where.input[1])
        if scaled is None or scaled.op_type != "Mul" or probs not in scaled.input:
            continue
        found = _norm_comparison(ix, where.input[0])
        if found is None:
            continue
        chosen = where.output[0]
        for div in ix.consumers.get(chosen, []):
            total = ix.producer.get(div.input[1]) if div.op_type == "Div" and len(div.input) == 2 else None
            if div.input[0] == chosen and total is not None and total.op_type == "ReduceSum" \
                    and total.input[0] == chosen:
                cmp, src, thr = found
                return _site(ix, sm, "probabilities", "scale", sm.input[0], div.output[0], cmp, src, thr)
    return None


def _site(ix: GraphIndex, sm: onnx.NodeProto, form: str, attenuation: str, logits: str, probs: str,
          cmp: onnx.NodeProto, src: str, thr: str) -> ItaeSite | None:
    """The site, once its norm source is shown to belong to this attention block."""
    v = _pv_input(ix, probs)
    starts = [logits] + ([v] if v else [])
    if not _reaches(ix, starts, src):
        return None
    threshold = "absolute" if ix.is_data_independent(thr) else "relative"
    return ItaeSite(node_label(sm), form, attenuation, logits, probs, src, _role(ix, logits, v, src), cmp.op_type,
                    threshold)


def _role(ix: GraphIndex, logits: str, v: str | None, src: str) -> str:
    """Which attention operand ITAE took its lengths from: v (the PV MatMul's B), q or k (the QK one's)."""
    if v is not None and _reaches(ix, [v], src, depth=3):
        return "v"
    qk, _ = score_matmul(ix, logits)
    if qk is not None:
        for role, operand in (("q", qk.input[0]), ("k", qk.input[1])):
            if _reaches(ix, [operand], src, depth=4):
                return role
    return "?"


def find_itae_site(ix: GraphIndex, sm: onnx.NodeProto) -> ItaeSite | None:
    """The ITAE subgraph at Softmax `sm`, or None (see the module docstring for the pattern)."""
    return _logit_site(ix, sm) or _prob_site(ix, sm)


def already_patched(model: onnx.ModelProto, ix: GraphIndex | None = None, *,
                    inferred: onnx.ModelProto | None = None) -> PatchInfo | None:
    """Why `model` counts as ITAE-patched, or None.

    The attention Softmax nodes are searched from the final one backwards for the ITAE structure
    (node names and metadata are not read for that). A model whose metadata records ITAE settings
    while no such structure is found is reported too (block_index None): re-patching a graph some
    other tool rewrote beyond recognition would attenuate twice."""
    ix = ix or GraphIndex(model)
    layout = attention_layout(model, ix, inferred=inferred)
    for sm in reversed(layout.attention_softmaxes):
        site = find_itae_site(ix, sm)
        if site is not None:
            idx = layout.block_index(sm)
            return PatchInfo(
                f"it already contains ITAE nodes in attention block {idx} (0-based from the input, of "
                f"{layout.num_blocks}): {site.describe()}",
                block_index=idx, num_blocks=layout.num_blocks, site=site)
    if any(p.key == ITAE_SETTINGS for p in model.metadata_props):
        return PatchInfo(
            f"its metadata records applied ITAE settings ({ITAE_SETTINGS}) although no ITAE subgraph was found "
            "at any attention block (rewritten by another tool?)",
            block_index=None, num_blocks=layout.num_blocks)
    return None
