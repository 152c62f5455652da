"""`itae-export` as a pipeline of named steps, top to bottom:

    ExportRequest (validated before any work)
      -> build_torch_model      torch DINOv2 embedder (catalogue + weights)
      -> reference_figures      PyTorch ITAE reference outputs on the validation inputs
      -> export_graph           torch -> ONNX, in the output transaction's staging folder
      -> apply_pass             the ITAE graph pass (graph_passes.itae)
      -> validate_graph         ONNX Runtime vs the PyTorch reference
      -> apply_deploy_options   uint8 NHWC input / L2 output, checked against NumPy
      -> make_fast_path         int8 / fused CPU model + its accuracy report
      -> commit                 one commit of every file (itae_export.outputs)
      -> build_engine_step      TensorRT engine + sidecar (its own transaction)
      -> openvino_step          OpenVINO IR + sidecar for --out *.xml (its own transaction)
      -> deploy_triton_step     a new Triton model version

Every step takes typed inputs and returns typed outputs; nothing here sees argparse.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graph_passes.config import ITAEConfig
from graph_passes.errors import PassError

from .dynamic_size import SizeBounds
from .errors import ParityError, UsageError, graph_error
from .graph_options import GraphOptions
from .openvino_target import OV_SUFFIX
from .outputs import OutputTransaction
from .results import ExportResult, RunInfo
from .settings import (
    EXPORTERS,
    MAX_VALIDATE_BATCH,
    PATCH_SIZE,
    check_choice,
    check_exporter_opset,
    check_img_size,
    check_int,
)

log = logging.getLogger("itae_export")

ENGINE_SUFFIXES = (".engine", ".plan")
FAST_PATHS = ("none", "fused", "int8")
INT8_WEIGHTS = ("per-channel", "per-tensor")
TENSORRT_MAX_TOPK = 3840  # ITopKLayer's largest k (TensorRT 10 API documentation)


@dataclass(frozen=True)
class ExportRequest:
    """Everything `export()` needs; validated on construction, before any work starts."""

    model: str
    out: Path
    weights: Path | None = None
    random_weights: bool = False
    seed: int = 0
    img_size: int = 224
    itae: ITAEConfig | None = field(default_factory=ITAEConfig)
    exporter: str = "dynamo"
    opset: int | None = None
    validate: bool = True
    validate_batch: int = 4
    force: bool = False
    fast_path: str = "none"
    int8_weights: str = "per-channel"
    fast_path_eval_images: int = 200
    graph_options: GraphOptions = field(default_factory=GraphOptions)
    engine: Any = None  # EngineOptions; defaults to EngineOptions() for an .engine/.plan output
    triton: Any = None  # TritonOptions, or None for no deployment
    depth: int | None = None  # reduced-depth random models (tests)
    settings: Path | None = None  # the settings file `itae` came from: an input, never overwritten
    demo_artifacts: bool = False  # the synthetic demo model (itae_export.demo): random weights + planted artifacts
    dynamic_size: SizeBounds | None = None  # any H x W within these bounds in one graph (img_size: the optimum)
    openvino: Any = None  # OpenVinoOptions; defaults to OpenVinoOptions() for an .xml output
    optimize: bool = True  # the exact graph optimizations after ITAE (graph_passes.optimize); --no-optimize

    def __post_init__(self) -> None:
        from .catalogue import CATALOGUE

        object.__setattr__(self, "out", Path(self.out))
        for name in ("weights", "settings"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.model not in CATALOGUE:
            raise UsageError(f"model {self.model!r} is not in the catalogue; choose one of {', '.join(CATALOGUE)}")
        spec = CATALOGUE[self.model]
        check_int(self.seed, "--seed", lo=0, hi=2**32 - 1)
        check_int(self.validate_batch, "--validate-batch", lo=1, hi=MAX_VALIDATE_BATCH)
        check_img_size(self.img_size, heads=spec.num_heads, batch=self.validate_batch)
        if self.dynamic_size is not None:
            if not isinstance(self.dynamic_size, SizeBounds):
                raise UsageError(f"dynamic_size must be a SizeBounds, got {type(self.dynamic_size).__name__}")
            self.dynamic_size.check_memory(heads=spec.num_heads, batch=self.validate_batch)
            self.dynamic_size.check_opt(self.img_size)
        check_choice(self.exporter, "--exporter", EXPORTERS)
        object.__setattr__(self, "opset", check_exporter_opset(self.exporter, self.opset))
        if self.depth is not None:
            check_int(self.depth, "--depth", lo=1, hi=spec.depth)
        if self.demo_artifacts and self.weights is not None:
            raise UsageError("--demo-artifacts builds the synthetic demo model from seeded random weights; drop "
                             "--weights (or drop --demo-artifacts to export the real weights)")
        if self.weights is not None and self.random_weights:
            raise UsageError("--weights and --random-weights exclude each other; drop one")
        if not isinstance(self.optimize, bool):
            raise UsageError(f"optimize must be True or False, got {self.optimize!r}")
        if self.itae is not None and not isinstance(self.itae, ITAEConfig):
            raise UsageError(f"itae must be an ITAEConfig or None, got {type(self.itae).__name__}")
        self._check_outputs()
        self._check_fast_path()
        self._check_engine_topk()

    def _check_engine_topk(self) -> None:
        """TensorRT's TopK takes k <= 3840 (ITopKLayer); the median threshold's k is half the patches + 1."""
        cfg = self.itae
        if not self.is_engine or cfg is None or cfg.threshold is not None or cfg.relative_stat != "median":
            return
        side = (self.dynamic_size.max_size if self.dynamic_size is not None else self.img_size) // PATCH_SIZE
        if side * side // 2 + 1 > TENSORRT_MAX_TOPK:
            raise UsageError(f"the median threshold at {side * PATCH_SIZE} px needs TopK with k = {side * side // 2 + 1}, above "
                             f"TensorRT's limit of {TENSORRT_MAX_TOPK}; use --relative-stat mean, or a size up to 1218 px")

    def _check_outputs(self) -> None:
        from .engine import EngineOptions

        if self.out.suffix not in ENGINE_SUFFIXES + (".onnx", OV_SUFFIX):
            raise UsageError(f"--out {self.out}: use a .onnx path, .engine/.plan to build a TensorRT engine, or .xml "
                             "for OpenVINO IR")
        if self.is_engine and self.engine is None:
            object.__setattr__(self, "engine", EngineOptions())
        if not self.is_engine and self.engine is not None:
            raise UsageError(f"engine options apply to an .engine/.plan --out only, not {self.out.name}; "
                             "drop them or write an engine")
        if self.engine is not None and not isinstance(self.engine, EngineOptions):
            raise UsageError(f"engine must be an EngineOptions, got {type(self.engine).__name__}")
        if not isinstance(self.graph_options, GraphOptions):
            raise UsageError(f"graph_options must be a GraphOptions, got {type(self.graph_options).__name__}")
        self._check_openvino()

    def _check_openvino(self) -> None:
        from .openvino_target import OpenVinoOptions

        if self.is_openvino and self.openvino is None:
            object.__setattr__(self, "openvino", OpenVinoOptions())
        if not self.is_openvino and self.openvino is not None:
            raise UsageError(f"OpenVINO options (--precision fp32|bf16|int8, --calibration-data) apply to an .xml "
                             f"--out only, not {self.out.name}; drop them or write {self.out.with_suffix('.xml').name}")
        if self.openvino is not None and not isinstance(self.openvino, OpenVinoOptions):
            raise UsageError(f"openvino must be an OpenVinoOptions, got {type(self.openvino).__name__}")
        if self.is_openvino and (self.fast_path != "none" or self.graph_options.any or not self.validate):
            raise UsageError(f"--out {self.out.name} (OpenVINO IR) is a CPU path of its own: drop --fast-path, "
                             "--input-format/--l2-normalize and --skip-validation")

    def _check_fast_path(self) -> None:
        check_choice(self.fast_path, "--fast-path", FAST_PATHS)
        check_choice(self.int8_weights, "--int8-weights", INT8_WEIGHTS)
        check_int(self.fast_path_eval_images, "--fast-path-eval-images", lo=10, hi=1797)
        if self.fast_path == "none":
            return
        flag = f"--fast-path {self.fast_path}"
        if self.is_engine:
            raise UsageError(f"{flag} is an ONNX Runtime CPU path; for --out *.engine use TensorRT's "
                             "precision flags instead, or write a .onnx")
        if self.graph_options.any:
            raise UsageError(f"{flag} cannot be combined with --input-format uint8-nhwc / --l2-normalize yet")
        if self.itae is None or not self.validate:
            raise UsageError(f"{flag} needs the ITAE model and its validation; drop --no-itae/--skip-validation")
        if self.fast_path == "fused" and self.dynamic_size is not None:
            raise UsageError("--fast-path fused needs a fixed token count to prove the attention layout; with "
                             "--dynamic-size use --fast-path int8 or no fast path")

    @property
    def is_engine(self) -> bool:
        return self.out.suffix in ENGINE_SUFFIXES

    @property
    def is_openvino(self) -> bool:
        return self.out.suffix == OV_SUFFIX

    @property
    def onnx_out(self) -> Path:
        return self.out.with_suffix(".onnx") if self.is_engine or self.is_openvino else self.out

    @property
    def fp32_out(self) -> Path | None:
        if self.fast_path == "none":
            return None
        return self.onnx_out.with_name(self.onnx_out.stem + ".fp32.onnx")

    @property
    def inputs(self) -> list[Path]:
        """Files the export reads: no output may be one of them."""
        return [p for p in (self.weights, self.settings) if p is not None]

    @property
    def weights_label(self) -> str:
        if self.demo_artifacts:
            return f"demo-artifacts(seed={self.seed})"
        return f"random(seed={self.seed})" if self.random_weights else (self.weights.name if self.weights else "cache")


    @property
    def validation_sizes(self) -> list[tuple[int, int]]:
        """(H, W) of each parity check: img_size, plus the bounds' sizes for a dynamic-size export."""
        if self.dynamic_size is None:
            return [(self.img_size, self.img_size)]
        sizes = self.dynamic_size.validation_sizes(self.img_size)
        return [(self.img_size, self.img_size)] + [s for s in sizes if s != (self.img_size, self.img_size)]


