"""Fast CPU paths for ONNX Runtime and the accuracy they cost:
- int8: dynamic int8 quantization of an ITAE graph, with the ITAE nodes and the whole final
  transformer block kept in fp32;
- fused: exact fp32, the attention of every block but the final one fused into
  com.microsoft.MultiHeadAttention (graph_passes.fuse_attention).

Why the final block stays fp32: ITAE flags tokens by the length of their v (or q/k) vectors and
edits the final attention's logits; int8 rounding of the qkv projection would move those lengths
near the threshold and change which tokens are flagged. The final block is also where the output
embedding is formed, so its rounding error would reach the output undamped. The earlier blocks'
MatMuls (most of the FLOPs) are quantized.

Used by `itae-export --fast-path {int8,fused}` (flags added through add_cli_args).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graph_passes import metadata as md
from graph_passes.final_block import final_block_nodes
from graph_passes.graph import external_locations, relocate_external
from graph_passes.match import MatchError

from .errors import ModelError
from .outputs import OutputTransaction

FAST_PATHS = ("none", "fused", "int8")
META_FAST_PATH = md.FAST_PATH
META_ACCURACY = md.FAST_PATH_ACCURACY
FAST_PATH_VALUE = "int8-dynamic"
FUSED_VALUE = "fp32-fused-attention"
FAST_PATH_VALUES = {"int8": FAST_PATH_VALUE, "fused": FUSED_VALUE}
# the fused path claims exactness: cosine to the fp32 PyTorch ITAE reference at least this
FUSED_MIN_COSINE = 0.99999
# ops that carry weights; only MatMul is quantized (graph_passes.int8), Gemm is named for the
# final-block check: our exports have none
QUANTIZED_OPS = ("MatMul", "Gemm")
# weight type: "qint8" (signed weights, uint8 activations = U8S8), see quantize_int8
DEFAULT_WEIGHT_TYPE = "qint8"
EVAL_K = 10


# ------------------------------------------------------------------------------------- quantize
def quantize_int8(onnx_in: str | Path, onnx_out: str | Path, exclude: set[str] | None = None, *,
                  weight_type: str = DEFAULT_WEIGHT_TYPE, per_channel: bool = True) -> Path:
    """Dynamic int8 quantization (weights int8 offline, activations uint8 per call) of the MatMul
    nodes of `onnx_in` except `exclude` (default: final_block_nodes), by graph_passes.int8: the
    same graph and bit-identical weights as onnxruntime's quantize_dynamic with these settings, but
    weights are streamed one at a time (ViT-g: 0.17 GB peak and 14 s, against 14.1 GB and 93 s for
    quantize_dynamic). Written through an output transaction on `onnx_out` (staged beside it, then
    committed with its `.data` file; an existing `onnx_out` is replaced, the input never): external
    data format when the input has it, modes never wider than the input's. Keeps the input's
    metadata_props and adds itae_export.fast_path = int8-dynamic.

    weight_type "qint8" (U8S8 MatMulInteger) is the default: on x86 with VNNI (the dev box) it was
    1.3-1.4x faster than "quint8" (U8U8) on ViT-S/14 at 224 px (ratio of minima, B=1 and 8) at the
    same accuracy (cosine to the fp32 reference within 1e-6); on CPUs without VNNI, U8S8 may
    saturate and "quint8" is the safer choice.

    per_channel (default): one weight scale per output column. On random-weight ViT-S/14 (224 px,
    200 digits) it raised the centred cosine to the fp32 model from 0.956 to 0.969 (min 0.84 ->
    0.89) at the same speed (ratio 0.99, batch 8), so it is the default.
    """
    from graph_passes.int8 import Int8Error, quantize_dynamic_int8

    src, out = Path(onnx_in), Path(onnx_out)
    if src.resolve() == out.resolve():
        raise ValueError(f"{out} is the input; choose another output path")
    if exclude is None:
        exclude = final_block_nodes(onnx.load(str(src), load_external_data=False))
    with OutputTransaction(out, inputs=[src, *_data_files(src)], force=True) as tx:
        staged = tx.stage_path(out)  # same name: the .data file is written as `<out name>.data` beside it
        try:
            quantize_dynamic_int8(src, staged, exclude=set(exclude), per_channel=per_channel,
                                  weight_type=weight_type)
        except Int8Error as e:
            raise ModelError(f"int8 quantization of {src} failed: {e}") from e
        q = onnx.load(str(staged), load_external_data=False)
        md.set_metadata_props(q, {md.FAST_PATH: FAST_PATH_VALUE,
                                  md.FAST_PATH_WEIGHTS: weight_type + ("-per-channel" if per_channel else "")})
        onnx.save_model(q, str(staged))  # graph only: the .data file beside it stays referenced
        tx.add(staged, out, source=_strictest([src, *_data_files(src)]))
        tx.commit()
    return out


def _data_files(onnx_path: Path) -> list[Path]:
    """The external data files an ONNX file references (plain names beside it)."""
    m = onnx.load(str(onnx_path), load_external_data=False)
    return [onnx_path.parent / loc for loc in external_locations(m)]


def _strictest(files: list[Path]) -> Path:
    """The existing file with the fewest permission bits: its mode caps the outputs' (0o644 & mode)."""
    present = [f for f in files if f.is_file()]
    return min(present, key=lambda f: bin(stat.S_IMODE(f.stat().st_mode)).count("1")) if present else files[0]


