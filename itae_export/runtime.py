"""Runners with one interface, .run(x: np.ndarray) -> np.ndarray, so the same parity code compares
PyTorch, ONNX Runtime and TensorRT."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import UsageError

BACKENDS = ("torch", "onnxruntime", "ort-cuda", "ort-trt", "tensorrt", "openvino")


class Runner(Protocol):
    def run(self, x: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    def __init__(self, module):
        self.module = module.eval()

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


class OrtRunner:
    def __init__(self, onnx_path: str | Path, providers: list | None = None, threads: int | None = None):
        import onnxruntime as ort

        p = Path(onnx_path)
        if not p.is_file():
            raise UsageError(f"ONNX file {p} does not exist")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(p), opts, providers=providers or ["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.output_name = self.session.get_outputs()[0].name
        self._np_type = np.float16 if self.input.type == "tensor(float16)" else None

    def run(self, x: np.ndarray) -> np.ndarray:
        if self._np_type is not None and x.dtype == np.float32:
            x = x.astype(self._np_type)
        try:
            return self.session.run([self.output_name], {self.input.name: x})[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            refusal = size_refusal(str(e), x.shape)
            if refusal is None:
                raise
            raise UsageError(refusal) from None


def size_refusal(message: str, shape: tuple[int, ...]) -> str | None:
    """The sentence for a dynamic-size graph's failed size check (graph_passes.size_check), or None
    when the runtime's error is something else."""
    from graph_passes.size_check import parse_gate_name

    bounds = parse_gate_name(message)
    return size_sentence(*bounds, shape) if bounds is not None else None


def size_sentence(lo: int, hi: int, multiple: int, shape: tuple[int, ...]) -> str:
    """What a dynamic-size model takes, and what it got (x: [B, C, H, W])."""
    got = "x".join(str(d) for d in shape[2:]) if len(shape) == 4 else str(list(shape))
    return (f"the model takes heights and widths that are multiples of {multiple} from {lo} to {hi} pixels, got "
            f"{got}; resize or crop the images to such a size")


def make_runner(backend: str, target) -> Runner:
    """target: an nn.Module for "torch", an ONNX path for the ONNX Runtime backends, an engine path
    for "tensorrt", an OpenVINO IR .xml for "openvino" (compiled with its sidecar's compile_config)."""
    if backend == "torch":
        return TorchRunner(target)
    if backend == "onnxruntime":
        return OrtRunner(target)
    if backend in ("ort-cuda", "ort-trt"):
        from .trt_runner import check_session_providers, ort_gpu_providers

        kind = "cuda" if backend == "ort-cuda" else "tensorrt"
        runner = OrtRunner(target, providers=ort_gpu_providers(kind, None))
        check_session_providers(runner.session, kind)  # ORT falls back to the CPU silently
        return runner
    if backend == "tensorrt":
        from .trt_runner import TrtRunner

        return TrtRunner(target)
    if backend == "openvino":
        from .ov_runner import OpenVinoRunner

        return OpenVinoRunner(target)
    raise UsageError(f"--backend {backend!r} is not valid; choose one of {', '.join(BACKENDS)}")


def run_batched(runner: Runner | Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Run a runner (or any array -> array function) over x in slices of `batch`."""
    fn = runner.run if hasattr(runner, "run") else runner
    return np.concatenate([np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)], axis=0)
