"""itae-patch on ViT graphs exported elsewhere: opset-23 fused `Attention` ops (decomposed exactly
before matching), float16 graphs, Hugging Face Dinov2Model (eager and sdpa attention), the
refusals for attention we cannot decompose exactly, and itae-inspect's report on them."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graph_passes.config import ITAEConfig
from graph_passes.decompose import DecomposeError, decompose_final_attention
from graph_passes.itae import apply_itae
from graph_passes.match import MatchError, infer_num_prefix_tokens
from itae_export.parity import compare
from itae_export.reference import ITAEReference, flag_artifacts, last_block_stats, token_norms

IMG = 56


def _gap_threshold(norms: np.ndarray, prefix: int) -> float:
    """Middle of the widest gap among the central sorted patch norms, so float noise (or float16
    rounding) cannot flip a token across the threshold."""
    vals = np.sort(norms[..., prefix:].ravel())
    lo, hi = len(vals) // 4, 3 * len(vals) // 4
    i = lo + int(np.argmax(np.diff(vals[lo:hi])))
    return float((vals[i] + vals[i + 1]) / 2)


def _run(model: onnx.ModelProto, path, x: np.ndarray) -> np.ndarray:
    onnx.save_model(model, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _cfg(model, images, **kw) -> ITAEConfig:
    probe = ITAEConfig(norm_source=kw.get("norm_source", "v"), norm_scope=kw.get("norm_scope", "token"))
    thr = _gap_threshold(last_block_stats(model, images, probe)["norms"], model.num_prefix_tokens)
    return ITAEConfig(threshold=thr, **kw)


@pytest.fixture(scope="module")
def opset23(tmp_path_factory, tiny_models):
    from itae_export.onnx_export import export_onnx

    return export_onnx(tiny_models["plain"], tmp_path_factory.mktemp("o23") / "o23.onnx", img_size=IMG, opset=23)


# --- 1. opset 23 fused Attention ---------------------------------------------------------------


def test_opset23_export_emits_fused_attention(opset23):
    g = onnx.load(str(opset23), load_external_data=False)
    ops = Counter(n.op_type for n in g.graph.node)
    assert ops["Attention"] == 2 and ops["Softmax"] == 0, ops  # one per block (depth 2), nothing to anchor on


def test_decomposition_alone_is_exact(opset23, images, tmp_path):
    g = onnx.load(str(opset23))
    explicit = onnx.ModelProto()
    explicit.CopyFrom(g)
    name = decompose_final_attention(explicit)
    ops = Counter(n.op_type for n in explicit.graph.node)
    assert name and ops["Attention"] == 1 and ops["Softmax"] == 1
    assert decompose_final_attention(explicit) is None  # a Softmax now follows the remaining Attention
    x = images.numpy()
    par = compare(_run(g, tmp_path / "a.onnx", x), _run(explicit, tmp_path / "b.onnx", x))
    assert par.max_abs <= 1e-5, par


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"norm_source": "k", "norm_scope": "head", "attenuation": "scale", "alpha": 0.2},
        {"norm_source": "q", "attenuation": "mask", "rows": "all"},
    ],
)
def test_opset23_patch_matches_reference(opts, opset23, tiny_models, images, tmp_path):
    model = tiny_models["plain"]
    cfg = _cfg(model, images, **opts)
    flagged = last_block_stats(model, images, cfg)["flagged"]
    assert 0 < flagged.sum() < flagged[..., 1:].size
    patched, res = apply_itae(onnx.load(str(opset23), load_external_data=False), cfg)
    assert res.matched["decomposed_attention"] and res.matched["attention_blocks"] == 2
    assert res.num_prefix_tokens == 1
    assert Counter(n.op_type for n in patched.graph.node)["Attention"] == 1  # earlier blocks stay fused
    onnx.save_model(patched, str(tmp_path / "p.onnx"))
    got = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": images.numpy()})[0]
    with torch.no_grad():
        want = ITAEReference(model, cfg)(images).numpy()
        base = model(images).numpy()
    par = compare(want, got)
    assert par.max_abs <= 1e-4 and par.cos_min >= 0.99999, f"{cfg}: {par}"
    assert compare(base, want).max_abs > 1e-3  # ITAE changed the embedding: the check proves something


# --- synthetic 3-D Attention graphs: attributes, and the refusals --------------------------------

B, T, HEADS, DH = 2, 5, 2, 4


def _attention_graph(*, extra_inputs: int = 0, qk_output: bool = False, **attrs) -> onnx.ModelProto:
    """X [B,T,D] -> q/k/v MatMuls -> 3-D Attention -> Y, with the given Attention attributes."""
    d = HEADS * DH
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), w) for w in ("wq", "wk", "wv")]
    nodes = [helper.make_node("MatMul", ["x", w], [w[1]]) for w in ("wq", "wk", "wv")]
    inputs = ["q", "k", "v"]
    if extra_inputs:
        inits.append(numpy_helper.from_array(np.zeros((T, T), dtype=np.float32), "mask"))
        inputs.append("mask")
    outputs = ["y"] + (["", "", "qk_out"] if qk_output else [])
    nodes.append(helper.make_node("Attention", inputs, outputs, name="attn", **attrs))
    graph_outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, T, d])]
    if qk_output:
        graph_outputs.append(helper.make_tensor_value_info("qk_out", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, T, d])],
                              graph_outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def _numpy_attention(x: np.ndarray, g: onnx.ModelProto, scale: float) -> np.ndarray:
    w = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}

    def heads(t: np.ndarray) -> np.ndarray:
        return t.reshape(B, T, HEADS, DH).transpose(0, 2, 1, 3)

    q, k, v = (heads(x @ w[n]) for n in ("wq", "wk", "wv"))
    logits = (q @ k.transpose(0, 1, 3, 2)) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(B, T, HEADS * DH)


@pytest.mark.parametrize("attrs", [{}, {"scale": 0.3}, {"scale": 0.3, "softmax_precision": TensorProto.DOUBLE}])
def test_3d_attention_decomposes_exactly(attrs, tmp_path):
    g = _attention_graph(q_num_heads=HEADS, kv_num_heads=HEADS, **attrs)
    x = np.random.default_rng(1).standard_normal((B, T, HEADS * DH)).astype(np.float32)
    want = _numpy_attention(x, g, attrs.get("scale", DH**-0.5))
    decompose_final_attention(g)
    onnx.checker.check_model(g)
    assert not any(n.op_type == "Attention" for n in g.graph.node)
    assert np.abs(_run(g, tmp_path / "d.onnx", x) - want).max() <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"is_causal": 1}, "is_causal=1"),
        ({"softcap": 2.0}, "softcap=2.0"),
        ({"extra_inputs": 1}, "attn_mask input"),
        ({"qk_output": True, "qk_matmul_output_mode": 0}, "qk_matmul_output is used"),
        ({"kv_num_heads": 1}, "groups 2 query heads over 1 KV heads"),
    ],
)
def test_unsupported_attention_refused(kwargs, needle):
    attrs = {"q_num_heads": HEADS, "kv_num_heads": HEADS} | kwargs
    g = _attention_graph(**attrs)
    with pytest.raises(DecomposeError, match=needle) as e:
        apply_itae(g, ITAEConfig())
    assert isinstance(e.value, MatchError) and e.value.step == "decompose-attention"
    assert "opset <= 22" in str(e.value)  # says what to do


def test_contrib_attention_refused():
    g = _attention_graph(q_num_heads=HEADS, kv_num_heads=HEADS)
    node = next(n for n in g.graph.node if n.op_type == "Attention")
    node.op_type, node.domain = "MultiHeadAttention", "com.microsoft"
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("num_heads", HEADS))
    g.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(MatchError, match="fused onnxruntime contrib op; patch the graph before running the onnxruntime transformer optimizer"):
        apply_itae(g, ITAEConfig())


# --- 2. float16 graphs ---------------------------------------------------------------------------


def _to_fp16(path) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load(str(path)), keep_io_types=False)


@pytest.mark.parametrize(("source", "opts"), [("opset18", {}), ("opset23", {"attenuation": "mask", "norm_source": "k"})])
def test_float16_patch(source, opts, exported, opset23, tiny_models, images, tmp_path):
    model = tiny_models["plain"]
    g = _to_fp16(exported("plain", "dynamo") if source == "opset18" else opset23)
    assert g.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    cfg = _cfg(model, images, **opts)
    patched, res = apply_itae(g, cfg)
    assert res.inserted_ops.get("Cast", 0) >= 1  # norms computed in float32
    got = _run(patched, tmp_path / "h.onnx", images.numpy().astype(np.float16)).astype(np.float32)
    with torch.no_grad():
        want = ITAEReference(model, cfg)(images).numpy()
        base = model(images).numpy()
    par = compare(want, got)
    assert par.cos_min >= 0.999, par
    assert compare(want, got).max_abs < compare(base, got).max_abs  # closer to ITAE than to the baseline


# --- 3. Hugging Face transformers Dinov2Model ----------------------------------------------------


def _hf_model(impl: str, registers: int = 0, image_size: int = IMG, depth: int = 2):
    """Tiny seeded Dinov2Model, or Dinov2WithRegistersModel when `registers` > 0, with distinct
    random CLS/register tokens (the registers start as zeros in transformers' init)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = {"hidden_size": 384, "num_hidden_layers": depth, "num_attention_heads": 6, "image_size": image_size,
              "patch_size": 14, "initializer_range": 0.2}
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        model = transformers.Dinov2WithRegistersModel._from_config(cfg, attn_implementation=impl).eval()
        with torch.no_grad():
            model.embeddings.register_tokens.normal_(0.0, 1.0)
            model.embeddings.cls_token.normal_(0.0, 1.0)
        return model
    cfg = transformers.Dinov2Config(**common)
    return transformers.Dinov2Model._from_config(cfg, attn_implementation=impl).eval()