def fuse_model(onnx_in: str | Path, onnx_out: str | Path) -> dict[str, Any]:
    """Exact fp32 fast path: graph_passes.fuse_attention on `onnx_in` (weights never loaded), written
    to `onnx_out` in the same folder with its own external data file (a hard link to the input's,
    or a copy where the filesystem has no links). Returns the FusionResult as a dict.

    Measured (tools/bench_fusion.py, ViT-L/14 batch 8, 2 threads, one run): 0.95x the latency of the
    unfused fp32 graph, max abs 1.9e-6. On the int8 path it gained nothing (1.00x), so int8 does
    not fuse."""
    from graph_passes.fuse_attention import fuse_attention

    src, out = Path(onnx_in), Path(onnx_out)
    if src.parent.resolve() != out.parent.resolve() or src.resolve() == out.resolve():
        raise ValueError(f"fuse_model writes beside its input: {out} must be another file in {src.parent}")
    graph = onnx.load(str(src), load_external_data=False)
    _inline_small_external(graph, src.parent)
    fused, res = fuse_attention(graph)
    if res.num_fused == 0:
        raise MatchError("fuse attention", f"no block of {src} could be fused: {res.summary()}",
                         "use --fast-path int8 or no fast path for this graph")
    loc = _single_data_file(fused)
    with OutputTransaction(out, inputs=[src, *_data_files(src)], force=True) as tx:
        staged = tx.stage_path(out)
        source = src
        if loc:
            data = src.parent / loc
            source = _strictest([src, data])
            staged_data = tx.staging / (out.name + ".data")
            # a hard link shares the input's inode, whose mode the commit sets: link only when that
            # mode stays as it is (0o644 & the strictest source's mode), else copy
            final_mode = 0o644 & stat.S_IMODE(source.stat().st_mode)
            linked = False
            if stat.S_IMODE(data.stat().st_mode) == final_mode:
                try:
                    os.link(data, staged_data)
                    linked = True
                except OSError:
                    pass
            if not linked:
                shutil.copyfile(data, staged_data)
            relocate_external(fused, loc, staged_data.name)
        md.set_metadata_props(fused, {md.FAST_PATH: FUSED_VALUE,
                                      md.FUSED_ATTENTION: json.dumps(res.to_dict(), sort_keys=True)})
        onnx.save_model(fused, str(staged))
        tx.add(staged, out, source=source)
        tx.commit()
    return res.to_dict()


def _inline_small_external(model: onnx.ModelProto, base_dir: Path, max_elems: int = 64) -> None:
    """Read scalar/shape-sized initializers that were saved as external data (size_threshold=0)
    back into the graph: the fusion pass reads scales and shapes but never weights."""
    from onnx.external_data_helper import load_external_data_for_tensor

    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and int(np.prod(t.dims, dtype=np.int64)) <= max_elems:
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


def add_metadata(onnx_path: str | Path, extra: dict[str, str]) -> None:
    """Add/replace metadata entries of a model in place (graph file only, through an output
    transaction: the new graph is staged beside it and replaces it in one rename, referencing the
    external data files in place; its mode stays as it was, at most 0o644)."""
    p = Path(onnx_path)
    m = onnx.load(str(p), load_external_data=False)
    md.set_metadata_props(m, extra)
    with OutputTransaction(p, force=True, shared=_data_files(p)) as tx:
        staged = tx.stage_path(p)
        onnx.save_model(m, str(staged))
        tx.add(staged, p, source=p)
        tx.commit()


