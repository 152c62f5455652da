"""Command-line tools: itae-export (torch -> ONNX [-> engine]), itae-patch (ONNX -> ONNX),
itae-inspect (dry run of the match)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from graph_passes.config import (
    ATTENUATIONS,
    DIRECTIONS,
    NORM_SCOPES,
    NORM_SOURCES,
    RELATIVE_STATS,
    ROWS,
    ConfigError,
    ITAEConfig,
)
from graph_passes.graph import all_tensors, external_locations
from graph_passes.match import PassError

from .errors import ItaeError, OutputExistsError, ParityError, UsageError
from .fileio import check_output_path
from .safe_io import load_onnx_checked

ENGINE_SUFFIXES = (".engine", ".plan")
ITAE_FIELDS = ("norm_source", "norm_scope", "direction", "threshold", "relative_threshold", "relative_stat",
               "attenuation", "alpha", "rows")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- shared ITAE options
def add_itae_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ITAE settings (defaults: ../shared/ITAE.md)")
    g.add_argument("--settings", metavar="FILE", help="JSON settings file (e.g. from itae-calibrate); flags override it")
    g.add_argument("--norm-source", choices=NORM_SOURCES, help="tensor whose token lengths flag artifacts (default v)")
    g.add_argument("--norm-scope", choices=NORM_SCOPES, help="length over all heads (token) or per head (default token)")
    g.add_argument("--direction", choices=DIRECTIONS, help="artifacts are longer (high) or shorter (low) (default high)")
    g.add_argument("--threshold", type=float, metavar="LEN", help="absolute length threshold (calibrated)")
    g.add_argument("--relative-threshold", type=float, metavar="GAMMA",
                   help="flag lengths beyond GAMMA x the image's mean patch length (default 2.0 high / 0.5 low)")
    g.add_argument("--relative-stat", choices=RELATIVE_STATS, help="statistic for --relative-threshold (default mean)")
    g.add_argument("--attenuation", choices=ATTENUATIONS, help="how flagged tokens are attenuated (default min-logit)")
    g.add_argument("--alpha", type=float, help="weight factor for --attenuation scale, in [0, 1] (default 0)")
    g.add_argument("--rows", choices=ROWS, help="attenuate in the CLS query row or in every row (default cls)")


def itae_config_from_args(args: argparse.Namespace) -> ITAEConfig:
    base: dict = {}
    if getattr(args, "settings", None):
        base = ITAEConfig.from_file(args.settings).to_dict()
        if base.get("threshold") is not None:
            base["relative_threshold"] = None
    given = {f: getattr(args, f) for f in ITAE_FIELDS if getattr(args, f, None) is not None}
    if "threshold" in given:
        base["relative_threshold"] = None
    if "relative_threshold" in given:
        base["threshold"] = None
    base.update(given)
    return ITAEConfig(**base)


# ---------------------------------------------------------------- helpers
def _run_cli(fn: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        return fn(args)
    except (ItaeError, PassError, ConfigError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; no output was written", file=sys.stderr)
        return 130


def _set_location(model, old: str, new: str) -> None:
    for t in all_tensors(model.graph):
        for kv in t.external_data:
            if kv.key == "location" and kv.value == old:
                kv.value = new


def stage_model(model, out_name: str, work: Path, *, src_dir: Path, final_dir: Path, copy_weights: bool,
                force: bool = False) -> list[Path]:
    """Write `model` (loaded without weights) as work/out_name, keeping its external weights
    reachable from final_dir: referenced in place when final_dir is the source folder, otherwise
    (or with copy_weights) copied as `<out name>.data`. Returns the staged files to move."""
    import onnx

    locs = external_locations(model)
    staged = [work / out_name]
    same_dir = final_dir.resolve() == src_dir.resolve()
    if locs and (copy_weights or not same_dir):
        if len(locs) == 1:
            new = out_name + ".data"
            if (final_dir / new).exists() and not force:
                raise OutputExistsError(f"{final_dir / new} already exists; pass --force or choose another --out")
            _set_location(model, locs[0], new)
            shutil.copyfile(src_dir / locs[0], work / new)
            staged.append(work / new)
        elif same_dir:
            raise UsageError(f"the input keeps its weights in {len(locs)} files; --copy-weights needs another output folder")
        else:
            for loc in locs:
                if (final_dir / loc).exists() and not force:
                    raise OutputExistsError(f"weight file {final_dir / loc} already exists; choose another folder")
                (work / loc).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src_dir / loc, work / loc)
                staged.append(work / loc)
    onnx.save_model(model, str(work / out_name))
    return staged


def random_inputs(n: int, img_size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, img_size, img_size)).astype(np.float32)


# ---------------------------------------------------------------- itae-export
def export_parser() -> argparse.ArgumentParser:
    from .models import CATALOGUE

    p = argparse.ArgumentParser(
        prog="itae-export",
        description="Export a DINOv2 model to ONNX with ITAE in its final attention block, validate it against "
        "PyTorch, and optionally build a TensorRT engine (--out x.engine) or a Triton repository.",
    )
    p.add_argument("model", choices=list(CATALOGUE), metavar="MODEL", help=f"one of: {', '.join(CATALOGUE)}")
    p.add_argument("--out", required=True, help="output .onnx, or .engine/.plan to build a TensorRT engine")
    p.add_argument("--weights", help="local weights: official .pth or timm .safetensors (default: search caches)")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-weights and validation inputs")
    p.add_argument("--img-size", type=int, default=224, help="input size, multiple of 14 (default 224)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="torch ONNX exporter")
    p.add_argument("--opset", type=int, help="ONNX opset (default 18 dynamo / 17 torchscript)")
    p.add_argument("--no-itae", action="store_true", help="export the unmodified baseline")
    p.add_argument("--validate-batch", type=int, default=4, help="random images used for parity (default 4)")
    p.add_argument("--skip-validation", action="store_true", help="do not compare against PyTorch")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)  # reduced-depth random models for tests
    add_itae_args(p)
    for mod in _optional_modules():
        mod.add_cli_args(p)
    return p


def _optional_modules():
    """Feature modules that add their own flags (engine building, Triton); absent ones are skipped."""
    mods = []
    for name in ("engine", "triton", "fastpath"):
        try:
            mods.append(__import__(f"itae_export.{name}", fromlist=["add_cli_args"]))
        except ImportError:
            continue
    return [m for m in mods if hasattr(m, "add_cli_args")]


def _export(args: argparse.Namespace) -> int:
    import onnx
    import torch

    from graph_passes.itae import apply_itae

    from .export import export_onnx, onnx_files
    from .models import build_model
    from .reference import ITAEReference, last_block_stats
    from .runtime import OrtRunner
    from .validate import compare

    t_start = time.perf_counter()
    out = Path(args.out)
    engine_path = out if out.suffix in ENGINE_SUFFIXES else None
    if out.suffix not in ENGINE_SUFFIXES + (".onnx",):
        raise UsageError(f"--out {out}: use a .onnx path, or .engine/.plan to build a TensorRT engine")
    onnx_out = out.with_suffix(".onnx") if engine_path else out
    cfg = None if args.no_itae else itae_config_from_args(args)
    if args.no_itae and any(getattr(args, f, None) is not None for f in ITAE_FIELDS + ("settings",)):
        raise UsageError("--no-itae exports the baseline; drop the ITAE options or --no-itae")
    if args.validate_batch < 1:
        raise UsageError(f"--validate-batch must be >= 1, got {args.validate_batch}")
    fast_kind = getattr(args, "fast_path", "none")
    fast = fast_kind != "none"
    if getattr(args, "int8_weights", None) and fast_kind != "int8":
        raise UsageError(f"--int8-weights applies to --fast-path int8 only (got --fast-path {fast_kind})")
    if fast:
        from .fastpath import fp32_path

        flag = f"--fast-path {fast_kind}"
        if engine_path:
            raise UsageError(f"{flag} is an ONNX Runtime CPU path; for --out *.engine use TensorRT's "
                             "precision flags instead, or write a .onnx")
        if _graph_options_requested(args):
            raise UsageError(f"{flag} cannot be combined with --input-format uint8-nhwc / --l2-normalize yet")
        if args.no_itae or args.skip_validation:
            raise UsageError(f"{flag} needs the ITAE model and its validation; drop --no-itae/--skip-validation")
        if args.fast_path_eval_images < 10:
            raise UsageError(f"--fast-path-eval-images must be >= 10 (k-means with k=10), got {args.fast_path_eval_images}")
    check_output_path(onnx_out, force=args.force)
    if fast:
        check_output_path(fp32_path(onnx_out), force=args.force)
    if engine_path:
        check_output_path(engine_path, force=args.force)

    log(f"[1/4] building {args.model} at {args.img_size}px "
        + ("with seeded random weights" if args.random_weights else f"from {args.weights or 'the weight caches'}"))
    torch.set_grad_enabled(False)
    model = build_model(args.model, weights=args.weights, random_weights=args.random_weights, seed=args.seed,
                        img_size=args.img_size, depth=args.depth)
    meta = {
        "itae_export.model": args.model,
        "itae_export.img_size": str(args.img_size),
        "itae_export.num_prefix_tokens": str(model.num_prefix_tokens),
        "itae_export.exporter": args.exporter,
        "itae_export.weights": f"random(seed={args.seed})" if args.random_weights else Path(
            args.weights or "cache").name,
    }
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".itae-export-", dir=onnx_out.parent))
    try:
        tmp_onnx = work / onnx_out.name
        # PyTorch figures first, so the model can be freed before ONNX Runtime loads its copy
        ref_inputs = random_inputs(args.validate_batch, args.img_size, args.seed)
        reference = (ITAEReference(model, cfg) if cfg is not None else model).eval()
        ref_outputs = reference(torch.from_numpy(ref_inputs)).numpy()
        flag_stats = last_block_stats(model, torch.from_numpy(ref_inputs), cfg) if cfg is not None else None
        opt_reference = None
        if _graph_options_requested(args):
            from .triton import reference_batch

            opt_reference = reference_batch(
                args, lambda a, ref=reference: ref(torch.from_numpy(a)).numpy(), batch=args.validate_batch,
                height=args.img_size, width=args.img_size, seed=args.seed)
        fast_ref = None
        if fast:
            # the int8 accuracy report needs fp32 reference embeddings of the digits: compute them now,
            # before the torch model is freed
            from .fastpath import digits_eval_inputs
            from .runtime import run_batched

            digits = digits_eval_inputs(args.img_size, args.fast_path_eval_images, seed=0)
            fast_ref = (ref_outputs, run_batched(lambda a, ref=reference: ref(torch.from_numpy(a)).numpy(),
                                                 digits[0]))
        t0 = time.perf_counter()
        log(f"[2/4] exporting with the {args.exporter} exporter ...")
        export_onnx(model, tmp_onnx, img_size=args.img_size, exporter=args.exporter, opset=args.opset)
        log(f"      exported in {time.perf_counter() - t0:.1f} s")
        num_prefix = model.num_prefix_tokens
        del model, reference
        gc.collect()
        proto = onnx.load(str(tmp_onnx), load_external_data=False)
        result = None
        if cfg is None:
            for k, v in meta.items():
                proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
            log("[3/4] --no-itae: graph left unpatched")
        else:
            t0 = time.perf_counter()
            proto, result = apply_itae(proto, cfg, num_prefix_tokens=num_prefix, metadata=meta)
            log(f"[3/4] ITAE pass ({time.perf_counter() - t0:.2f} s): " + json.dumps(cfg.to_dict(), sort_keys=True))
            for line in result.summary().splitlines():
                log("      " + line)
        onnx.save_model(proto, str(tmp_onnx))
        onnx.checker.check_model(str(tmp_onnx))
        figures: dict = {}
        if args.skip_validation:
            log("[4/4] validation skipped (--skip-validation)")
        else:
            t0 = time.perf_counter()
            got = OrtRunner(tmp_onnx).run(ref_inputs)
            parity = compare(ref_outputs, got)
            figures = parity.to_dict()
            flagged = ""
            if flag_stats is not None:
                nf = int(flag_stats["flagged"].sum())
                flagged = f"; {nf} of {flag_stats['flagged'][..., num_prefix:].size} patch-token norms flagged"
                figures["flagged"] = nf
            log(f"[4/4] ONNX Runtime vs PyTorch {'ITAE reference' if cfg else 'model'} on {args.validate_batch} "
                f"random images: {parity}{flagged} ({time.perf_counter() - t0:.1f} s)")
            if not parity.ok():
                raise ParityError(
                    f"parity check failed ({parity}); the ONNX was not written. Re-run with --exporter "
                    f"{'torchscript' if args.exporter == 'dynamo' else 'dynamo'} or report a bug"
                )
        graph_opts = _optional_hook("triton", "apply_graph_options")
        if graph_opts is not None:
            # self-contained graph options (uint8 input, L2 norm) go after the float parity check
            new = Path(graph_opts(tmp_onnx, work / ("graphopt-" + onnx_out.name), args))
            if new != tmp_onnx:
                from .triton import verify_graph_options

                fig = verify_graph_options(tmp_onnx, new)
                log(f"      graph options: ONNX Runtime vs NumPy preprocessing: cosine min {fig['cos_min']:.7f}, "
                    f"max abs diff {fig['max_abs']:.2e}")
                if fig["cos_min"] < 0.99999:
                    raise ParityError(f"graph options changed the output ({fig}); report a bug")
                os.replace(new, tmp_onnx)
                # the engine check must feed what the final graph takes (uint8 pixels, L2 output)
                if opt_reference is not None:
                    ref_inputs, ref_outputs = opt_reference
        fast_report = None
        if fast:
            from .fastpath import (
                FAST_PATH_VALUES,
                FUSED_MIN_COSINE,
                accuracy_json,
                add_metadata,
                format_report,
                fuse_model,
                keep_fp32_copy,
                quantize_int8,
            )
            from .fastpath import accuracy_report as fast_accuracy

            t0 = time.perf_counter()
            fp32_onnx = work / fp32_path(onnx_out).name
            keep_fp32_copy(tmp_onnx, fp32_onnx)
            if fast_kind == "int8":
                quantize_int8(fp32_onnx, tmp_onnx,
                              per_channel=getattr(args, "int8_weights", None) != "per-tensor")
            else:
                fused = fuse_model(fp32_onnx, tmp_onnx)
                log(f"      fused the attention of {len(fused['fused'])} blocks into MultiHeadAttention "
                    f"(the final block's Softmax {fused['kept_final']} left as it is)")
            fast_report = fast_accuracy(fast_ref, tmp_onnx, ref_inputs, digits, k=10, seed=0,
                                        fast_path=FAST_PATH_VALUES[fast_kind])
            if fast_kind == "fused" and fast_report["validation"]["cos_min"] < FUSED_MIN_COSINE:
                raise ParityError(f"the fused model is not exact (cosine min {fast_report['validation']['cos_min']:.7f}"
                                  f" < {FUSED_MIN_COSINE}); nothing was written. Drop --fast-path or report a bug")
            add_metadata(tmp_onnx, {"itae_export.fast_path_accuracy": accuracy_json(fast_report)})
            log(f"      fast path {fast_kind} ({time.perf_counter() - t0:.1f} s): {format_report(fast_report)}")
        files = onnx_files(tmp_onnx) + (onnx_files(work / fp32_path(onnx_out).name) if fast else [])
        for f in files:
            os.chmod(f, 0o644)
            os.replace(f, onnx_out.parent / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extra = len(files) - 1 - (1 if fast_report is not None else 0)
    log(f"wrote {onnx_out}" + (f" ({fast_kind} fast path)" if fast_report is not None else "")
        + (f" (+ {extra} external data file(s))" if extra > 0 else "")
        + (f" and the fp32 model {fp32_path(onnx_out)}" if fast_report is not None else "")
        + f" in {time.perf_counter() - t_start:.1f} s")
    run_meta = {
        "model": args.model,
        "img_size": args.img_size,
        "num_prefix_tokens": num_prefix,
        "itae": cfg.to_dict() if cfg is not None else None,
        "exporter": args.exporter,
        "parity_onnxruntime": figures,
        "pass": result.to_dict() if result is not None else None,
        "reference_inputs": ref_inputs,
        "reference_outputs": ref_outputs,
        "fast_path": fast_report,
    }
    final_model = onnx_out
    if engine_path is not None:
        build = _optional_hook("engine", "build_from_cli")
        if build is None:
            raise UsageError("TensorRT engine support is not available in this installation")
        summary = build(args, onnx_out, engine_path, run_meta) or {}
        for k in ("engine", "sidecar", "precision", "parity"):
            if k in summary:
                log(f"      {k}: {summary[k]}")
        final_model = engine_path
    if getattr(args, "triton_repo", None):
        deploy = _optional_hook("triton", "deploy_from_cli")
        if deploy is None:
            raise UsageError("Triton support is not available in this installation")
        res = deploy(args, final_model, run_meta)
        if res is not None:
            log(res.summary())
    return 0


def _graph_options_requested(args: argparse.Namespace) -> bool:
    return getattr(args, "input_format", None) == "uint8-nhwc" or bool(getattr(args, "l2_normalize", False))


def _optional_hook(module: str, fn: str):
    try:
        mod = __import__(f"itae_export.{module}", fromlist=[fn])
    except ImportError:
        return None
    return getattr(mod, fn, None)


def export_main(argv: list[str] | None = None) -> int:
    return _run_cli(_export, export_parser(), argv)


# ---------------------------------------------------------------- itae-patch
def patch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="itae-patch",
        description="Apply ITAE to the final attention block of a DINOv2 ONNX graph exported elsewhere. "
        "The input is never modified; weights are not loaded.",
    )
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("--out", required=True, metavar="OUT.onnx")
    p.add_argument("--num-prefix-tokens", type=int, help="CLS + register tokens (default: read from the graph)")
    p.add_argument("--copy-weights", action="store_true",
                   help="copy external weights next to OUT (default: reference them in place when OUT is in the same folder)")
    p.add_argument("--check", choices=("auto", "yes", "no"), default="auto",
                   help="run original and patched graphs in ONNX Runtime on random inputs (auto: models under 2 GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    add_itae_args(p)
    return p


def _patch(args: argparse.Namespace) -> int:
    from graph_passes.itae import apply_itae

    t0 = time.perf_counter()
    src = Path(args.input)
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise UsageError(f"--out {out} must end in .onnx")
    cfg = itae_config_from_args(args)
    model = load_onnx_checked(src)
    check_output_path(out, force=args.force, inputs=(src,))
    for loc in external_locations(model):
        if not (src.parent / loc).is_file():
            raise UsageError(f"{src} references external weights {loc} that are not next to it; keep the .data file beside the .onnx")
    meta = {}
    img = _static_image_size(model)
    if img:
        meta["itae.img_size"] = str(img)
    patched, result = apply_itae(model, cfg, num_prefix_tokens=args.num_prefix_tokens, metadata=meta)
    t_pass = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".itae-patch-", dir=out.parent))
    try:
        staged = stage_model(patched, out.name, work, src_dir=src.parent, final_dir=out.parent,
                             copy_weights=args.copy_weights, force=args.force)
        for f in staged:
            os.chmod(f, 0o644)
            os.replace(f, out.parent / f.relative_to(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"patched {src} -> {out} in {t_pass:.2f} s; ITAE settings: {json.dumps(cfg.to_dict(), sort_keys=True)}")
    for line in result.summary().splitlines():
        log("  " + line)
    _check_patched(src, out, args, img)
    return 0


def _static_image_size(model) -> int | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    vals = [d.dim_value for d in dims]
    if len(vals) == 4 and vals[2] and vals[2] == vals[3]:
        return vals[2]
    return None


def _check_patched(src: Path, out: Path, args: argparse.Namespace, img: int | None) -> None:
    size = sum(f.stat().st_size for f in [src] + [src.parent / loc for loc in external_locations(load_onnx_checked(src))])
    if args.check == "no" or (args.check == "auto" and size > 2 * 1024**3):
        log("  check skipped" + (" (model over 2 GB; --check yes forces it)" if args.check == "auto" else ""))
        return
    if img is None:
        log("  check skipped: the input has no static [B,3,H,W] shape")
        return
    from .runtime import OrtRunner
    from .validate import compare

    x = random_inputs(2, img, args.seed)
    a = OrtRunner(src).run(x)
    b = OrtRunner(out).run(x)
    if not np.all(np.isfinite(b)):
        raise ParityError(f"the patched graph {out} produced non-finite outputs; report a bug")
    log(f"  check on 2 random inputs, patched vs original: {compare(a, b)} (differences are ITAE at work)")


def patch_main(argv: list[str] | None = None) -> int:
    return _run_cli(_patch, patch_parser(), argv)


# ---------------------------------------------------------------- itae-inspect
def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itae-inspect", description="Dry run: print what the ITAE pass would match and insert.")
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("--num-prefix-tokens", type=int)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_itae_args(p)
    return p


def inspect_report(model, cfg: ITAEConfig, num_prefix_tokens: int | None = None) -> dict:
    from graph_passes.itae import apply_itae
    from graph_passes.match import already_patched, infer_num_prefix_tokens, match_final_attention

    report: dict = {"opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)}
    patched = already_patched(model)
    report["already_patched"] = patched or False
    m = match_final_attention(model)
    report.update(m.describe())
    report["num_prefix_tokens"] = num_prefix_tokens or infer_num_prefix_tokens(model)
    if report["num_prefix_tokens"]:
        report["registers"] = report["num_prefix_tokens"] - 1
    report["img_size"] = _static_image_size(model)
    report.update(_dims_from_weights(model, m))
    if not patched:
        _, res = apply_itae(model, cfg, num_prefix_tokens=num_prefix_tokens)
        report["would_insert"] = res.inserted_ops
        report["would_insert_nodes"] = len(res.inserted)
    return report


def _dims_from_weights(model, m) -> dict:
    from graph_passes.graph import GraphIndex

    ix = GraphIndex(model)
    node = ix.producer.get(m.qk_matmul.input[0])
    out: dict = {}
    # embedding size: the input dim of the projection weight
    for n in model.graph.node:
        if (n.name or n.output[0]) in m.projections.values():
            w = n.input[1] if n.op_type in ("MatMul", "Gemm") else None
            if n.op_type == "Add":
                mm = next((ix.producer[i] for i in n.input if i in ix.producer and ix.producer[i].op_type in ("MatMul", "Gemm")), None)
                w = mm.input[1] if mm is not None else None
            dims = ix.const_dims(w) if w else None
            if dims and len(dims) == 2:
                out["embed_dim"] = dims[0]
            break
    # heads: the 5-D reshape [B, T, 3, H, Dh] (fused) or 4-D [B, T, H, Dh] on the way to q
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


def _inspect(args: argparse.Namespace) -> int:
    model = load_onnx_checked(args.input)
    cfg = itae_config_from_args(args)
    rep = inspect_report(model, cfg, args.num_prefix_tokens)
    if args.json:
        print(json.dumps(rep, indent=2, sort_keys=True))
        return 0
    log(f"{args.input}: opset {rep['opset']}, {rep['attention_blocks']} attention blocks")
    log(f"  embedding size: {rep.get('embed_dim', 'unknown')}, heads: {rep.get('num_heads', 'unknown')}, "
        f"image size: {rep['img_size'] or 'dynamic'}")
    log(f"  prefix tokens: {rep['num_prefix_tokens']} (registers: {rep.get('registers', 'unknown')})")
    log(f"  final attention: Softmax {rep['softmax']}, QK MatMul {rep['qk_matmul']}, PV MatMul {rep['pv_matmul']}")
    log(f"  q/k/v: {rep['qkv_projection']} projection {sorted(set(rep['projections'].values()))}; "
        f"scale on {', '.join(rep['scale_on'])}")
    for r in rep["rejected_candidates"]:
        log(f"  rejected candidate: {r}")
    if rep["already_patched"]:
        log(f"  already patched: {rep['already_patched']}")
    else:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(rep["would_insert"].items()))
        log(f"  would insert {rep['would_insert_nodes']} nodes: {ops}")
    return 0


def inspect_main(argv: list[str] | None = None) -> int:
    return _run_cli(_inspect, inspect_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(export_main())
