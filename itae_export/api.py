"""The public Python API. Each function takes typed arguments, validates all of them before any work
starts, and returns a result object (or raises one ItaeError with a one-sentence message)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from graph_passes.config import ITAEConfig

from .errors import MissingDependencyError
from .graph_options import GraphOptions
from .patching import inspect, patch
from .results import ExportResult

_DEFAULT = object()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install counts as missing
        return False


def validate(artifact: str | Path, **kwargs: Any):
    """Parity of any artifact (ONNX, engine, Triton model version) against PyTorch or `against=`
    another artifact: itae-validate as a function (see itae_export.validation.validate for the
    arguments); returns a ValidationReport that is truthy when every check passed."""
    from .validation import validate as run

    return run(artifact, **kwargs)


def require_torch() -> None:
    """Exporting needs PyTorch and timm (the [torch] extra); say so in one sentence if missing."""
    missing = [m for m in ("torch", "timm") if not _installed(m)]
    if missing:
        raise MissingDependencyError(
            f"exporting needs {' and '.join(missing)}, which are not installed; run "
            "pip install 'itae-export[torch]' (on a machine without a GPU, install the CPU build of torch first: "
            "pip install torch --index-url https://download.pytorch.org/whl/cpu)")


def export(model: str, out: str | Path, *, weights: str | Path | None = None, random_weights: bool = False,
           seed: int = 0, img_size: int = 224, itae: Any = _DEFAULT, exporter: str = "dynamo",
           opset: int | None = None, validate: bool = True, validate_batch: int = 4, force: bool = False,
           fast_path: str = "none", int8_weights: str = "per-channel", fast_path_eval_images: int = 200,
           graph_options: GraphOptions | None = None, engine: Any = None, triton: Any = None,
           depth: int | None = None, settings: str | Path | None = None,
           demo_artifacts: bool = False, dynamic_size: Any = None, precision: str | None = None,
           calibration_data: str | Path | None = None, calibration_images: int | None = None,
           optimize: bool = True) -> ExportResult:
    """Export `model` (a catalogue name, e.g. "dinov2_vitl14") to `out` (.onnx, or .engine/.plan)
    with ITAE in its final attention block (`itae=None`: the baseline), validated against PyTorch.

    precision / calibration_data: for an OpenVINO IR output (out="model.xml"): fp32, bf16 (default)
    or int8, and an ImageFolder to calibrate int8 on (default: the bundled digits) and how many of its
    images (default 32); or pass
    engine=EngineOptions(precision=...) for an engine. engine: an itae_export.engine.EngineOptions for engine outputs; triton: an
    itae_export.triton.TritonOptions to add the result to a Triton model repository; settings: a
    settings file (as itae-calibrate writes) to take the ITAE settings from when `itae` is not given.
    dynamic_size: an itae_export.SizeBounds (or True for the default 112-518 px) for one graph that
    takes any H x W within the bounds; `img_size` is then the size it is tuned and checked at first.
    optimize=False keeps the graph as exported and patched (by default graph_passes.optimize makes k^T
    one Transpose and runs the final block's tail on the CLS row only: the same embedding, less work).
    """
    from .dynamic_size import SizeBounds
    from .errors import SettingsError
    from .pipeline import ExportRequest, run_export

    if settings is not None and itae is _DEFAULT:
        try:
            itae = ITAEConfig.from_file(settings)
        except ValueError as e:  # graph_passes' ConfigError
            raise SettingsError(str(e)) from e
    req = ExportRequest(
        model=model, out=Path(out), weights=Path(weights) if weights is not None else None,
        random_weights=random_weights or demo_artifacts, seed=seed, img_size=img_size,
        itae=ITAEConfig() if itae is _DEFAULT else itae, exporter=exporter, opset=opset, validate=validate,
        validate_batch=validate_batch, force=force, fast_path=fast_path, int8_weights=int8_weights,
        fast_path_eval_images=fast_path_eval_images, graph_options=graph_options or GraphOptions(),
        engine=engine, triton=triton, depth=depth, settings=Path(settings) if settings is not None else None,
        demo_artifacts=demo_artifacts, dynamic_size=SizeBounds() if dynamic_size is True else (dynamic_size or None),
        openvino=_openvino_options(out, precision, calibration_data, calibration_images), optimize=optimize)
    require_torch()
    return run_export(req)


def _openvino_options(out: str | Path, precision: str | None, calibration_data: str | Path | None,
                      calibration_images: int | None):
    """OpenVinoOptions for an .xml output; the options without one are refused by ExportRequest."""
    from .errors import UsageError
    from .openvino_target import OV_SUFFIX, OpenVinoOptions

    if Path(out).suffix != OV_SUFFIX:
        if precision is not None or calibration_data is not None or calibration_images is not None:
            raise UsageError(f"precision/calibration_data/calibration_images apply to an OpenVINO out='*.xml' only, not {Path(out).name}; "
                             "for an engine pass engine=EngineOptions(precision=...)")
        return None
    if calibration_images is not None and precision != "int8":
        raise UsageError("calibration_images calibrates int8 only; pass precision='int8' or drop it")
    return OpenVinoOptions(precision=precision, calibration_data=calibration_data,
                           **({"calibration_images": calibration_images} if calibration_images is not None else {}))


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: Any = None, *, force: bool = False):
    """Build a TensorRT engine from an itae-export ONNX (needs TensorRT and a GPU); returns the build
    summary. The parity check runs when the ONNX's reference batch is unknown only as a smoke run."""
    from .engine import EngineOptions, build_engine_artifact
    from .outputs import OutputTransaction
    from .results import RunInfo

    opts = options or EngineOptions()
    out = Path(engine_path)
    run = RunInfo(model="", img_size=0, num_prefix_tokens=0, itae=None, exporter="")
    with OutputTransaction(out, extra=[Path(str(out) + ".json")], inputs=[Path(onnx_path)], force=force) as txn:
        return build_engine_artifact(Path(onnx_path), out, opts, run, txn)


def deploy_triton(model_path: str | Path, triton: Any, *, graph_options: GraphOptions | None = None):
    """Add an ONNX model or engine to a Triton model repository (a new version); `triton` is a
    itae_export.triton.TritonOptions."""
    from .triton import deploy

    return deploy(Path(model_path), triton, graph_options=graph_options)


def embed(source: str | Path | Any, model: str | Path | None = None, out: str | Path | None = None, **kwargs: Any):
    """itae-embed as a function: embed an image collection (a folder, a text/Parquet file of paths or a
    Parquet file of images) with an itae-export artifact on Ray Data, into resumable Parquet shards in
    `out`. Pass an itae_export.collection_embed.EmbedRequest, or its fields as arguments; returns an
    EmbedResult. Needs the [scale] extra."""
    from .collection_embed import EmbedRequest
    from .collection_embed import embed as run

    req = source if isinstance(source, EmbedRequest) else EmbedRequest(source, model, out, **kwargs)  # type: ignore[arg-type]
    return run(req)


def cluster(embeddings: str | Path | Any, out: str | Path | None = None, k: Any = None, **kwargs: Any):
    """itae-cluster as a function: faiss k-means over an itae-embed folder, with contact sheets and
    index.html in `out`. Pass an itae_export.collection_cluster.ClusterRequest, or its fields as
    arguments; returns a ClusterResult. Needs the [scale] extra."""
    from .collection_cluster import ClusterRequest
    from .collection_cluster import cluster as run

    req = embeddings if isinstance(embeddings, ClusterRequest) else ClusterRequest(embeddings, out, k, **kwargs)  # type: ignore[arg-type]
    return run(req)


__all__ = ["ITAEConfig", "cluster", "embed", "GraphOptions", "build_engine", "deploy_triton", "export", "inspect", "patch",
           "require_torch", "validate"]