def quantized_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes quantize_dynamic produced (MatMulInteger/DynamicQuantizeLinear/...)."""
    q_ops = ("MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "ConvInteger", "QLinearMatMul")
    return {n.name for n in model.graph.node if n.op_type in q_ops}


# ------------------------------------------------------------------------------------- accuracy
def digits_eval_inputs(img_size: int, n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded subset of n sklearn digits with DINOv2 preprocessing at img_size: (x [n,3,S,S], labels)."""
    from .data import Preprocess, load_digits_dataset

    ds = load_digits_dataset("all").subset(n, seed=seed)
    prep = Preprocess(img_size=img_size)
    x = np.stack([prep(ds.load(i)) for i in range(len(ds))]).astype(np.float32)
    return x, ds.labels


# Targets of the fast path (issue 7): cosine to the fp32 reference and k-means assignment ARI.
TARGET_COSINE = 0.99
TARGET_ARI = 0.95


def centered_cosine(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per-row cosine after subtracting the reference's mean embedding.

    Plain cosine hides error when every embedding shares a large common component (random-weight
    models: plain cosine 0.9999 between images of different digits); centring measures the error
    against what actually differs between images, which is what k-means sees."""
    from .parity import cosine_rows

    mean = ref.mean(axis=0, keepdims=True)
    return cosine_rows(ref - mean, other - mean)


def error_to_spread(ref: np.ndarray, other: np.ndarray) -> float:
    """Median per-image error |other - ref| over the median distance between two reference images."""
    err = np.linalg.norm(other - ref, axis=1)
    sq = (ref * ref).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * ref @ ref.T, 0.0)
    iu = np.triu_indices(len(ref), 1)
    spread = float(np.median(np.sqrt(d2[iu]))) if iu[0].size else 0.0
    return float(np.median(err) / spread) if spread > 0 else float("inf")


def kmeans_agreement(ref: np.ndarray, other: np.ndarray, *, k: int, seed: int) -> dict[str, float]:
    """ARI figures that separate int8 error from k-means' own instability.

    assignment_ari: k-means (k, seed) on each set, independently: the issue's metric.
    seed_ari: k-means on the reference with seed vs seed + 1: the same metric with no int8 at all.
      When it is below the target, the embeddings have no stable cluster structure and
      assignment_ari cannot tell int8 error from k-means picking another local optimum.
    shared_init_ari: k-means on `other` started from the reference's final centroids: int8's effect
      on one clustering, without the init lottery.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    a, b = np.asarray(ref, np.float64), np.asarray(other, np.float64)
    km_ref = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(a)
    km_other = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(b)
    km_seed = KMeans(n_clusters=k, n_init=10, random_state=seed + 1).fit(a)
    km_shared = KMeans(n_clusters=k, init=km_ref.cluster_centers_, n_init=1).fit(b)
    return {
        "assignment_ari": float(adjusted_rand_score(km_ref.labels_, km_other.labels_)),
        "seed_ari": float(adjusted_rand_score(km_ref.labels_, km_seed.labels_)),
        "shared_init_ari": float(adjusted_rand_score(km_ref.labels_, km_shared.labels_)),
        "labels_reference": km_ref.labels_.astype(np.int64),
        "labels_fast": km_other.labels_.astype(np.int64),
    }


def verdict(digits: dict[str, Any]) -> dict[str, Any]:
    """Targets met, missed, or not measurable on these embeddings (see kmeans_agreement): an ARI
    below the target only counts as missed when fp32 k-means agrees with itself across seeds."""
    cos_ok = digits["cos_min"] >= TARGET_COSINE
    why = ""
    if digits["assignment_ari"] >= TARGET_ARI:
        ari = "met"
    elif digits["seed_ari"] < TARGET_ARI:
        ari = "not measurable"
        why = (f"fp32 k-means is itself unstable on these embeddings (ARI {digits['seed_ari']:.3f} between "
               f"seeds {digits['seed']} and {digits['seed'] + 1}, below the {TARGET_ARI} target); "
               "rerun with pretrained --weights")
    else:
        ari = "missed"
    return {"cosine": "met" if cos_ok else "missed", "ari": ari, "why": why,
            "target_cosine": TARGET_COSINE, "target_ari": TARGET_ARI}


def accuracy_report(reference: Callable[[np.ndarray], np.ndarray] | tuple[np.ndarray, np.ndarray],
                    fast_onnx: str | Path | Callable[[np.ndarray], np.ndarray], inputs: np.ndarray,
                    digits: tuple[np.ndarray, np.ndarray], *, k: int = EVAL_K, seed: int = 0,
                    fast_path: str = FAST_PATH_VALUE) -> dict[str, Any]:
    """Accuracy of the fast model against the fp32 reference.

    reference: a function x -> embeddings (the PyTorch ITAE reference) or its precomputed outputs
    (on `inputs`, on the digits images). fast_onnx: the fast ONNX model (run on ONNX Runtime) or any
    function x -> embeddings (an OpenVINO IR's runner). inputs: the validation images. digits:
    (images, labels).
    Returns cosine statistics (itae_export.parity.compare) on both sets; on the digits also the
    centred cosine, the error relative to the spread between images, the k-means ARI figures of
    kmeans_agreement, each one's ARI to the digit labels, and a verdict against the targets.
    """
    from .cluster import clustering_metrics
    from .parity import compare
    from .runtime import OrtRunner, run_batched

    dx, labels = digits
    if callable(reference):
        ref_val, ref_digits = run_batched(reference, inputs), run_batched(reference, dx)
    else:
        ref_val, ref_digits = reference
    run = fast_onnx if callable(fast_onnx) else OrtRunner(fast_onnx).run
    fast_val, fast_digits = run_batched(run, inputs), run_batched(run, dx)
    parity = compare(ref_digits, fast_digits)
    agree = kmeans_agreement(ref_digits, fast_digits, k=k, seed=seed)
    cc = centered_cosine(np.asarray(ref_digits, np.float64), np.asarray(fast_digits, np.float64))
    d = {
        "images": int(len(dx)),
        "k": int(k),
        "seed": int(seed),
        "cos_min": parity.cos_min,
        "cos_mean": parity.cos_mean,
        "centered_cos_min": float(cc.min()),
        "centered_cos_mean": float(cc.mean()),
        "error_to_spread": error_to_spread(np.asarray(ref_digits, np.float64), np.asarray(fast_digits, np.float64)),
        "assignment_ari": agree["assignment_ari"],
        "seed_ari": agree["seed_ari"],
        "shared_init_ari": agree["shared_init_ari"],
        "label_ari_reference": clustering_metrics(labels, agree["labels_reference"])["ari"],
        "label_ari_fast": clustering_metrics(labels, agree["labels_fast"])["ari"],
    }
    return {
        "fast_path": fast_path,
        "validation": compare(ref_val, fast_val).to_dict(),
        "digits": d,
        "verdict": verdict(d),
    }


def format_report(rep: dict[str, Any]) -> str:
    v, d, ok = rep["validation"], rep["digits"], rep["verdict"]
    kind = {FAST_PATH_VALUE: "int8", FUSED_VALUE: "fused"}.get(rep["fast_path"], rep["fast_path"])
    text = (f"{kind} vs fp32 PyTorch ITAE reference: cosine min {v['cos_min']:.6f} / mean {v['cos_mean']:.6f} on "
            f"{v['rows']} validation images; digits ({d['images']} images): cosine min {d['cos_min']:.6f} / mean "
            f"{d['cos_mean']:.6f}, centred cosine min {d['centered_cos_min']:.4f} / mean "
            f"{d['centered_cos_mean']:.4f}, error/spread {d['error_to_spread']:.3f}; k-means (k={d['k']}) ARI "
            f"{kind} vs fp32 {d['assignment_ari']:.4f} (fp32 vs fp32 other seed {d['seed_ari']:.4f}, {kind} from "
            f"the fp32 centroids {d['shared_init_ari']:.4f}; label ARI fp32 {d['label_ari_reference']:.4f}, "
            f"{kind} {d['label_ari_fast']:.4f}). Targets: cosine >= {ok['target_cosine']} {ok['cosine']}, "
            f"ARI >= {ok['target_ari']} {ok['ari']}")
    return text + (f": {ok['why']}" if ok["why"] else "")


# ------------------------------------------------------------------------------------- staging helpers
def move_model(src: Path, dst: Path) -> Path:
    """Rename a staged model and its one external data file (re-pointed to `<dst name>.data`) to
    `dst` in the same folder; weights are never loaded."""
    m = onnx.load(str(src), load_external_data=False)
    loc = _single_data_file(m)
    if loc:
        new = dst.name + ".data"
        os.replace(src.parent / loc, dst.parent / new)
        relocate_external(m, loc, new)
    onnx.save_model(m, str(dst))
    if src != dst:
        src.unlink()
    return dst


def add_accuracy_metadata(onnx_path: Path, report: dict[str, Any]) -> None:
    add_metadata(onnx_path, {META_ACCURACY: accuracy_json(report)})


def _single_data_file(model: onnx.ModelProto) -> str | None:
    """The one external data file the model references, or None when its weights are inline."""
    locs = external_locations(model)
    if len(locs) > 1:
        raise ValueError("the model keeps its weights in several files; expected one .data file")
    return locs[0] if locs else None


def accuracy_json(rep: dict[str, Any]) -> str:
    return json.dumps(rep, sort_keys=True)
