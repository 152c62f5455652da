"""Fast CPU path (itae_export.fastpath, itae-export --fast-path int8) on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from graph_passes.config import ITAEConfig
from graph_passes.match import MatchError
from itae_export.fastpath import (
    META_ACCURACY,
    META_FAST_PATH,
    accuracy_report,
    digits_eval_inputs,
    final_block_nodes,
    quantize_int8,
    quantized_nodes,
)
from itae_export.runtime import OrtRunner

IMG = 56  # tests/conftest.py: tiny models are 56 px

QUANT_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul")


@pytest.fixture(scope="module")
def patched(exported, tmp_path_factory) -> Path:
    from graph_passes.itae import apply_itae

    model, _ = apply_itae(onnx.load(str(exported("plain", "dynamo"))), ITAEConfig(), num_prefix_tokens=1,
                          metadata={"itae_export.model": "dinov2_vits14"})
    out = tmp_path_factory.mktemp("fast") / "itae.onnx"
    onnx.save_model(model, str(out))
    return out


def test_final_block_nodes_structure(patched, exported):
    model = onnx.load(str(patched), load_external_data=False)
    nodes = list(model.graph.node)
    block = final_block_nodes(model)
    softmaxes = [n for n in nodes if n.op_type == "Softmax"]
    norms = [n for n in nodes if n.op_type == "LayerNormalization"]
    assert softmaxes[-1].name in block
    assert {n.name for n in nodes if n.name.startswith("itae/")} <= block
    assert {n.name for n in norms[-3:]} <= block  # last block's norm1, norm2 and the final norm
    assert norms[0].name not in block and norms[1].name not in block
    # the first block's attention MatMuls (QK and PV around the first Softmax) stay outside
    first_sm = softmaxes[0]
    qk = next(n for n in nodes if first_sm.input[0] in n.output or n.output[0] in first_sm.input)
    pv = next(n for n in nodes if n.op_type == "MatMul" and first_sm.output[0] in n.input)
    assert qk.name not in block and pv.name not in block
    assert any(n.op_type == "MatMul" and n.name not in block for n in nodes)
    # the unpatched graph gives the same block, without the ITAE nodes
    base = onnx.load(str(exported("plain", "dynamo")), load_external_data=False)
    assert final_block_nodes(base) == {b for b in block if not b.startswith("itae/")}


def test_final_block_refuses_decomposed_norm(patched):
    model = onnx.load(str(patched), load_external_data=False)
    for n in model.graph.node:
        if n.op_type == "LayerNormalization":
            n.op_type = "CustomNorm"  # stands in for a ReduceMean/Sub/Pow... decomposition
    with pytest.raises(MatchError, match="LayerNormalization"):
        final_block_nodes(model)


def test_quantize_int8_keeps_final_block_and_metadata(patched, tiny_models, images, tmp_path):
    from itae_export.reference import ITAEReference

    src = onnx.load(str(patched), load_external_data=False)
    excluded = final_block_nodes(src)
    out = quantize_int8(patched, tmp_path / "int8.onnx", excluded)
    q = onnx.load(str(out))
    assert quantized_nodes(q), "no MatMul outside the final block was quantized"
    by_name = {n.name: n for n in q.graph.node}
    producer = {o: n for n in q.graph.node for o in n.output}
    for name in excluded:
        orig = next(n for n in src.graph.node if n.name == name)
        assert name in by_name and by_name[name].op_type == orig.op_type, name
        feeders = [producer[i] for i in by_name[name].input if i in producer]
        assert not any(f.op_type in QUANT_OPS for f in feeders), name
    meta = {p.key: p.value for p in q.metadata_props}
    assert {p.key: p.value for p in src.metadata_props}.items() <= meta.items()
    assert meta[META_FAST_PATH] == "int8-dynamic"

    x = images.numpy()
    got = OrtRunner(out).run(x)
    ref = ITAEReference(tiny_models["plain"], ITAEConfig()).eval()
    with torch.no_grad():
        want = ref(images).numpy()
    assert got.shape == want.shape == (3, tiny_models["plain"].spec.embed_dim)
    digits = digits_eval_inputs(IMG, 20, seed=0)
    rep = accuracy_report(lambda a: ref(torch.from_numpy(a)).detach().numpy(), out, x, digits, k=10)
    assert rep["validation"]["cos_min"] >= 0.99
    assert rep["digits"]["images"] == 20 and -1.0 <= rep["digits"]["assignment_ari"] <= 1.0
    assert rep["digits"]["cos_min"] >= 0.99
    d = rep["digits"]
    for key in ("assignment_ari", "seed_ari", "shared_init_ari"):
        assert -1.0 <= d[key] <= 1.0, key
    assert -1.0 <= d["centered_cos_min"] <= d["centered_cos_mean"] <= 1.0 and d["error_to_spread"] >= 0.0
    assert rep["verdict"]["cosine"] == "met"
    assert rep["verdict"]["ari"] in ("met", "missed", "not measurable")


def test_quantize_int8_external_data(patched, tmp_path):
    ext = tmp_path / "ext" / "m.onnx"
    ext.parent.mkdir()
    onnx.save_model(onnx.load(str(patched)), str(ext), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    plain = quantize_int8(patched, tmp_path / "plain.onnx")
    out = quantize_int8(ext, tmp_path / "out" / "q.onnx")
    files = sorted(p.name for p in out.parent.iterdir())
    assert len(files) == 2 and "q.onnx" in files  # the graph and its .data, no temporaries left
    assert (ext.parent / "m.onnx.data").exists()  # input untouched
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta[META_FAST_PATH] == "int8-dynamic"
    x = np.random.default_rng(3).standard_normal((2, 3, IMG, IMG)).astype(np.float32)
    np.testing.assert_allclose(OrtRunner(out).run(x), OrtRunner(plain).run(x), rtol=1e-5, atol=1e-5)
    tensor = quantize_int8(patched, tmp_path / "tensor.onnx", per_channel=False)
    meta_t = {p.key: p.value for p in onnx.load(str(tensor), load_external_data=False).metadata_props}
    assert meta_t["itae_export.fast_path_weights"] == "qint8" and meta["itae_export.fast_path_weights"] == \
        "qint8-per-channel"
    # different weight scales, different rounding: the two int8 models are not the same model
    assert not np.allclose(OrtRunner(tensor).run(x), OrtRunner(plain).run(x), rtol=0, atol=1e-7)


def test_cli_fast_path_end_to_end_and_refusal(tmp_path, capsys):
    from itae_export.cli import export_main

    tiny = ["dinov2_vits14", "--random-weights", "--depth", "2", "--img-size", str(IMG)]
    assert export_main([*tiny, "--out", str(tmp_path / "m.engine"), "--fast-path", "int8"]) == 2
    assert "TensorRT" in capsys.readouterr().err
    assert export_main([*tiny, "--out", str(tmp_path / "m.onnx"), "--int8-weights", "per-tensor"]) == 2
    assert "--int8-weights applies to --fast-path int8 only" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

    out = tmp_path / "m.onnx"
    assert export_main([*tiny, "--out", str(out), "--fast-path", "int8", "--fast-path-eval-images", "64"]) == 0
    text = capsys.readouterr().out
    assert "int8 vs fp32 PyTorch ITAE reference" in text and "ARI" in text and "Targets:" in text
    fp32 = tmp_path / "m.fp32.onnx"
    assert out.is_file() and fp32.is_file()
    q, f = onnx.load(str(out)), onnx.load(str(fp32))
    assert quantized_nodes(q) and not quantized_nodes(f)
    meta = {p.key: p.value for p in q.metadata_props}
    acc = json.loads(meta[META_ACCURACY])
    assert acc["digits"]["images"] == 64 and acc["validation"]["cos_min"] >= 0.99
    assert META_FAST_PATH not in {p.key for p in f.metadata_props}
    assert meta["itae_export.fast_path_weights"] == "qint8-per-channel"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fp32.onnx", "m.onnx"]


def test_centered_cosine_and_spread_see_what_plain_cosine_hides():
    from itae_export.fastpath import centered_cosine, error_to_spread
    from itae_export.parity import compare

    rng = np.random.default_rng(0)
    common = 100.0 * rng.standard_normal(32)
    ref = common + rng.standard_normal((50, 32))  # images differ by a small part
    noisy = ref + 0.5 * rng.standard_normal(ref.shape)
    assert compare(ref, noisy).cos_min > 0.9999  # plain cosine: all fine
    cc = centered_cosine(ref, noisy)
    assert cc.mean() < 0.95  # centred: the error is a large part of what differs between images
    assert np.allclose(centered_cosine(ref, ref), 1.0)
    r = error_to_spread(ref, noisy)
    assert 0.2 < r < 0.6  # |noise| ~ 0.5*sqrt(32), spread ~ sqrt(2*32)
    assert error_to_spread(ref, ref) == 0.0


def test_kmeans_agreement_separates_instability_from_error():
    from itae_export.fastpath import kmeans_agreement, verdict

    rng = np.random.default_rng(1)
    centers = 20.0 * rng.standard_normal((4, 8))
    clustered = np.concatenate([c + rng.standard_normal((30, 8)) for c in centers])
    a = kmeans_agreement(clustered, clustered + 0.01 * rng.standard_normal(clustered.shape), k=4, seed=0)
    assert a["assignment_ari"] == a["seed_ari"] == a["shared_init_ari"] == 1.0
    base = {"cos_min": 0.999, "seed": 0}
    assert verdict({**base, **a})["ari"] == "met"
    # far-off embeddings: every figure drops, and the verdict says so
    b = kmeans_agreement(clustered, rng.standard_normal(clustered.shape), k=4, seed=0)
    assert b["assignment_ari"] < 0.5 and b["shared_init_ari"] < 0.5 and b["seed_ari"] == 1.0
    assert verdict({**base, **b})["ari"] == "missed"
    # no cluster structure: k-means disagrees with itself, the ARI target cannot be judged
    blob = rng.standard_normal((120, 8))
    c = kmeans_agreement(blob, blob + 0.3 * rng.standard_normal(blob.shape), k=10, seed=0)
    assert c["seed_ari"] < 0.95 and c["assignment_ari"] < 0.95
    v = verdict({**base, **c})
    assert v["ari"] == "not measurable" and "pretrained --weights" in v["why"]
    same = kmeans_agreement(blob, blob, k=10, seed=0)  # identical assignments meet the target anyway
    assert same["assignment_ari"] == 1.0 and verdict({**base, **same})["ari"] == "met"
    assert verdict({**base, **a, "cos_min": 0.5})["cosine"] == "missed"


def test_fuse_model_external_data_and_refusals(patched, tmp_path):
    from graph_passes.match import PassError
    from itae_export.fastpath import FUSED_VALUE, fuse_model

    src = tmp_path / "m.onnx"
    onnx.save_model(onnx.load(str(patched)), str(src), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    before = (src.parent / "m.onnx.data").read_bytes()
    out = tmp_path / "fused.onnx"
    res = fuse_model(src, out)
    assert res["num_fused"] == 1 and res["kept_final"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.onnx", "fused.onnx.data", "m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").read_bytes() == before  # input untouched
    g = onnx.load(str(out), load_external_data=False)
    assert {kv.value for t in g.graph.initializer for kv in t.external_data if kv.key == "location"} == \
        {"fused.onnx.data"}
    ops = [n.op_type for n in g.graph.node]
    assert ops.count("MultiHeadAttention") == 1 and ops.count("Softmax") == 1  # the final block's stays
    assert any(n.name.startswith("itae/") for n in g.graph.node)
    meta = {p.key: p.value for p in g.metadata_props}
    assert meta[META_FAST_PATH] == FUSED_VALUE and json.loads(meta["itae_export.fused_attention"])["num_fused"] == 1
    x = np.random.default_rng(5).standard_normal((2, 3, IMG, IMG)).astype(np.float32)
    np.testing.assert_allclose(OrtRunner(out).run(x), OrtRunner(patched).run(x), rtol=1e-5, atol=1e-5)
    # deleting the fp32 input does not break the fused model (own data file)
    (tmp_path / "m.onnx.data").unlink()
    assert np.isfinite(OrtRunner(out).run(x)).all()

    with pytest.raises(ValueError, match="beside its input"):
        fuse_model(out, tmp_path / "other" / "x.onnx")
    with pytest.raises(PassError, match="no block .* could be fused"):
        fuse_model(out, tmp_path / "again.onnx")  # already fused
    assert not (tmp_path / "again.onnx").exists()


def test_cli_fused_fast_path(tmp_path, capsys):
    from itae_export.cli import export_main
    from itae_export.fastpath import FUSED_VALUE

    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    repo = tmp_path / "repo"
    argv = ["dinov2_vits14", "--random-weights", "--depth", "3", "--img-size", str(IMG), "--out", str(out),
            "--fast-path", "fused", "--fast-path-eval-images", "30", "--triton-repo", str(repo)]
    assert export_main(argv) == 0
    text = capsys.readouterr().out
    assert "fused the attention of 2 blocks" in text and "fused vs fp32 PyTorch ITAE reference" in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.fp32.onnx", "m.onnx"]
    # the Triton copy is the fast model, on CPU instances by default (it is an ORT CPU path)
    (cfg_path,) = repo.glob("*/config.pbtxt")
    cfg = cfg_path.read_text()
    assert "onnxruntime_onnx" in cfg and "KIND_CPU" in cfg and "KIND_GPU" not in cfg
    (deployed,) = cfg_path.parent.glob("1/model.onnx")
    assert [n.op_type for n in onnx.load(str(deployed)).graph.node].count("MultiHeadAttention") == 2
    q = onnx.load(str(out))
    meta = {p.key: p.value for p in q.metadata_props}
    acc = json.loads(meta[META_ACCURACY])
    assert meta[META_FAST_PATH] == FUSED_VALUE and acc["fast_path"] == FUSED_VALUE
    assert acc["validation"]["cos_min"] >= 0.99999 and acc["digits"]["cos_min"] >= 0.99999
    assert [n.op_type for n in q.graph.node].count("MultiHeadAttention") == 2
    x = np.random.default_rng(6).standard_normal((2, 3, IMG, IMG)).astype(np.float32)
    np.testing.assert_allclose(OrtRunner(out).run(x), OrtRunner(out.parent / "m.fp32.onnx").run(x),
                               rtol=1e-5, atol=1e-5)


def test_cli_fused_gate_refuses_an_inexact_model(tmp_path, capsys, monkeypatch):
    from itae_export.cli import export_main
    from itae_export.errors import ParityError

    # an unreachable bar stands in for a fusion that changed the output
    monkeypatch.setattr("itae_export.fastpath.FUSED_MIN_COSINE", 1.5)
    out = tmp_path / "m.onnx"
    argv = ["dinov2_vits14", "--random-weights", "--depth", "2", "--img-size", str(IMG), "--out", str(out),
            "--fast-path", "fused", "--fast-path-eval-images", "10"]
    assert export_main(argv) == ParityError.exit_code
    assert "not exact" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written, no temporaries left
