"""itae-export: DINOv2 -> ONNX with ITAE (inference-time attention engineering) in the final
attention block -> TensorRT / Triton / CPU fast paths, validated against PyTorch.

    import itae_export
    res = itae_export.export("dinov2_vits14", "s14.onnx", random_weights=True)
    print(res.summary(), res.parity)

Importing the package needs no torch; only export() does (the [torch] extra).
"""

from __future__ import annotations

from graph_passes.config import ITAEConfig

# The submodules itae_export.embed and itae_export.cluster are imported first, so that the functions
# embed() and cluster() bound next are what `itae_export.embed` / `itae_export.cluster` name;
# `from itae_export.embed import ...` still reads the modules (from sys.modules).
from . import cluster as _cluster_module  # noqa: F401
from . import embed as _embed_module  # noqa: F401
from .api import build_engine, cluster, deploy_triton, embed, export, inspect, patch, validate
from .dynamic_size import SizeBounds
from .errors import ItaeError
from .graph_options import GraphOptions
from .results import ExportResult, Inspection, PatchResult

__version__ = "0.2.0"

__all__ = ["ExportResult", "GraphOptions", "ITAEConfig", "Inspection", "ItaeError", "PatchResult", "SizeBounds", "__version__",
           "build_engine", "cluster", "deploy_triton", "embed", "export", "inspect", "patch", "validate"]
