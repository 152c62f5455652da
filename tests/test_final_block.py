"""The ITAE pass patches only the final attention block, recognises its own subgraph by structure,
and keeps every metadata key in one place (graph_passes.metadata). Tiny two-block graphs built here."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes import metadata as md
from graph_passes.config import ConfigError, ITAEConfig
from graph_passes.errors import AlreadyPatchedError, MatchError, MetadataError, PassError
from graph_passes.fuse_attention import fuse_attention
from graph_passes.graph import GraphIndex
from graph_passes.itae import apply_itae
from graph_passes.match import (
    already_patched,
    infer_num_prefix_tokens,
    match_attention_at,
    match_final_attention,
)

B, T, H, DH = 2, 7, 2, 4
D = H * DH
P = 2  # CLS + 1 register


def _block(i: int, x: str, rng, *, broken: str | None = None) -> tuple[list, list, str]:
    """One timm-style block x -> x + proj(attention(x)); `broken` spoils its attention."""
    p = f"b{i}_"
    inits = [
        numpy_helper.from_array((rng.standard_normal((D, 3 * D)) / np.sqrt(D)).astype(np.float32), p + "w_qkv"),
        numpy_helper.from_array((rng.standard_normal(3 * D) * 0.1).astype(np.float32), p + "b_qkv"),
        numpy_helper.from_array((rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32), p + "w_proj"),
        numpy_helper.from_array(np.array([0, 0, 3, H, DH], np.int64), p + "shape5"),
        numpy_helper.from_array(np.array([0, 0, D], np.int64), p + "shape3"),
        numpy_helper.from_array(np.array([1, 1, 1], np.int64), p + "splits"),
        numpy_helper.from_array(np.array([0], np.int64), p + "ax0"),
        numpy_helper.from_array(np.array(DH ** -0.5, np.float32), p + "scale"),
    ]
    n = [
        helper.make_node("MatMul", [x, p + "w_qkv"], [p + "mm"]),
        helper.make_node("Add", [p + "mm", p + "b_qkv"], [p + "qkv"]),
        helper.make_node("Reshape", [p + "qkv", p + "shape5"], [p + "qkv5"]),
        helper.make_node("Transpose", [p + "qkv5"], [p + "qkvT"], perm=[2, 0, 3, 1, 4]),
        helper.make_node("Split", [p + "qkvT", p + "splits"], [p + "q1", p + "k1", p + "v1"], axis=0),
        *[helper.make_node("Squeeze", [p + c + "1", p + "ax0"], [p + c]) for c in "qkv"],
        helper.make_node("Mul", [p + "q", p + "scale"], [p + "qs"]),
        helper.make_node("Transpose", [p + "k"], [p + "kT"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [p + "qs", p + "kT"], [p + "logits"]),
    ]
    logits = p + "logits"
    if broken == "mask":  # a data-dependent key bias, as a padding mask computed from the input
        inits.append(numpy_helper.from_array(np.array([2], np.int64), p + "ax2"))
        inits.append(numpy_helper.from_array(np.array([1, 2], np.int64), p + "ax12"))
        n += [
            helper.make_node("ReduceSum", [x, p + "ax2"], [p + "tok_sum"], keepdims=0),
            helper.make_node("Unsqueeze", [p + "tok_sum", p + "ax12"], [p + "bias"]),
            helper.make_node("Add", [logits, p + "bias"], [p + "masked"]),
        ]
        logits = p + "masked"
    n.append(helper.make_node("Softmax", [logits], [p + "probs"], axis=-1))
    if broken == "pv":  # probabilities @ V spelled as an Einsum: not the MatMul the pass rewires around
        n.append(helper.make_node("Einsum", [p + "probs", p + "v"], [p + "ctx"], equation="bhij,bhjd->bhid"))
    else:
        n.append(helper.make_node("MatMul", [p + "probs", p + "v"], [p + "ctx"]))
    n += [
        helper.make_node("Transpose", [p + "ctx"], [p + "ctxT"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [p + "ctxT", p + "shape3"], [p + "attn"]),
        helper.make_node("MatMul", [p + "attn", p + "w_proj"], [p + "proj"]),
        helper.make_node("Add", [x, p + "proj"], [p + "y"]),
    ]
    for j, node in enumerate(n):
        node.name = f"{p}{node.op_type}_{j}"
    return n, inits, p + "y"


def _model(nodes, inits, out: str) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "vit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", T, D])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", T, D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def two_blocks(broken: str | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    n0, i0, y0 = _block(0, "x", rng)
    n1, i1, y1 = _block(1, y0, rng, broken=broken)
    return _model(n0 + n1, i0 + i1, y1)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _x() -> np.ndarray:
    x = np.random.default_rng(3).standard_normal((B, T, D)).astype(np.float32)
    x[:, 4] *= 6.0
    return x


def _softmaxes(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.op_type == "Softmax"]


# --- (a) the final block or nothing ----------------------------------------------------------------


@pytest.mark.parametrize(("broken", "step"), [("pv", "pv-matmul"), ("mask", "qk-matmul")])
def test_broken_final_block_is_refused_never_the_earlier_one(broken, step):
    model = two_blocks(broken)
    before = model.SerializeToString()
    _run(model, _x())  # a valid graph: only the pass refuses it
    with pytest.raises(MatchError) as e:
        apply_itae(model, ITAEConfig(), num_prefix_tokens=P)
    assert e.value.step == step
    assert "final attention block (block 1 of 2, Softmax b1_Softmax" in str(e.value)
    assert "never an earlier one" in str(e.value)
    assert model.SerializeToString() == before  # the input (both blocks) is untouched
    with pytest.raises(MatchError, match=f"step '{step}'"):
        match_final_attention(model)
    # block 0 would match on its own: the refusal is a choice, not a lack of candidates
    ix = GraphIndex(model)
    assert match_attention_at(ix, _softmaxes(model)[0], 2).qk_matmul.name == "b0_MatMul_10"


def test_intact_graph_patches_block_1_only():
    model = two_blocks()
    patched, res = apply_itae(model, ITAEConfig(), num_prefix_tokens=P)
    assert res.matched["softmax"] == "b1_Softmax_11" and res.matched["final_block_index"] == 1
    sm0 = next(n for n in patched.graph.node if n.name == "b0_Softmax_11")
    assert sm0.input[0] == "b0_logits"  # block 0 left as exported


def test_classifier_softmax_after_the_blocks_is_not_a_candidate():
    model = two_blocks()
    model.graph.initializer.append(numpy_helper.from_array(np.ones((D, 3), np.float32), "w_cls"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "ax1"))
    model.graph.node.extend([
        helper.make_node("ReduceMean", ["b1_y", "ax1"], ["pooled"], keepdims=0, name="pool"),
        helper.make_node("MatMul", ["pooled", "w_cls"], ["cls_logits"], name="head"),
        helper.make_node("Softmax", ["cls_logits"], ["cls_probs"], axis=-1, name="head_softmax"),
    ])
    model.graph.output.append(helper.make_tensor_value_info("cls_probs", TensorProto.FLOAT, ["B", 3]))
    m = match_final_attention(model)
    assert m.softmax.name == "b1_Softmax_11" and m.block_index == 1 and m.num_softmax == 2
    assert [n for n, _ in m.rejected] == ["head_softmax"] and "constant" in m.rejected[0][1]
    assert m.describe()["rejected_candidates"][0].startswith("head_softmax: not an attention block")


# --- (b) our own subgraph, renamed ----------------------------------------------------------------


def _rename_everything(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node and tensor renamed consistently (t0, t1, ...; n0, n1, ...), metadata cleared."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names: dict[str, str] = {}

    def new(name: str) -> str:
        if not name:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for vi in list(g.input) + list(g.output) + list(g.value_info):
        vi.name = new(vi.name)
    for t in g.initializer:
        t.name = new(t.name)
    for i, node in enumerate(g.node):
        node.name = f"n{i}"
        for j, x in enumerate(node.input):
            node.input[j] = new(x)
        for j, x in enumerate(node.output):
            node.output[j] = new(x)
    del out.metadata_props[:]
    return out


CONFIGS = [ITAEConfig(), ITAEConfig(attenuation="mask", norm_source="k", norm_scope="head"),
           ITAEConfig(attenuation="scale", alpha=0.25, norm_source="q", rows="all", relative_stat="median"),
           ITAEConfig(threshold=3.0, direction="low")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.attenuation}-{c.norm_source}")
def test_renamed_patched_graph_is_refused_with_its_block(cfg):
    patched, _ = apply_itae(two_blocks(), cfg, num_prefix_tokens=P)
    renamed = _rename_everything(patched)
    assert not any(n.name.startswith("itae/") for n in renamed.graph.node) and not renamed.metadata_props
    assert not any("itae" in x for n in renamed.graph.node for x in list(n.input) + list(n.output))
    np.testing.assert_array_equal(_run(renamed, _x()), _run(patched, _x()))  # the same graph

    info = already_patched(renamed)
    assert info is not None and info.block_index == 1 and info.num_blocks == 2
    assert info.site.attenuation == cfg.attenuation and info.site.source_role == cfg.norm_source
    assert info.site.threshold == ("absolute" if cfg.threshold is not None else "relative")
    with pytest.raises(AlreadyPatchedError, match=r"already patched: .*ITAE nodes in attention block 1 "):
        apply_itae(renamed, ITAEConfig(), num_prefix_tokens=P)
    # inspection still finds the final block, through the ITAE nodes
    m = match_final_attention(renamed)
    assert m.block_index == 1 and m.itae is not None and "itae_site" in m.describe()
    # and the fast-path fusion leaves the patched block alone
    fused, res = fuse_attention(renamed)
    assert res.num_fused == 1 and res.kept_final == m.softmax.name
    assert already_patched(fused).block_index == 1  # fused block 0 still counts as block 0


def test_every_option_combination_is_recognised():
    base = two_blocks()
    for src, scope, direction, att, rows, thr in itertools.product(
            "qkv", ("token", "head"), ("high", "low"), ("min-logit", "mask", "scale"), ("cls", "all"), (None, 2.5)):
        cfg = ITAEConfig(norm_source=src, norm_scope=scope, direction=direction, attenuation=att, rows=rows,
                         threshold=thr, alpha=0.5)
        patched, _ = apply_itae(base, cfg, num_prefix_tokens=P)
        info = already_patched(_rename_everything(patched))
        assert info is not None and info.block_index == 1, cfg
        assert (info.site.attenuation, info.site.source_role) == (att, src), cfg
        assert info.site.comparison == ("Greater" if direction == "high" else "Less"), cfg


def test_itae_on_an_earlier_block_is_reported_with_that_index():
    """A graph whose ITAE sits on block 0 (what the old silent fallback produced) is refused too."""
    rng = np.random.default_rng(0)
    n0, i0, y0 = _block(0, "x", rng)
    one, _ = apply_itae(_model(n0, i0, y0), ITAEConfig(), num_prefix_tokens=P)
    n1, i1, y1 = _block(1, y0, rng)
    one.graph.node.extend(n1)
    one.graph.initializer.extend(i1)
    one.graph.output[0].name = y1
    renamed = _rename_everything(one)
    info = already_patched(renamed)
    assert info.block_index == 0 and info.num_blocks == 2
    with pytest.raises(AlreadyPatchedError, match="attention block 0 "):
        apply_itae(renamed, ITAEConfig(), num_prefix_tokens=P)


def test_unpatched_graph_is_not_reported():
    assert already_patched(two_blocks()) is None
    assert already_patched(two_blocks("mask")) is None  # a data-dependent Where/Add is no ITAE


def test_metadata_without_structure_still_counts():
    m = two_blocks()
    m.metadata_props.add(key=md.ITAE_SETTINGS, value="{}")
    info = already_patched(m)
    assert info is not None and info.block_index is None and md.ITAE_SETTINGS in info


# --- (c) metadata ---------------------------------------------------------------------------------


def test_metadata_round_trip():
    m = two_blocks()
    meta = md.ArtifactMetadata(model="dinov2_vits14", img_size=224, num_prefix_tokens=5, exporter="dynamo",
                               weights="random(seed=0)", itae={"norm_source": "v"}, itae_pass_version="1",
                               fast_path="int8-dynamic", l2_normalize={"eps": 1e-12}, extra={"custom": "kept"})
    md.write_metadata(m, meta)
    assert md.read_metadata(m) == meta
    assert md.read_metadata(m).input_format is None
    md.write_metadata(m, md.ArtifactMetadata(img_size=448, uint8_nhwc_input={"layout": "NHWC"}))
    back = md.read_metadata(m)
    assert back.img_size == 448 and back.model == "dinov2_vits14" and back.input_format == "uint8-nhwc"
    keys = [p.key for p in m.metadata_props]
    assert len(keys) == len(set(keys)) and keys.count(md.IMG_SIZE) == 1


def test_legacy_keys_read_and_replaced():
    m = two_blocks()
    m.metadata_props.add(key="itae.num_prefix_tokens", value="2")
    m.metadata_props.add(key="itae.img_size", value="56")
    meta = md.read_metadata(m)
    assert meta.num_prefix_tokens == 2 and meta.img_size == 56 and not meta.extra
    assert infer_num_prefix_tokens(m) == 2
    md.set_metadata_props(m, {md.IMG_SIZE: "112"})
    assert {p.key: p.value for p in m.metadata_props} == {"itae.num_prefix_tokens": "2", md.IMG_SIZE: "112"}
    # the pass itself writes canonical keys only, whatever spelling the caller used
    patched, _ = apply_itae(two_blocks(), ITAEConfig(), num_prefix_tokens=P, metadata={"itae.img_size": "56"})
    props = {p.key: p.value for p in patched.metadata_props}
    assert props[md.IMG_SIZE] == "56" and props[md.NUM_PREFIX_TOKENS] == str(P)
    assert not set(props) & set(md.LEGACY_KEYS)


@pytest.mark.parametrize(("key", "value"), [(md.IMG_SIZE, "abc"), ("itae.img_size", "2.5"), (md.IMG_SIZE, "-3"),
                                            (md.NUM_PREFIX_TOKENS, ""), (md.ITAE_SETTINGS, "[1]"),
                                            (md.FUSED_ATTENTION, "{not json")])
def test_metadata_types_are_checked(key, value):
    m = two_blocks()
    m.metadata_props.add(key=key, value=value)
    with pytest.raises(PassError, match=repr(md.canonical_key(key))) as e:
        md.read_metadata(m)
    assert isinstance(e.value, MetadataError)
    with pytest.raises(MetadataError, match=repr(md.canonical_key(key))):
        md.set_metadata_props(two_blocks(), {key: value})
    with pytest.raises(MetadataError):
        md.ArtifactMetadata(img_size="224")  # type: ignore[arg-type]


def test_one_field_read_alone():
    m = two_blocks()
    m.metadata_props.add(key=md.FAST_PATH_ACCURACY, value="{broken")
    m.metadata_props.add(key="itae.num_prefix_tokens", value="3")
    assert md.metadata_field(m, "num_prefix_tokens") == 3 and infer_num_prefix_tokens(m) == 3
    with pytest.raises(MetadataError, match=md.FAST_PATH_ACCURACY):
        md.read_metadata(m)
    m.metadata_props.add(key=md.NUM_PREFIX_TOKENS, value="x")
    with pytest.raises(MetadataError, match=md.NUM_PREFIX_TOKENS):
        infer_num_prefix_tokens(m)


def test_conflicting_spellings_refused():
    m = two_blocks()
    m.metadata_props.add(key="itae.img_size", value="56")
    m.metadata_props.add(key=md.IMG_SIZE, value="224")
    with pytest.raises(MetadataError, match="disagree"):
        md.read_metadata(m)


# --- --num-prefix-tokens against the graph ----------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, T, T + 3, True, 1.5])
def test_num_prefix_tokens_checked(bad):
    with pytest.raises(ConfigError, match="--num-prefix-tokens"):
        apply_itae(two_blocks(), ITAEConfig(), num_prefix_tokens=bad)