@dataclass
class Reference:
    """PyTorch figures computed before the torch model is freed. `inputs`/`outputs` are at img_size;
    `by_size` holds every validated (H, W) of a dynamic-size export (img_size included)."""

    inputs: np.ndarray
    outputs: np.ndarray
    flag_stats: dict | None = None
    by_size: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    deploy: tuple[np.ndarray, np.ndarray] | None = None  # inputs/outputs as the graph options see them
    digits: tuple | None = None  # ((eval images, labels), their fp32 reference outputs) for the fast path


# ------------------------------------------------------------------------------------------ steps
def build_torch_model(req: ExportRequest):
    from .models import build_model

    if req.demo_artifacts:
        from .demo import LABEL, demo_model

        log.info(f"[1/4] building {req.model} at {req.img_size}px: {LABEL}")
        return demo_model(req.model, img_size=req.img_size, seed=req.seed, depth=req.depth)
    src = "with seeded random weights" if req.random_weights else f"from {req.weights or 'the weight caches'}"
    log.info(f"[1/4] building {req.model} at {req.img_size}px {src}")
    return build_model(req.model, weights=req.weights, random_weights=req.random_weights, seed=req.seed,
                       img_size=req.img_size, depth=req.depth)


def random_inputs(n: int, img_size: int, seed: int, width: int | None = None) -> np.ndarray:
    shape = (n, 3, img_size, width if width is not None else img_size)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference_figures(model, req: ExportRequest) -> Reference:
    import torch

    from .reference import ITAEReference, last_block_stats
    from .runtime import run_batched

    cfg = req.itae
    if req.dynamic_size is not None:
        model.pos_mode = "official"  # the reference interpolates for each input's size, as the official code
    reference = (ITAEReference(model, cfg) if cfg is not None else model).eval()

    def run(a: np.ndarray) -> np.ndarray:
        return reference(torch.from_numpy(a)).numpy()

    by_size = {}
    for h, w in req.validation_sizes:
        xs = random_inputs(req.validate_batch, h, req.seed, width=w)
        by_size[(h, w)] = (xs, run_batched(run, xs, batch=1))
    x, y = by_size[(req.img_size, req.img_size)]
    ref = Reference(x, y, by_size=by_size if req.dynamic_size is not None else {})
    if cfg is not None:
        ref.flag_stats = last_block_stats(model, torch.from_numpy(x), cfg)
    if req.graph_options.any:
        from .graph_options import reference_batch

        ref.deploy = reference_batch(req.graph_options, run, batch=req.validate_batch, height=req.img_size,
                                     width=req.img_size, seed=req.seed)
    if req.fast_path != "none" or req.is_openvino:
        from .fastpath import digits_eval_inputs

        digits = digits_eval_inputs(req.img_size, req.fast_path_eval_images, seed=0)  # (images, labels)
        ref.digits = (digits, run_batched(run, digits[0]))
    return ref


