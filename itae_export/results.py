"""Result objects of the public API: what was matched and inserted, the parity figures, the files
written. Each reads well as a string (`summary()`) and converts to JSON-able dicts (`to_dict()`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .jsonable import jsonable


@dataclass
class RunInfo:
    """What an export produced, handed to the engine builder and the Triton deployer (one typed
    record instead of a dict whose keys receivers guess)."""

    model: str
    img_size: int
    num_prefix_tokens: int
    itae: dict | None
    exporter: str
    parity: dict = field(default_factory=dict)
    flagged: dict | None = None  # tokens flagged on the validation images and the CLS attention they got
    pass_result: Any = None  # graph_passes.itae.PassResult
    optimizations: dict = field(default_factory=dict)  # graph_passes.optimize: pass -> record ({}: none)
    fast_path: dict | None = None
    openvino: dict | None = None  # the OpenVINO IR's summary (precision, sidecar, accuracy) for an .xml output
    reference_inputs: np.ndarray | None = field(default=None, repr=False)
    reference_outputs: np.ndarray | None = field(default=None, repr=False)
    dynamic_size: dict | None = None  # {"min", "max", "multiple"} of a dynamic-size graph
    parity_sizes: dict = field(default_factory=dict)  # "HxW" -> parity figures (dynamic-size exports)
    # "HxW" -> (inputs, PyTorch outputs) of each validated size of a dynamic-size export (float inputs)
    reference_by_size: dict = field(default_factory=dict, repr=False)

    @property
    def output_rows(self) -> dict | None:
        """What the output-row pruning recorded; None when the graph was not pruned."""
        return self.optimizations.get("output_rows")

    def to_dict(self) -> dict[str, Any]:
        """The provenance record (no arrays) written into sidecars and Triton provenance files."""
        return {
            "model": self.model,
            "img_size": self.img_size,
            "num_prefix_tokens": self.num_prefix_tokens,
            "itae": self.itae,
            "exporter": self.exporter,
            "parity_onnxruntime": self.parity,
            "flagged": self.flagged,
            "pass": self.pass_result.to_dict() if self.pass_result is not None else None,
            "optimizations": self.optimizations,
            "fast_path": self.fast_path,
            "dynamic_size": self.dynamic_size,
            "parity_onnxruntime_by_size": self.parity_sizes,
            **({"openvino": self.openvino} if self.openvino is not None else {}),
        }


@dataclass
class ExportResult:
    request: Any  # pipeline.ExportRequest
    run: RunInfo
    files: list[Path]
    engine: dict | None = None
    triton: Any = None  # triton.TritonRepoResult
    seconds: float = 0.0

    @property
    def onnx(self) -> Path:
        return self.request.onnx_out

    @property
    def parity(self) -> dict:
        return self.run.parity

    @property
    def pass_result(self):
        return self.run.pass_result

    def to_dict(self) -> dict[str, Any]:
        return jsonable({**self.run.to_dict(), "files": self.files, "engine": self.engine,
                         "triton": self.triton.to_dict() if self.triton is not None else None,
                         "seconds": self.seconds})

    def summary(self) -> str:
        req = self.request
        data = [f for f in self.files if f.suffix == ".data"]
        text = f"wrote {req.onnx_out}"
        if self.run.openvino is not None:
            text = f"wrote {req.out} ({self.run.openvino['precision']} OpenVINO IR + .bin + sidecar) from {req.onnx_out}"
        if req.fast_path != "none":
            text += f" ({req.fast_path} fast path) and the fp32 model {req.fp32_out}"
        if data:
            text += f" (+ {len(data)} external data file{'s' if len(data) != 1 else ''})"
        return text + f" in {self.seconds:.1f} s"


@dataclass
class PatchResult:
    source: Path
    out: Path
    itae: dict
    pass_result: Any  # graph_passes.itae.PassResult
    files: list[Path]
    check: dict | None = None  # patched vs original on random inputs
    seconds: float = 0.0

    @property
    def matched(self):
        return self.pass_result.matched

    @property
    def inserted(self) -> list[str]:
        return list(self.pass_result.inserted)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"source": self.source, "out": self.out, "itae": self.itae,
                         "pass": self.pass_result.to_dict(), "files": self.files, "check": self.check,
                         "seconds": self.seconds})

    def summary(self) -> str:
        lines = [f"patched {self.source} -> {self.out} in {self.seconds:.2f} s"]
        lines += ["  " + ln for ln in self.pass_result.summary().splitlines()]
        if self.check is not None:
            lines.append(f"  check: {self.check.get('text', self.check)}")
        return "\n".join(lines)


@dataclass
class Inspection:
    """A dry run of the pass on a graph: what it would match and insert, or why it refuses."""

    path: Path
    report: dict[str, Any]

    @property
    def already_patched(self) -> bool:
        return bool(self.report.get("already_patched"))

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self.report)

    def __getitem__(self, key: str) -> Any:
        return self.report[key]