def _export_hf(wrapped: torch.nn.Module, path, *, dynamic_hw: bool = False):
    dims = {0: torch.export.Dim("batch", min=1, max=64)}
    if dynamic_hw:  # position embeddings interpolated in the graph (Resize), not folded at export
        dims |= {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    prog = torch.onnx.export(wrapped, (torch.zeros(2, 3, IMG, IMG),), dynamo=True, input_names=["pixel_values"],
                             output_names=["embedding"], opset_version=18, verbose=False,
                             dynamic_shapes={"pixel_values": dims})
    prog.save(str(path))
    return path


class _Pooled(torch.nn.Module):
    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixel_values).pooler_output


def _hf_itae_forward(attn: torch.nn.Module, cfg: ITAEConfig, prefix: int, stats: dict):
    """Dinov2Attention.forward written out with ITAE (min-logit), for the last layer."""

    def forward(hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        h, dh = attn.num_attention_heads, attn.head_dim
        q, k, v = (p(hidden_states).view(b, t, h, dh).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = (q @ k.transpose(2, 3)) * attn.scaling
        norms = token_norms({"q": q, "k": k, "v": v}[cfg.norm_source], cfg.norm_scope)
        flagged = flag_artifacts(norms, cfg, prefix)
        stats["norms"] = norms.numpy()
        cond = flagged[:, None, None, :] & (torch.arange(t) == 0)[:, None]  # CLS row only
        row_min = logits[..., prefix:].amin(dim=-1, keepdim=True)
        probs = torch.where(cond, row_min, logits).softmax(dim=-1)
        stats["flagged"] = flagged
        out = (probs @ v).transpose(1, 2).reshape(b, t, h * dh)
        return attn.o_proj(out), probs

    return forward


def _hf_parity(hf: torch.nn.Module, prefix: int, path, images: torch.Tensor, tmp_path, **opts):
    """Patch the exported HF graph with the prefix inferred from the graph; compare with the
    PyTorch ITAE reference at a threshold that flags some patch tokens and not others."""
    wrapped = _Pooled(hf).eval()
    attn = hf.encoder.layer[-1].attention
    stats: dict = {}
    probe = ITAEConfig(norm_source=opts.get("norm_source", "v"))
    with torch.no_grad():
        base = wrapped(images).numpy()
        attn.forward = _hf_itae_forward(attn, probe, prefix, stats)
        wrapped(images)
        del attn.forward
    cfg = ITAEConfig(threshold=_gap_threshold(stats["norms"], prefix), **opts)
    patched, res = apply_itae(onnx.load(str(path)), cfg)  # no num_prefix_tokens: inferred
    assert res.num_prefix_tokens == prefix
    assert res.matched["qkv_projection"] == "separate"
    got = _run(patched, tmp_path / "hf-itae.onnx", images.numpy())
    attn.forward = _hf_itae_forward(attn, cfg, prefix, stats)
    with torch.no_grad():
        want = wrapped(images).numpy()
    del attn.forward
    flagged = stats["flagged"]
    assert not flagged[:, :prefix].any()
    assert 0 < int(flagged.sum()) < flagged[:, prefix:].numel()
    par = compare(want, got)
    assert par.max_abs <= 1e-4 and par.cos_min >= 0.99999, par
    assert compare(base, want).max_abs > 1e-3  # ITAE changed the embedding: the check proves something
    return par


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_dinov2(impl, images, tmp_path):
    hf = _hf_model(impl)
    path = _export_hf(_Pooled(hf).eval(), tmp_path / f"hf-{impl}.onnx")
    _hf_parity(hf, 1, path, images, tmp_path)


def test_hf_prefix_inferred_through_pos_embed_resize(tmp_path):
    """Position embeddings for 42 px interpolated in the graph (bicubic Resize) to the input size:
    their own [class_pos, patch_pos] Concat on axis 1 must not be taken for the token Concat."""
    hf = _hf_model("eager", image_size=42, depth=1)
    g = onnx.load(str(_export_hf(_Pooled(hf).eval(), tmp_path / "hf-resize.onnx", dynamic_hw=True)))
    assert any(n.op_type == "Resize" for n in g.graph.node)
    assert infer_num_prefix_tokens(g) == 1


@pytest.fixture(scope="module")
def hf_registers(tmp_path_factory):
    """Dinov2WithRegistersModel, 4 registers (exports with dynamo only, see EXPORT_NOTES)."""
    hf = _hf_model("sdpa", registers=4)
    path = _export_hf(_Pooled(hf).eval(), tmp_path_factory.mktemp("hfreg") / "hf-reg.onnx")
    return hf, path


def test_hf_registers_prefix_inferred(hf_registers):
    hf, path = hf_registers
    regs = hf.embeddings.register_tokens[0]
    assert torch.cdist(regs, regs).fill_diagonal_(1.0).min() > 1e-3  # distinct: the splice matters
    g = onnx.load(str(path))
    assert not any(p.key.startswith("itae") for p in g.metadata_props)  # no metadata to read it from
    assert infer_num_prefix_tokens(g) == 5  # CLS + 4 registers spliced in after the position add


@pytest.mark.parametrize("opts", [{}, {"norm_source": "k", "attenuation": "mask"}])
def test_hf_registers_parity(opts, hf_registers, images, tmp_path):
    hf, path = hf_registers
    _hf_parity(hf, 5, path, images, tmp_path, **opts)


# --- 4. itae-inspect -----------------------------------------------------------------------------


def _inspect(path, capsys) -> dict:
    from itae_export.cli import inspect_main

    capsys.readouterr()
    assert inspect_main([str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_opset23(opset23, capsys):
    rep = _inspect(opset23, capsys)
    assert rep["opset"] == 23
    assert rep["decomposed_attention"] == "node_scaled_dot_product_attention_1"  # the last block's op
    assert rep["attention_blocks"] == 2 and rep["qkv_projection"] == "fused"
    assert rep["num_prefix_tokens"] == 1 and rep["num_heads"] == 6 and rep["embed_dim"] == 384
    assert rep["would_insert_nodes"] > 0 and not rep["already_patched"]


def test_inspect_float16(opset23, tmp_path, capsys):
    path = tmp_path / "h.onnx"
    onnx.save_model(_to_fp16(opset23), str(path))
    rep = _inspect(path, capsys)
    assert rep["decomposed_attention"] and rep["attention_blocks"] == 2
    assert rep["embed_dim"] == 384 and rep["would_insert"]["Cast"] >= 1


def test_inspect_hf_registers(hf_registers, capsys):
    rep = _inspect(hf_registers[1], capsys)
    assert rep["num_prefix_tokens"] == 5 and rep["registers"] == 4
    assert rep["attention_blocks"] == 2 and rep["qkv_projection"] == "separate"
    assert rep["num_heads"] == 6 and rep["embed_dim"] == 384


# --- 5. graphs simplified by onnxslim ------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "exporter", "opts"),
    [("plain", "dynamo", {}), ("reg", "torchscript", {"norm_source": "q", "norm_scope": "head", "rows": "all"})],
)
def test_onnxslim_patch(variant, exporter, opts, exported, tiny_models, images, tmp_path):
    """onnxslim folds shape chains (Shape/Gather/Concat runs, Split -> Slice); the export carries no
    prefix metadata, so the prefix is inferred from the slimmed token Concat. onnxslim keeps 1/sqrt(Dh) as Mul on q and k (not folded into the qkv weights), so q/k norms
    are still those of unscaled q/k, as in the reference; were the scale folded into the weights,
    the pass would read scaled q/k and a q/k threshold would have to include that scale."""
    onnxslim = pytest.importorskip("onnxslim")
    model = tiny_models[variant]
    slim = onnxslim.slim(onnx.load(str(exported(variant, exporter))))
    assert not any(p.key.startswith("itae") for p in slim.metadata_props)
    cfg = _cfg(model, images, **opts)
    patched, res = apply_itae(slim, cfg)
    assert res.num_prefix_tokens == model.num_prefix_tokens
    assert set(res.matched["scale_on"]) == {"q", "k"}  # see the docstring if this changes
    got = _run(patched, tmp_path / "slim-itae.onnx", images.numpy())
    with torch.no_grad():
        want = ITAEReference(model, cfg)(images).numpy()
        base = model(images).numpy()
    flagged = last_block_stats(model, images, cfg)["flagged"]
    assert 0 < flagged.sum() < flagged[..., model.num_prefix_tokens:].size
    par = compare(want, got)
    assert par.max_abs <= 1e-4 and par.cos_min >= 0.99999, par
    assert compare(base, want).max_abs > 1e-3


@pytest.mark.parametrize(
    ("variant", "exporter", "opts"),
    [("plain", "dynamo", {}), ("reg", "torchscript", {"norm_source": "k", "attenuation": "mask"})],
)
def test_onnxsim_patch(variant, exporter, opts, exported, tiny_models, images, tmp_path):
    """onnx-simplifier (onnxsim) constant-folds the shape chains; the export carries no prefix
    metadata, so the prefix count comes from the simplified token Concat."""
    onnxsim = pytest.importorskip("onnxsim")
    model = tiny_models[variant]
    src = onnx.load(str(exported(variant, exporter)))
    simple, ok = onnxsim.simplify(src)
    assert ok and len(simple.graph.node) < len(src.graph.node)
    cfg = _cfg(model, images, **opts)
    patched, res = apply_itae(simple, cfg)
    assert res.num_prefix_tokens == model.num_prefix_tokens
    got = _run(patched, tmp_path / "sim-itae.onnx", images.numpy())
    with torch.no_grad():
        want = ITAEReference(model, cfg)(images).numpy()
    flagged = last_block_stats(model, images, cfg)["flagged"]
    assert 0 < flagged.sum() < flagged[..., model.num_prefix_tokens:].size
    par = compare(want, got)
    assert par.max_abs <= 1e-4 and par.cos_min >= 0.99999, par


# --- opsets between the default (18) and the fused Attention op (23) ------------------------------
@pytest.mark.parametrize("opset", [19, 20, 21, 22])
def test_intermediate_opsets_patch_matches_reference(opset, tiny_models, images, tmp_path):
    from itae_export.onnx_export import export_onnx

    model = tiny_models["plain"]
    path = export_onnx(model, tmp_path / f"o{opset}.onnx", img_size=IMG, opset=opset)
    g = onnx.load(str(path))
    assert max(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) == opset
    cfg = _cfg(model, images, norm_source="k", attenuation="mask")
    flagged = last_block_stats(model, images, cfg)["flagged"]
    assert 0 < flagged.sum() < flagged[..., 1:].size
    patched, res = apply_itae(g, cfg)
    assert res.matched["attention_blocks"] == 2 and not res.matched.get("decomposed_attention")
    onnx.checker.check_model(patched)
    got = _run(patched, tmp_path / "p.onnx", images.numpy())
    with torch.no_grad():
        want = ITAEReference(model, cfg)(images).numpy()
    par = compare(want, got)
    assert par.max_abs <= 1e-4 and par.cos_min >= 0.99999, (opset, par)