def export_graph(model, req: ExportRequest, staged: Path) -> Path:
    from .onnx_export import export_onnx

    t0 = time.perf_counter()
    log.info(f"[2/4] exporting with the {req.exporter} exporter ...")
    export_onnx(model, staged, img_size=req.img_size, exporter=req.exporter, opset=req.opset,
                dynamic_size=req.dynamic_size)
    log.info(f"      exported in {time.perf_counter() - t0:.1f} s")
    return staged


def release_memory() -> None:
    """Free the torch model's memory before ONNX Runtime loads its own copy of the weights: collect
    cycles, then hand freed heap pages back to the OS (glibc keeps large freed blocks otherwise,
    which made the ViT-L peak swing between 2.3 and 2.7 GB from run to run)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def run_metadata(req: ExportRequest, num_prefix: int) -> dict[str, str]:
    from graph_passes import metadata as md

    meta = md.export_metadata(model=req.model, img_size=req.img_size, num_prefix_tokens=num_prefix,
                              exporter=req.exporter, weights=req.weights_label,
                              dynamic_size=req.dynamic_size.to_metadata() if req.dynamic_size is not None else None)
    if req.weights is not None:  # lets itae-validate refuse other weights of the same file name
        from .embed import weights_digest

        meta[md.WEIGHTS_SHA256] = weights_digest(req.weights)["sha256"]
    return meta


def apply_pass(onnx_path: Path, req: ExportRequest, num_prefix: int):
    """The ITAE pass on the staged ONNX (weights stay on disk); None for --no-itae."""
    import onnx

    from graph_passes import metadata as md
    from graph_passes.itae import apply_itae

    proto = onnx.load(str(onnx_path), load_external_data=False)
    meta = run_metadata(req, num_prefix)
    result = None
    if req.itae is None:
        md.set_metadata_props(proto, meta)
        log.info("[3/4] --no-itae: graph left unpatched")
    else:
        t0 = time.perf_counter()
        try:
            proto, result = apply_itae(proto, req.itae, num_prefix_tokens=num_prefix, metadata=meta)
        except PassError as e:
            raise graph_error(e) from e
        log.info(f"[3/4] ITAE pass ({time.perf_counter() - t0:.2f} s): {json.dumps(req.itae.to_dict(), sort_keys=True)}")
        for line in result.summary().splitlines():
            log.info("      " + line)
    onnx.save_model(proto, str(onnx_path))
    onnx.checker.check_model(str(onnx_path))
    return result


def optimize_step(onnx_path: Path, req: ExportRequest) -> dict[str, dict]:
    """The exact graph optimizations (graph_passes.optimize: k^T as one Transpose, the final block's
    tail on the CLS row) on the staged ONNX, before it is validated, so the parity check covers them
    and every artifact built from the ONNX has them. {pass: record}; {} for --no-optimize."""
    import onnx

    from graph_passes.optimize import optimize

    if not req.optimize:
        log.info("      --no-optimize: the graph stays as exported and patched")
        return {}
    proto = onnx.load(str(onnx_path), load_external_data=False)
    proto, res = optimize(proto)
    if res.changed:
        onnx.save_model(proto, str(onnx_path))
        onnx.checker.check_model(str(onnx_path))
    for line in res.summary().splitlines():
        log.info(f"      {line}")
    return res.records


def validate_graph(onnx_path: Path, ref: Reference, req: ExportRequest):
    """ONNX Runtime vs the PyTorch reference, at every validated size; raises ParityError beyond
    tolerance. Returns (parity at img_size, flag summary, {"HxW": parity} for a dynamic-size export)."""
    from .parity import compare
    from .runtime import OrtRunner, run_batched

    if not req.validate:
        log.info("[4/4] validation skipped (--skip-validation)")
        return None, None, {}
    t0 = time.perf_counter()
    runner = OrtRunner(onnx_path)
    # one image at a time: ONNX Runtime's activation buffers for a batch of 4 would add ~0.1 GB to the
    # ViT-L peak, which is this step's (the weights are already ONNX Runtime's)
    sizes = {f"{h}x{w}": compare(y, run_batched(runner, x, batch=1)) for (h, w), (x, y) in ref.by_size.items()}
    parity = sizes.get(f"{req.img_size}x{req.img_size}") or compare(ref.outputs, run_batched(runner, ref.inputs, batch=1))
    flagged, text = _flag_summary(ref.flag_stats)
    what = "ITAE reference" if req.itae is not None else "model"
    log.info(f"[4/4] ONNX Runtime vs PyTorch {what} on {req.validate_batch} random images: {parity}{text} "
             f"({time.perf_counter() - t0:.1f} s)")
    for size, p in sizes.items():
        log.info(f"      at {size}: {p}")
    bad = {size: p for size, p in sizes.items() if not p.ok()}
    if not parity.ok() or bad:
        other = "torchscript" if req.exporter == "dynamo" else "dynamo"
        where = f" at {', '.join(bad)}" if bad else ""
        raise ParityError(f"parity check failed{where} ({next(iter(bad.values()), parity)}); nothing was written; "
                          f"re-run with --exporter {other} or report a bug")
    return parity, flagged, {size: p.to_dict() for size, p in sizes.items()}


def _flag_summary(stats: dict | None) -> tuple[dict | None, str]:
    """How many patch tokens ITAE flagged on the validation images, and the CLS attention (mean over
    heads and images) they received before and after it."""
    if stats is None:
        return None, ""
    flags = stats["flagged"].astype(bool)
    if flags.ndim == 3:  # per-head scope: a token counts as flagged when any head flags it
        flags = flags.any(axis=1)
    total = flags[..., stats["num_prefix_tokens"]:].size
    n = int(flags.sum())
    before = float((stats["cls_attn_before"].mean(axis=1) * flags).sum(-1).mean())
    after = float((stats["cls_attn_after"].mean(axis=1) * flags).sum(-1).mean())
    text = f"; {n} of {total} patch token{'s' if total != 1 else ''} flagged"
    if n:
        text += f", CLS attention on them {before:.1%} -> {after:.1%}"
    else:
        text += " (random weights have no artifact tokens: try --demo-artifacts, or real --weights)"
    return {"tokens": n, "of": total, "cls_attention_before": before, "cls_attention_after": after}, text


def apply_deploy_options(onnx_path: Path, ref: Reference, req: ExportRequest) -> Reference:
    """uint8 NHWC input / L2 output after the float parity check; checked against NumPy."""
    from .graph_options import apply_graph_options, verify_graph_options

    if not req.graph_options.any:
        return ref
    tmp = onnx_path.with_name("graphopt-" + onnx_path.name)
    new = Path(apply_graph_options(onnx_path, tmp, req.graph_options))
    if new == onnx_path:
        return ref
    fig = verify_graph_options(onnx_path, new, size=(req.img_size, req.img_size))
    log.info(f"      graph options: ONNX Runtime vs NumPy preprocessing: cosine min {fig['cos_min']:.7f}, "
             f"max abs diff {fig['max_abs']:.2e}")
    if fig["cos_min"] < 0.99999:
        raise ParityError(f"graph options changed the output ({fig}); nothing was written; report a bug")
    from .fastpath import move_model

    move_model(new, onnx_path)
    assert ref.deploy is not None
    return Reference(ref.deploy[0], ref.deploy[1], ref.flag_stats)  # by_size: float inputs, which the graph no longer takes


def make_fast_path(onnx_path: Path, fp32_staged: Path, ref: Reference, req: ExportRequest) -> dict | None:
    from . import fastpath as fp

    if req.fast_path == "none":
        return None
    t0 = time.perf_counter()
    fp.move_model(onnx_path, fp32_staged)
    if req.fast_path == "int8":
        fp.quantize_int8(fp32_staged, onnx_path, per_channel=req.int8_weights != "per-tensor")
    else:
        fused = fp.fuse_model(fp32_staged, onnx_path)
        log.info(f"      fused the attention of {len(fused['fused'])} blocks into MultiHeadAttention "
                 f"(the final block's Softmax {fused['kept_final']} left as it is)")
    assert ref.digits is not None
    report = fp.accuracy_report((ref.outputs, ref.digits[1]), onnx_path, ref.inputs, ref.digits[0], k=fp.EVAL_K,
                                seed=0, fast_path=fp.FAST_PATH_VALUES[req.fast_path])
    if req.fast_path == "fused" and report["validation"]["cos_min"] < fp.FUSED_MIN_COSINE:
        raise ParityError(f"the fused model is not exact (cosine min {report['validation']['cos_min']:.7f} < "
                          f"{fp.FUSED_MIN_COSINE}); nothing was written; drop --fast-path or report a bug")
    fp.add_accuracy_metadata(onnx_path, report)
    log.info(f"      fast path {req.fast_path} ({time.perf_counter() - t0:.1f} s): {fp.format_report(report)}")
    return report


def build_engine_step(req: ExportRequest, onnx_path: Path, run: RunInfo, txn: OutputTransaction) -> dict:
    from .engine import build_engine_artifact

    summary = build_engine_artifact(onnx_path, req.out, req.engine, run, txn)
    for k in ("engine", "sidecar", "precision", "parity"):
        if k in summary:
            log.info(f"      {k}: {summary[k]}")
    return summary


def openvino_transaction(req: ExportRequest) -> OutputTransaction:
    from .openvino_target import ir_outputs

    return OutputTransaction(req.out, extra=ir_outputs(req.out)[1:], inputs=req.inputs, force=req.force)


def openvino_step(req: ExportRequest, staged_onnx: Path, ref: Reference, run: RunInfo,
                  txn: OutputTransaction) -> dict:
    from .openvino_target import build_ir_artifact

    summary = build_ir_artifact(staged_onnx, req.out, req.openvino, ref, run, txn, onnx_final=req.onnx_out,
                                optimize=req.optimize)
    log.info(f"      OpenVINO {summary['precision']} IR: {summary['report_text']}")
    return summary


def deploy_triton_step(req: ExportRequest, model_path: Path, run: RunInfo):
    from .triton import deploy

    res = deploy(model_path, req.triton, graph_options=req.graph_options, meta=run.to_dict())
    log.info(res.summary())
    return res


# ------------------------------------------------------------------------------------------ driver
def run_export(req: ExportRequest) -> ExportResult:
    """Run the whole pipeline; every output lands in one commit, or nothing does."""
    t_start = time.perf_counter()
    extra = [p for p in (req.fp32_out,) if p is not None]
    if req.is_engine:
        from .engine import SCRIPT_NAME

        extra.append(req.onnx_out.parent / SCRIPT_NAME)
    with contextlib.ExitStack() as stack:
        engine_txn = None
        if req.is_engine:
            engine_txn = stack.enter_context(
                OutputTransaction(req.out, extra=[Path(str(req.out) + ".json")], inputs=req.inputs, force=req.force))
        ov_txn = stack.enter_context(openvino_transaction(req)) if req.is_openvino else None
        txn = stack.enter_context(OutputTransaction(req.onnx_out, extra=extra, inputs=req.inputs, force=req.force))
        run, files = _onnx_phase(req, txn, ov_txn)
        engine = build_engine_step(req, req.onnx_out, run, engine_txn) if engine_txn is not None else None
    final = req.out if req.is_engine or req.is_openvino else req.onnx_out
    triton = deploy_triton_step(req, final, run) if req.triton is not None else None
    result = ExportResult(request=req, run=run, files=files, engine=engine, triton=triton,
                          seconds=time.perf_counter() - t_start)
    log.info(result.summary())
    return result


def _onnx_phase(req: ExportRequest, txn: OutputTransaction,
                ov_txn: OutputTransaction | None = None) -> tuple[RunInfo, list[Path]]:
    import torch

    torch.set_grad_enabled(False)
    model = build_torch_model(req)
    num_prefix = int(model.num_prefix_tokens)
    ref = reference_figures(model, req)
    staged = export_graph(model, req, txn.stage_path(req.onnx_out))
    del model
    release_memory()
    pass_result = apply_pass(staged, req, num_prefix)
    rewrites = optimize_step(staged, req)
    parity, flagged, parity_sizes = validate_graph(staged, ref, req)
    ref = apply_deploy_options(staged, ref, req)
    fp32_staged = txn.stage_path(req.fp32_out) if req.fp32_out is not None else None
    fast = make_fast_path(staged, fp32_staged, ref, req) if fp32_staged is not None else None
    if req.is_engine:
        _stage_build_script(req, staged, txn)
    run = RunInfo(model=req.model, img_size=req.img_size, num_prefix_tokens=num_prefix,
                  itae=req.itae.to_dict() if req.itae is not None else None, exporter=req.exporter,
                  parity=parity.to_dict() if parity is not None else {}, flagged=flagged,
                  dynamic_size=req.dynamic_size.to_metadata() if req.dynamic_size is not None else None,
                  parity_sizes=parity_sizes,
                  pass_result=pass_result, optimizations=rewrites, fast_path=fast, reference_inputs=ref.inputs,
                  reference_outputs=ref.outputs,
                  reference_by_size={f"{h}x{w}": xy for (h, w), xy in ref.by_size.items()})
    if ov_txn is not None:  # built and gated before anything is committed
        run.openvino = openvino_step(req, staged, ref, run, ov_txn)
    txn.add(staged, req.onnx_out)
    if fp32_staged is not None:
        txn.add(fp32_staged, req.fp32_out)
    files = txn.commit()
    if ov_txn is not None:
        files += ov_txn.commit()
    return run, files


def _stage_build_script(req: ExportRequest, staged_onnx: Path, txn: OutputTransaction) -> None:
    from .engine import SCRIPT_NAME, stage_build_script

    script = txn.stage_path(req.onnx_out.parent / SCRIPT_NAME)
    stage_build_script(staged_onnx, req.onnx_out, req.out, req.engine, script)
    txn.add(script, req.onnx_out.parent / SCRIPT_NAME)
