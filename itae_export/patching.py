"""`patch()` and `inspect()`: the ITAE pass on an ONNX graph exported elsewhere, and its dry run.
ONNX-only (no torch); weights are never loaded; the input is never modified."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from graph_passes import metadata as md
from graph_passes.config import ITAEConfig
from graph_passes.errors import PassError
from graph_passes.graph import GraphIndex, external_locations, relocate_external

from .errors import GraphError, OutputExistsError, ParityError, UsageError
from .outputs import OutputTransaction
from .results import Inspection, PatchResult
from .safe_io import load_onnx_checked, load_onnx_with_data

log = logging.getLogger("itae_export")
CHECKS = ("auto", "yes", "no")
CHECK_AUTO_MAX_BYTES = 2 * 1024**3


def static_image_size(model) -> int | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    vals = [d.dim_value for d in dims]
    if len(vals) == 4 and vals[2] and vals[2] == vals[3]:
        return vals[2]
    return None


def input_description(model) -> dict:
    """The image input's name and dims (ints, or the names of dynamic dims) and, for a dynamic-size
    export, its recorded H/W bounds."""
    from graph_passes.metadata import metadata_field

    if not model.graph.input:
        return {}
    vi = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]
    out: dict = {"input": {"name": vi.name, "dims": dims}}
    try:
        sizes = metadata_field(model, "dynamic_size")
    except ValueError:  # malformed metadata: the dims say enough here
        sizes = None
    if sizes is not None:
        out["dynamic_size"] = sizes
    return out


def _check_num_prefix(num_prefix_tokens: int | None) -> None:
    if num_prefix_tokens is None:
        return
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 1:
        raise UsageError(f"--num-prefix-tokens must be an integer >= 1 (CLS + registers), got {num_prefix_tokens!r}")


def _same_folder(a: Path, b: Path) -> bool:
    return a.parent.resolve() == b.parent.resolve()


def _stage_weights(model, src: Path, out: Path, txn: OutputTransaction, copy_weights: bool) -> None:
    """Keep the external weights reachable from OUT: referenced in place when OUT sits beside the
    input (unless copy_weights), else copied into the staging folder as `<OUT name>.data` (the
    commit lands them with OUT)."""
    locs = external_locations(model)
    if not locs or (not copy_weights and _same_folder(src, out)):
        return
    if len(locs) > 1 and any("/" in loc or "\\" in loc for loc in locs):
        raise UsageError(f"{src} keeps its weights in {len(locs)} files in sub-folders; re-save it with one .data "
                         "file (onnx.save_model(..., all_tensors_to_one_file=True)) and patch that")
    renames = {locs[0]: out.name + ".data"} if len(locs) == 1 else {loc: loc for loc in locs}
    for old, new in renames.items():
        if (out.parent / new).exists() and not txn.force:
            raise OutputExistsError(f"{out.parent / new} already exists; pass --force or choose another --out")
        shutil.copyfile(src.parent / old, txn.staging / new)
        relocate_external(model, old, new)


def _strictest(files: list[Path]) -> Path:
    """The file with the fewest permission bits: its mode caps the outputs' (never widen a source's)."""
    return min(files, key=lambda f: bin(f.stat().st_mode & 0o777).count("1"))


def patch(src: str | Path, out: str | Path, *, itae: ITAEConfig | None = None, num_prefix_tokens: int | None = None,
          copy_weights: bool = False, check: str = "auto", seed: int = 0, force: bool = False) -> PatchResult:
    """Apply ITAE to the final attention block of `src` and write `out` (one commit)."""
    import onnx

    from graph_passes.itae import apply_itae

    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    cfg = itae if itae is not None else ITAEConfig()
    if out.suffix != ".onnx":
        raise UsageError(f"--out {out} must end in .onnx")
    if check not in CHECKS:
        raise UsageError(f"--check {check!r} is not valid; choose one of {', '.join(CHECKS)}")
    _check_num_prefix(num_prefix_tokens)
    model, data_files = load_onnx_with_data(src)
    for f in data_files:
        if not f.is_file():
            raise UsageError(f"{src} references external weights {f.name} that are not beside it; keep the .data "
                             "file next to the .onnx")
    shared = data_files if (data_files and not copy_weights and _same_folder(src, out)) else []
    with OutputTransaction(out, inputs=[src, *data_files], force=force, shared=shared) as txn:
        img = static_image_size(model)
        meta = md.export_metadata(img_size=img) if img else {}
        try:
            patched, result = apply_itae(model, cfg, num_prefix_tokens=num_prefix_tokens, metadata=meta)
        except PassError as e:
            raise GraphError(f"{src}: {e}") from e
        _stage_weights(patched, src, out, txn, copy_weights)
        staged = txn.stage_path(out)
        onnx.save_model(patched, str(staged))
        txn.add(staged, out, source=_strictest([src, *data_files]))
        files = txn.commit()
    seconds = time.perf_counter() - t0
    res = PatchResult(src, out, cfg.to_dict(), result, files, seconds=seconds)
    log.info(f"patched {src} -> {out} in {seconds:.2f} s; ITAE settings: {json.dumps(cfg.to_dict(), sort_keys=True)}")
    for line in result.summary().splitlines():
        log.info("  " + line)
    res.check = _check_patched(src, out, data_files, check, seed, img)
    return res


def _check_patched(src: Path, out: Path, data_files: list[Path], check: str, seed: int, img: int | None) -> dict | None:
    from .parity import compare
    from .pipeline import random_inputs
    from .runtime import OrtRunner

    size = src.stat().st_size + sum(f.stat().st_size for f in data_files)
    if check == "no" or (check == "auto" and size > CHECK_AUTO_MAX_BYTES):
        log.info("  check skipped" + (" (model over 2 GB; --check yes forces it)" if check == "auto" else ""))
        return None
    if img is None:
        log.info("  check skipped: the input has no static [B,3,H,W] shape")
        return None
    x = random_inputs(2, img, seed)
    a = OrtRunner(src).run(x)
    b = OrtRunner(out).run(x)
    if not np.all(np.isfinite(b)):
        raise ParityError(f"the patched graph {out} produced non-finite outputs; report a bug")
    parity = compare(a, b)
    log.info(f"  check on 2 random inputs, patched vs original: {parity} (differences are ITAE at work)")
    return {**parity.to_dict(), "text": str(parity)}


# ------------------------------------------------------------------------------------------ inspect
def inspect(path: str | Path, *, itae: ITAEConfig | None = None, num_prefix_tokens: int | None = None) -> Inspection:
    """Dry run: what the pass would match and insert, or which block already holds ITAE."""
    from graph_passes.itae import apply_itae
    from graph_passes.match import already_patched, infer_num_prefix_tokens, match_final_attention

    p = Path(path)
    _check_num_prefix(num_prefix_tokens)
    model = load_onnx_checked(p)
    cfg = itae if itae is not None else ITAEConfig()
    report: dict = {"opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
                    **input_description(model)}
    try:
        patched = already_patched(model)
        report["already_patched"] = patched or False
        if patched:
            report["img_size"] = static_image_size(model)
            return Inspection(p, report)
        m = match_final_attention(model)
        report.update(m.describe())
        report["num_prefix_tokens"] = num_prefix_tokens or infer_num_prefix_tokens(model)
        if report["num_prefix_tokens"]:
            report["registers"] = report["num_prefix_tokens"] - 1
        report["img_size"] = static_image_size(model)
        report.update(_dims_from_weights(model, m))
        _, res = apply_itae(model, cfg, num_prefix_tokens=num_prefix_tokens)
    except PassError as e:
        raise GraphError(f"{p}: {e}") from e
    report["would_insert"] = res.inserted_ops
    report["would_insert_nodes"] = len(res.inserted)
    return Inspection(p, report)


def _embed_dim(model, ix: GraphIndex, m) -> dict:
    for n in model.graph.node:
        if (n.name or n.output[0]) in m.projections.values():
            w = n.input[1] if n.op_type in ("MatMul", "Gemm") else None
            if n.op_type == "Add":
                mm = next((ix.producer[i] for i in n.input if i in ix.producer
                           and ix.producer[i].op_type in ("MatMul", "Gemm")), None)
                w = mm.input[1] if mm is not None else None
            dims = ix.const_dims(w) if w else None
            return {"embed_dim": dims[0]} if dims and len(dims) == 2 else {}
    return {}


def _dims_from_weights(model, m) -> dict:
    """Embedding size (the projection weight's input dim) and heads (the reshape on the way to q)."""
    ix = GraphIndex(model)
    out = _embed_dim(model, ix, m)
    name = m.q
    for _ in range(12):
        node = ix.producer.get(name)
        if node is None:
            break
        if node.op_type == "Reshape":
            shape = ix.const_value(node.input[1])
            if shape is not None and shape.ndim == 1 and len(shape) in (4, 5):
                out["num_heads"] = int(shape[-2])
                out["head_dim"] = int(shape[-1])
                break
        name = node.input[0]
    return out
