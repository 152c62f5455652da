"""End to end on tiny random DINOv2 models: export once per exporter and variant, apply the pass
for every combination of options, run ONNX Runtime and compare with the PyTorch ITAE reference."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graph_passes.config import ITAEConfig
from graph_passes.itae import apply_itae
from itae_export.parity import compare
from itae_export.reference import ITAEReference, last_block_stats

EXPORTERS = ("dynamo", "torchscript")
VARIANTS = ("plain", "reg")


def _gap_threshold(norms: np.ndarray, prefix: int) -> float:
    """Middle of the widest gap among the central sorted patch norms: some tokens above, some below,
    and no token close enough to the threshold for float noise to flip it."""
    vals = np.sort(norms[..., prefix:].ravel())
    lo, hi = len(vals) // 4, 3 * len(vals) // 4
    i = lo + int(np.argmax(np.diff(vals[lo:hi])))
    return float((vals[i] + vals[i + 1]) / 2)


def _session(model: onnx.ModelProto, path) -> ort.InferenceSession:
    onnx.save_model(model, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_option_matrix(exporter, variant, exported, tiny_models, images, tmp_path):
    model = tiny_models[variant]
    prefix = model.num_prefix_tokens
    src_path = exported(variant, exporter)
    base = onnx.load(str(src_path), load_external_data=False)
    x = images.numpy()
    with torch.no_grad():
        baseline = model(images).numpy()
    combos = list(itertools.product("qkv", ("token", "head"), ("high", "low"), ("min-logit", "mask", "scale")))
    flagged_counts = []
    for src, scope, direction, att in combos:
        probe = ITAEConfig(norm_source=src, norm_scope=scope)
        thr = _gap_threshold(last_block_stats(model, images, probe)["norms"], prefix)
        cfg = ITAEConfig(norm_source=src, norm_scope=scope, direction=direction, attenuation=att, threshold=thr, alpha=0.2)
        stats = last_block_stats(model, images, cfg)
        n_flag, n_total = int(stats["flagged"].sum()), stats["flagged"][..., prefix:].size
        assert 0 < n_flag < n_total, f"{cfg}: flagged {n_flag} of {n_total}"
        flagged_counts.append(n_flag)
        patched, result = apply_itae(base, cfg)  # prefix count inferred from the graph
        assert result.num_prefix_tokens == prefix
        got = _session(patched, src_path.parent / f"p-{exporter}-{variant}.onnx").run(None, {"pixel_values": x})[0]
        with torch.no_grad():
            want = ITAEReference(model, cfg)(images).numpy()
        par = compare(want, got)
        assert par.max_abs <= 1e-4 and par.cos_min >= 0.99999, f"{exporter}/{variant} {cfg}: {par}"
        assert compare(baseline, want).max_abs > 1e-4, f"{cfg}: ITAE changed nothing; the check would prove nothing"
    assert len(set(flagged_counts)) > 1


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_relative_threshold_and_rows(exporter, exported, tiny_models, images):
    model = tiny_models["reg"]
    src_path = exported("reg", exporter)
    base = onnx.load(str(src_path), load_external_data=False)
    norms = last_block_stats(model, images, ITAEConfig())["norms"][:, model.num_prefix_tokens:]
    ratios = norms / norms.mean(axis=-1, keepdims=True)
    gamma = _gap_threshold(ratios, 0)
    for stat, rows in (("mean", "cls"), ("median", "all")):
        g = gamma if stat == "mean" else _gap_threshold(norms / np.median(norms, axis=-1, keepdims=True), 0)
        cfg = ITAEConfig(relative_threshold=g, relative_stat=stat, rows=rows)
        flagged = last_block_stats(model, images, cfg)["flagged"]
        assert 0 < flagged.sum() < flagged[:, model.num_prefix_tokens:].size
        patched, _ = apply_itae(base, cfg)
        got = _session(patched, src_path.parent / f"r-{exporter}.onnx").run(None, {"pixel_values": images.numpy()})[0]
        with torch.no_grad():
            want = ITAEReference(model, cfg)(images).numpy()
        assert compare(want, got).ok(1e-4, 0.99999)


def test_baseline_export_matches_model(exported, tiny_models, images):
    for variant, exporter in itertools.product(VARIANTS, EXPORTERS):
        s = ort.InferenceSession(str(exported(variant, exporter)), providers=["CPUExecutionProvider"])
        got = s.run(None, {"pixel_values": images.numpy()})[0]
        with torch.no_grad():
            want = tiny_models[variant](images).numpy()
        assert compare(want, got).ok(1e-4, 0.99999)
        assert [i.name for i in s.get_inputs()] == ["pixel_values"] and [o.name for o in s.get_outputs()] == ["embedding"]
        # dynamic batch
        assert s.run(None, {"pixel_values": images.numpy()[:1]})[0].shape == (1, tiny_models[variant].spec.embed_dim)


def test_pass_works_without_loaded_weights(tmp_path, tiny_models, images):
    """The dynamo export with external data: patch a graph loaded without its weights, save it
    beside the data file, run it."""
    from itae_export.onnx_export import export_onnx

    path = export_onnx(tiny_models["plain"], tmp_path / "ext.onnx", img_size=56, external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    light = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in light.graph.initializer)
    cfg = ITAEConfig(relative_threshold=1.01)
    patched, _ = apply_itae(light, cfg)
    onnx.save_model(patched, str(tmp_path / "ext-itae.onnx"))
    assert (tmp_path / "ext-itae.onnx").stat().st_size < 200_000  # weights were not inlined
    got = ort.InferenceSession(str(tmp_path / "ext-itae.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": images.numpy()})[0]
    with torch.no_grad():
        want = ITAEReference(tiny_models["plain"], cfg)(images).numpy()
    assert compare(want, got).ok()


def test_planted_artifacts_flagged_and_attenuated(planted, tmp_path):
    """The pass flags exactly the planted artifact tokens and the CLS attention mass on them drops:
    with min-logit each keeps only the weight of the least-attended patch."""
    from itae_export.onnx_export import export_onnx

    model, imgs, mask = planted
    cfg = ITAEConfig()  # defaults: v, token, high, relative 2.0 x mean, min-logit, CLS row
    st = last_block_stats(model, imgs, cfg)
    p = model.num_prefix_tokens
    assert np.array_equal(st["flagged"][:, p:], mask.numpy())
    before, after = st["cls_attn_before"][:, :, p:], st["cls_attn_after"][:, :, p:]
    m = mask.numpy()[:, None, :]
    mass_before, mass_after = (before * m).sum(-1), (after * m).sum(-1)
    assert np.all(mass_before > 0.3), "the planted artifacts should draw the CLS attention"
    assert np.all(mass_after < 0.25 * mass_before)
    # flagged tokens keep exactly the weight of the least-attended patch of their row
    for b, h in itertools.product(range(after.shape[0]), range(after.shape[1])):
        row = after[b, h]
        assert np.allclose(row[mask[b].numpy()], row.min(), rtol=1e-5)
    # the ONNX pass does the same
    path = export_onnx(model, tmp_path / "planted.onnx", img_size=imgs.shape[-1])
    patched, res = apply_itae(onnx.load(str(path), load_external_data=False), cfg)
    got = _session(patched, tmp_path / "planted-itae.onnx").run(None, {"pixel_values": imgs.numpy()})[0]
    with torch.no_grad():
        want = ITAEReference(model, cfg)(imgs).numpy()
        base = model(imgs).numpy()
    assert compare(want, got).ok()
    assert compare(base, got).cos_min < 0.9999  # ITAE visibly changed the embedding
