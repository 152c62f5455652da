"""GPU tests of TensorRT engines (marked gpu): a ViT-S/14 (random weights, 224 px, ITAE applied by
the graph pass when it is available) built in fp32 and fp16 and compared with the PyTorch reference.

Run on a machine with an NVIDIA GPU and `pip install -e ".[test,trt,gpu]"`: `pytest -m gpu -v`
(or tools/gpu_check.sh). Everything skips, with the reason, where there is no GPU or no TensorRT.
These tests have NOT been run yet (no GPU was available while they were written).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

IMG = 224
GROUPS, PER_GROUP = 4, 4  # a fixed batch with cluster structure: 4 base images, 4 noisy copies each


def _gpu() -> dict[str, str]:
    from itae_export.engine import gpu_info

    info = gpu_info()
    if info is None:
        pytest.skip("no NVIDIA GPU visible (nvidia-smi / torch.cuda find none)")
    return info


# Module scope, listed before `vits` in each test, so the skip happens before the model is built
# (pytest sets up wider-scoped fixtures first).
@pytest.fixture(scope="module")
def needs_trt() -> None:
    from itae_export.engine import import_tensorrt

    if import_tensorrt()[0] is None:
        pytest.skip(f'TensorRT Python package not usable ({import_tensorrt()[1]}; pip install -e ".[trt]")')
    _gpu()


@pytest.fixture(scope="module")
def needs_ort_cuda() -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime-gpu not installed")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip('onnxruntime has no CUDAExecutionProvider here (pip install -e ".[gpu]")')
    _gpu()


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    """(onnx_path, x, reference_outputs, itae_applied) for ViT-S/14 at 224 px (built once)."""
    torch = pytest.importorskip("torch", reason="torch is needed for the PyTorch reference")
    onnx = pytest.importorskip("onnx", reason="onnx is needed to apply the ITAE pass")
    models = pytest.importorskip("itae_export.models", reason="itae_export.models (lead) not available yet")
    export = pytest.importorskip("itae_export.export", reason="itae_export.export (lead) not available yet")
    from graph_passes.config import ITAEConfig
    from itae_export.reference import ITAEReference

    emb = models.build_model("dinov2_vits14", random_weights=True, seed=0, img_size=IMG).eval()
    d = tmp_path_factory.mktemp("vits_engine")
    plain = export.export_onnx(emb, d / "plain.onnx", img_size=IMG)
    cfg = ITAEConfig()
    try:
        from graph_passes.itae import apply_itae
    except ImportError:
        apply_itae = None
    if apply_itae is not None:
        patched, _ = apply_itae(onnx.load(str(plain)), cfg, num_prefix_tokens=emb.num_prefix_tokens)
        onnx_path = d / "itae.onnx"
        onnx.save(patched, str(onnx_path))
        ref_module = ITAEReference(emb, cfg).eval()
    else:  # the pass is not there yet: check the plain model
        onnx_path, ref_module = plain, ITAEReference(emb, None).eval()
    g = torch.Generator().manual_seed(123)
    base = torch.randn(GROUPS, 3, IMG, IMG, generator=g)
    x = base.repeat_interleave(PER_GROUP, 0) + 0.1 * torch.randn(GROUPS * PER_GROUP, 3, IMG, IMG, generator=g)
    with torch.no_grad():
        ref = ref_module(x).numpy()
    return onnx_path, x.numpy(), ref, apply_itae is not None


def _cos_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def _build_and_run(vits, tmp_path, precision: str) -> tuple[np.ndarray, dict]:
    from itae_export.engine import EngineOptions, build_engine
    from itae_export.trt_runner import TrtRunner

    onnx_path, x, _, _ = vits
    engine_path = tmp_path / f"vits_{precision}.engine"
    opts = EngineOptions(precision=precision, min_batch=1, opt_batch=8, max_batch=16,
                         timing_cache=tmp_path.parent / "timing.cache")
    res = build_engine(onnx_path, engine_path, opts, gpu=_gpu())
    assert res.precision == precision
    return TrtRunner(engine_path).run(x), res.to_dict()


def test_fp32_engine_matches_pytorch(needs_trt, vits, tmp_path):
    out, _ = _build_and_run(vits, tmp_path, "fp32")
    ref = vits[2]
    assert out.shape == ref.shape
    assert _cos_min(ref, out) >= 0.99999


def test_fp16_engine_matches_pytorch_and_kmeans(needs_trt, vits, tmp_path):
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    out, res = _build_and_run(vits, tmp_path, "fp16")
    ref = vits[2]
    assert res["fp32_layers"]  # LayerNorm/Softmax (and ITAE) layers were pinned to fp32
    if vits[3]:
        assert any(n.startswith("itae/") for n in res["fp32_layers"]), res["fp32_layers"]
    assert _cos_min(ref, out) >= 0.999
    km = dict(n_clusters=GROUPS, n_init=10, random_state=0)
    a = KMeans(**km).fit_predict(ref.astype(np.float64))
    b = KMeans(**km).fit_predict(out.astype(np.float64))
    assert adjusted_rand_score(a, b) == 1.0, (a, b)  # identical assignments (up to label names)


def test_build_engine_artifact_on_gpu_writes_sidecar(needs_trt, vits, tmp_path):
    from itae_export import engine as eng

    onnx_path, x, ref, _ = vits
    from itae_export.outputs import OutputTransaction
    from itae_export.results import RunInfo

    opts = eng.EngineOptions(precision="fp16", max_batch=16, opt_batch=8)
    engine_path = onnx_path.parent / "cli.engine"
    run = RunInfo(model="dinov2_vits14", img_size=IMG, num_prefix_tokens=1, itae=None, exporter="dynamo",
                  reference_inputs=x, reference_outputs=ref)
    with OutputTransaction(engine_path, extra=[onnx_path.parent / "cli.engine.json"]) as txn:
        summary = eng.build_engine_artifact(onnx_path, engine_path, opts, run, txn)
    side = json.loads((onnx_path.parent / "cli.engine.json").read_text())
    assert summary["parity"]["ok"] is True and side["parity"]["cos_min"] >= 0.999
    assert side["gpu"]["name"] and side["tensorrt_version"][0].isdigit()


def test_ort_cuda_provider_matches_pytorch(needs_ort_cuda, vits):
    import onnxruntime as ort

    from itae_export.trt_runner import check_session_providers, ort_gpu_providers

    onnx_path, x, ref, _ = vits
    sess = ort.InferenceSession(str(onnx_path), providers=ort_gpu_providers("cuda"))
    check_session_providers(sess, "cuda")
    (out,) = sess.run(None, {"pixel_values": x})
    assert _cos_min(ref, out) >= 0.9999  # ORT's CUDA EP may use TF32 matmuls
