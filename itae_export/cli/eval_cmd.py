"""`itae-eval` (k-means clustering of DINOv2 CLS features with and without ITAE, on PyTorch and on
exported backends, with a Markdown + JSON report) and `itae-calibrate` (ITAE's absolute threshold at
the valley of the patch-token length histogram, saved as a settings file for --settings)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..outputs import OutputTransaction
from ..viz import plural
from .common import add_itae_args, itae_config_from_args, make_parser

# --------------------------------------------------------------------------------------------- options


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="DINOv2 model name, e.g. dinov2_vitl14, dinov2_vitb14, dinov2_vits14_reg")
    w = p.add_mutually_exclusive_group()
    w.add_argument(
        "--weights",
        metavar="PATH",
        help="official .pth, timm .safetensors, or a Hugging Face transformers folder (config.json + "
        "model.safetensors) (default: search the torch hub, timm and Hugging Face caches)",
    )
    w.add_argument(
        "--random-weights", action="store_true", help="random weights (smoke tests; numbers mean nothing)"
    )
    p.add_argument(
        "--demo-artifacts",
        action="store_true",
        help="synthetic demo model: seeded random weights with planted high-norm artifact tokens (the image "
        "corners) that draw the CLS attention in the final block, so ITAE visibly acts (docs/evaluation.md); "
        "implies random weights",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random-weights / --demo-artifacts (0)")
    p.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)  # tests: a shallow random model
    p.add_argument("--img-size", type=int, default=224, help="input size, multiple of 14")


def _add_data_args(p: argparse.ArgumentParser, *, default_limit: int | None) -> None:
    from ..data import DATASETS

    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, choices=DATASETS, help="the data set (docs/evaluation.md)")
    g.add_argument("--data-root", metavar="DIR", help="folder holding the data set in its release layout")
    g.add_argument(
        "--split", default=None, help="test (default; tiny-imagenet: val; digits: all), train, ..."
    )
    g.add_argument(
        "--coarse",
        action="store_true",
        help="CIFAR-100: the 20 coarse superclasses instead of the 100 fine classes",
    )
    g.add_argument("--limit", type=int, default=default_limit, metavar="N",
                   help="use a seeded random subset of N images" + ("" if default_limit else " (default: all)"))
    g.add_argument("--subset-seed", type=int, default=0, metavar="SEED", help="seed of the --limit subset (0)")
    g.add_argument(
        "--resize",
        choices=("shorter", "square"),
        default="shorter",
        help="resize the shorter side (keeps aspect) or both sides",
    )
    g.add_argument(
        "--resize-size",
        type=int,
        default=None,
        metavar="PX",
        help="resize target before the centre crop (default: round(img_size*256/224))",
    )
    g.add_argument("--interpolation", choices=("bicubic", "bilinear"), default="bicubic", help="resize filter")
    g.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass")
    g.add_argument("--workers", type=int, default=2, metavar="N", help="image decoding threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bars or status lines on stderr")


def _load_data(args):
    from ..data import Preprocess, load_dataset

    t0 = time.perf_counter()
    _status(args, f"reading {args.dataset}{f' ({args.split})' if args.split else ''}...")
    ds = load_dataset(args.dataset, args.data_root, args.split, coarse=args.coarse).subset(
        args.limit, args.subset_seed
    )
    pre = Preprocess(
        img_size=args.img_size,
        resize=args.resize,
        resize_size=args.resize_size,
        interpolation=args.interpolation,
    )
    return ds, pre, time.perf_counter() - t0


def _check_demo_args(args) -> None:
    """--demo-artifacts builds its own seeded random weights: refused with --weights (before any output)."""
    if getattr(args, "demo_artifacts", False) and args.weights:
        raise UsageError(
            f"--demo-artifacts builds a synthetic model from seeded random weights, so it cannot use --weights "
            f"{args.weights}; drop one of the two"
        )


def _model_words(args) -> str:
    """The model's name in titles: the synthetic demo model says so."""
    return f"{args.model} (synthetic demo, planted artifacts)" if getattr(args, "demo_artifacts", False) else args.model


def _params_sha256(model) -> str:
    """Digest of every parameter and buffer (the demo weights are computed, not read from a file)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _build_demo(args, *, artifacts: bool):
    """The demo embedder (demo.demo_model) and its identity: the random seed, plus a "demo" entry (clean
    or with artifacts, planted positions, digest of the edited weights) that keeps its cache entries
    apart from the clean twin's and from the plain random model's."""
    from ..demo import demo_model
    from ..embed import model_identity

    embedder = demo_model(args.model, img_size=args.img_size, seed=args.seed, depth=args.depth, artifacts=artifacts)
    ident = model_identity(args.model, weights=None, random_weights=True, seed=args.seed, img_size=args.img_size,
                           depth=args.depth)
    ident["demo"] = {"artifacts": artifacts, "positions": [int(i) for i in embedder.demo_positions],
                     "params_sha256": _params_sha256(embedder)}
    return embedder, ident


def _build(args):
    from ..embed import model_identity
    from ..models import build_model, find_weights, get_spec

    t0 = time.perf_counter()
    if getattr(args, "demo_artifacts", False):
        _status(args, f"building {args.model} (synthetic demo: random weights, seed {args.seed}, planted artifact "
                      f"tokens, {args.img_size} px)...")
        embedder, ident = _build_demo(args, artifacts=True)
        return embedder, ident, time.perf_counter() - t0
    weights = "random weights" if args.random_weights else f"weights {args.weights or 'from the caches'}"
    _status(args, f"building {args.model} ({weights}, {args.img_size} px)...")
    described = dict(weights=args.weights, random_weights=args.random_weights, seed=args.seed,
                     img_size=args.img_size, depth=args.depth)  # what builds the model is what identifies it
    embedder = build_model(args.model, **described)
    resolved = None if args.random_weights else (args.weights or find_weights(get_spec(args.model)))
    ident = model_identity(args.model, **described, resolved_weights=resolved)
    return embedder, ident, time.perf_counter() - t0


def _environment() -> dict:
    import sklearn
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__}
    env["torch_threads"] = torch.get_num_threads()
    env["sklearn"] = sklearn.__version__
    import onnxruntime

    env["onnxruntime"] = onnxruntime.__version__
    return env


def _run_cli(fn, parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """The CLIs' shared error handling (itae_export.cli): "PROG: error: ..." on stderr and the error
    family's exit code."""
    from .common import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(parser.prog, parser, lambda args: fn(args, argv), argv)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


# ------------------------------------------------------------------------------------------- itae-eval


def build_eval_parser() -> argparse.ArgumentParser:
    p = make_parser(
        prog="itae-eval",
        description="k-means clustering of DINOv2 CLS features, baseline vs ITAE, on PyTorch and exported backends; "
        "writes report.md and report.json.",
    )
    _add_model_args(p)
    _add_data_args(p, default_limit=None)
    b = p.add_argument_group("backends (PyTorch baseline and ITAE always run)")
    b.add_argument(
        "--onnx",
        metavar="FILE",
        help="ITAE ONNX from itae-export: also run it on ONNX Runtime and compare with PyTorch ITAE",
    )
    b.add_argument(
        "--onnx-baseline",
        metavar="FILE",
        help="baseline ONNX (no ITAE): run it and compare with the PyTorch baseline",
    )
    b.add_argument(
        "--engine",
        metavar="FILE",
        help="TensorRT engine of the ITAE model: run it and compare with PyTorch ITAE",
    )
    b.add_argument(
        "--openvino",
        metavar="FILE",
        help="OpenVINO IR (.xml, .bin beside it) of the ITAE model from itae-export --out *.xml: run it on the "
        "CPU with its sidecar's compile_config and compare with PyTorch ITAE",
    )
    b.add_argument(
        "--ort-providers", default=None, help="comma-separated ONNX Runtime providers (default: CPU)"
    )
    b.add_argument("--ray-workers", type=int, default=0, metavar="N",
                   help="run the exported backends on itae-embed's Ray Data pipeline with N actors (needs the "
                   "[scale] extra; docs/collections.md); 0: in this process")
    k = p.add_argument_group("k-means")
    k.add_argument(
        "--n-clusters", type=int, default=None, help="number of clusters (default: number of classes)"
    )
    k.add_argument("--kmeans-seed", type=int, default=0, help="k-means random_state (0)")
    k.add_argument("--n-init", type=int, default=10, help="k-means restarts; the best inertia wins")
    k.add_argument(
        "--normalize",
        choices=("none", "l2"),
        default="none",
        help="L2-normalise embeddings before k-means (none)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--report-dir", required=True, metavar="DIR", help="where report.md, report.json and figures go"
    )
    o.add_argument("--cache-dir", metavar="DIR", help="embeddings cache (default: REPORT_DIR/embeddings)")
    o.add_argument("--no-cache", action="store_true", help="neither read nor write cached embeddings")
    o.add_argument(
        "--viz",
        type=int,
        default=4,
        metavar="N",
        help="attention figures for the first N images, and the norm histogram of all evaluated images; "
        "0 for none",
    )
    o.add_argument("--force", action="store_true", help="overwrite an existing report in REPORT_DIR")
    add_itae_args(p)
    return p


def _recorded_itae(onnx_ident: dict) -> dict | None:
    """The ITAE settings the graph pass wrote into the model's metadata (None: not an ITAE model)."""
    from graph_passes.match import META_SETTINGS_KEY

    raw = onnx_ident.get("metadata", {}).get(META_SETTINGS_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {"unreadable": raw}


def _check_onnx_settings(path: str, cfg_dict: dict | None, flag: str) -> None:
    """Refuse a model that does not match the PyTorch run it is compared with: an ITAE model exported
    with other settings, a baseline given as --onnx, or an ITAE model given as --onnx-baseline. The
    comparison would otherwise measure the settings, not the backend."""
    from ..embed import onnx_identity

    recorded = _recorded_itae(onnx_identity(path))
    if cfg_dict is None and recorded is not None:
        raise UsageError(
            f"{flag} {path} is an ITAE model (settings {recorded}); pass it as --onnx, or pass the unpatched export"
        )
    if cfg_dict is not None and recorded is None:
        raise UsageError(
            f"{flag} {path} carries no ITAE settings in its metadata, so it is not an ITAE model from itae-export/itae-patch; "
            "pass it as --onnx-baseline, or pass the patched model"
        )
    if cfg_dict is not None and recorded != cfg_dict:
        raise UsageError(
            f"{flag} {path} was patched with ITAE settings {recorded}, but this run uses {cfg_dict}; "
            "pass the same ITAE flags (or the --settings FILE used for the export), or the matching model"
        )


def _check_engine_settings(path: str, cfg_dict: dict) -> dict | None:
    """The engine builder's sidecar (`<engine>.json`) records the ITAE settings of the ONNX it was built
    from; refuse a mismatch like for --onnx. Returns the sidecar's precision facts (None: no sidecar)."""
    side = Path(str(path) + ".json")
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(
            f"engine sidecar {side} is not readable JSON ({e}); rebuild the engine with itae-export"
        ) from e
    recorded = data.get("itae")
    if recorded is None:
        raise UsageError(
            f"--engine {path} was built from a model without ITAE (sidecar {side}); pass the ITAE engine"
        )
    if recorded != cfg_dict:
        raise UsageError(
            f"--engine {path} was built with ITAE settings {recorded}, but this run uses {cfg_dict}; "
            "pass the same ITAE flags (or --settings FILE), or the matching engine"
        )
    return {k: data.get(k) for k in ("precision", "tf32", "tensorrt_version", "gpu", "img_size", "model")}


def eval_command(args: argparse.Namespace, argv: list[str]) -> int:
    t_start = time.perf_counter()
    report_dir = Path(args.report_dir)
    json_path, md_path = report_dir / "report.json", report_dir / "report.md"
    hist_path = report_dir / "norm_histogram.png"
    _check_demo_args(args)
    inputs = _input_files(args, "settings", "weights", "onnx", "onnx_baseline", "engine", "openvino")
    with contextlib.ExitStack() as stack:
        # Validated and claimed before any heavy work: an existing report (without --force), a report
        # path that is an input, an unwritable folder are refused here. Everything lands in one commit.
        report_tx = stack.enter_context(OutputTransaction(
            json_path, extra=[md_path] + ([hist_path] if args.viz > 0 else []), inputs=inputs, force=args.force,
            flag="--report-dir"))
        return _eval(args, argv, stack, report_tx, t_start, inputs)


def _input_files(args: argparse.Namespace, *names: str) -> list[Path]:
    """The files a run reads (never outputs); a transformers checkpoint folder adds its files."""
    from ..errors import ModelError
    from ..hf_weights import hf_checkpoint_files

    out = []
    for p in (Path(v) for v in (getattr(args, n, None) for n in names) if v):
        out.append(p)
        if p.is_dir():
            with contextlib.suppress(ModelError, OSError):
                out += hf_checkpoint_files(p)
    return out


def _status(args: argparse.Namespace, message: str) -> None:
    """A status line on stderr before a step that has no progress bar (none with --no-progress)."""
    if not args.no_progress:
        print(message, file=sys.stderr, flush=True)


@dataclass
class _Runs:
    """Every backend's embeddings, k-means assignments and report record, by backend name."""

    records: dict[str, dict] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    assignments: dict[str, np.ndarray] = field(default_factory=dict)


def _eval(args, argv, stack: contextlib.ExitStack, report_tx: OutputTransaction, t_start: float,
          inputs: list[Path]) -> int:
    """Check the given models, load the data, build the backends, embed and cluster with each, draw
    the figures, write the report."""
    from ..cluster import KMeansSettings

    report_dir = Path(args.report_dir)
    cfg = itae_config_from_args(args)
    engine_facts = _check_models(args, cfg)  # cheap checks of the given models before any image is read
    km_settings = KMeansSettings(
        n_clusters=args.n_clusters, seed=args.kmeans_seed, n_init=args.n_init, normalize=args.normalize
    )
    ds, pre, t_data = _load_data(args)
    attention_tx = _claim_attention_figures(args, ds, stack, inputs)
    embedder, model_ident, t_model = _build(args)
    backends, compare_to = _make_backends(args, embedder, cfg, engine_facts)
    clean = None
    if args.demo_artifacts:  # the clean twin (no planted tokens) runs first: the reference the demo is read against
        t0 = time.perf_counter()
        _status(args, f"building the clean twin of the demo model (no planted tokens, {args.img_size} px)...")
        clean_embedder, clean_ident = _build_demo(args, artifacts=False)
        t_model += time.perf_counter() - t0
        clean = _clean_backend(clean_embedder)
        backends.insert(0, clean)
    runs = _embed_and_cluster(args, backends, ds, pre, model_ident, km_settings,
                              idents={clean.name: clean_ident} if clean else None)
    figures, histogram, flags = (
        _eval_figures(args, embedder, ds, pre, cfg, report_dir, report_tx, attention_tx)
        if args.viz > 0 else ([], None, None)
    )  # fmt: skip
    demo = None
    if args.demo_artifacts:
        if flags is None:
            flags = _flag_stats(args, embedder, ds, pre, cfg)
        demo = _demo_summary(runs, flags, embedder.demo_positions, clean_ident)
        print("\n".join(demo["summary"]), flush=True)
    report = _eval_report(
        args, argv, model_ident=model_ident, ds=ds, pre=pre, km_settings=km_settings, cfg=cfg, runs=runs,
        compare_to=compare_to, figures=figures, histogram=histogram,
        timings={"load_data_s": t_data, "build_model_s": t_model, "total_s": time.perf_counter() - t_start},
        demo=demo,
    )  # fmt: skip
    _write_report(report, report_dir, report_tx, attention_tx)
    return 0


CLEAN_RUN = "torch-clean"
DEMO_ROWS = (  # (key, run, description) of the three demo rows
    ("clean", CLEAN_RUN, "clean demo model (no artifacts), baseline"),
    ("artifacts", "torch-baseline", "with artifacts, baseline"),
    ("artifacts_itae", "torch-itae", "with artifacts + ITAE"),
)


def _clean_backend(clean_embedder):
    """The PyTorch baseline of the demo model's clean twin."""
    from ..embed import torch_baseline_backend

    be = torch_baseline_backend(clean_embedder)
    be.name = CLEAN_RUN
    be.identity = {**be.identity, "module": "embedder (clean demo twin)"}
    return be


def _flag_stats(args, embedder, ds, pre, cfg) -> dict:
    """What ITAE flags on every evaluated image, and the CLS attention on it (when no histogram pass ran)."""
    from ..calibrate import collect_patch_lengths
    from ..data import iter_batches

    batches = (b for b, _ in iter_batches(ds, pre, args.batch_size, progress=False, workers=args.workers))
    _, info = collect_patch_lengths(embedder, batches, cfg, progress=not args.no_progress, total=len(ds),
                                    desc="flagged tokens")
    return info["flags"]


def _demo_summary(runs: _Runs, flags: dict, positions: list[int], clean_ident: dict) -> dict:
    """report["demo"]: the three rows (clean, artifacts, artifacts + ITAE), what ITAE flagged and the CLS
    attention mass on it before/after, and the summary lines printed on stdout and in report.md."""
    from ..demo import LABEL

    rows = {key: {"run": run, "description": desc,
                  **{m: runs.records[run]["metrics"][m] for m in ("acc", "nmi", "ari")}}
            for key, run, desc in DEMO_ROWS}
    loss = {m: rows["artifacts"][m] - rows["clean"][m] for m in ("acc", "nmi", "ari")}
    gain = {m: rows["artifacts_itae"][m] - rows["artifacts"][m] for m in ("acc", "nmi", "ari")}
    recovered = gain["acc"] / -loss["acc"] if loss["acc"] < 0 else None
    per_pos = flags.get("flagged_per_position") or []
    at_planted = int(sum(per_pos[i] for i in positions if i < len(per_pos)))
    flags = {**flags, "planted_positions": [int(i) for i in positions], "flagged_at_planted": at_planted,
             "planted_tokens": len(positions) * flags["images"]}
    lines = [LABEL]
    lines += [f"  {r['description']:44s} ACC {_pct(r['acc'])}  NMI {_pct(r['nmi'])}  ARI {_pct(r['ari'])}"
              for r in rows.values()]
    rec = f" ({100 * recovered:.0f}% of the loss won back)" if recovered is not None else ""
    lines.append(f"  artifacts - clean: ACC {100 * loss['acc']:+.2f} points; ITAE - artifacts: ACC "
                 f"{100 * gain['acc']:+.2f} points{rec}")
    n = flags["images"]
    per = flags["flagged_per_image"]
    lines.append(f"  flagged tokens: {per:.2f} per image on average, {flags['flagged_tokens']} in all "
                 f"({plural(n, 'image')}); {at_planted} of them at the {plural(len(positions), 'planted position')}"
                 if per is not None else "  flagged tokens: none (no image)")
    before, after = flags["cls_attention_on_flagged_before"], flags["cls_attention_on_flagged_after"]
    if before is not None:
        lines.append(f"  CLS attention on the flagged tokens (final block, mean over heads and images): "
                     f"{before:.3f} before ITAE, {after:.3f} after")
    return {"label": LABEL, "rows": rows, "artifacts_minus_clean": loss, "itae_minus_artifacts": gain,
            "acc_loss_recovered": recovered, "flags": flags, "clean_model": clean_ident, "summary": lines}


def _check_models(args, cfg) -> dict | None:
    """Refuse given models whose ITAE settings do not match this run; returns the engine sidecar's facts."""
    if args.onnx_baseline:
        _check_onnx_settings(args.onnx_baseline, None, "--onnx-baseline")
    if args.onnx:
        _check_onnx_settings(args.onnx, cfg.to_dict(), "--onnx")
    if getattr(args, "openvino", None):
        _check_openvino_settings(args.openvino, cfg.to_dict())
    return _check_engine_settings(args.engine, cfg.to_dict()) if args.engine else None


def _check_openvino_settings(path: str, cfg_dict: dict) -> None:
    """The IR's files must be there, and its sidecar's ITAE settings (when it has one) match this run."""
    from ..ov_runner import check_ir_files, read_sidecar

    check_ir_files(path)
    side = read_sidecar(path)
    if side is not None and side.get("itae") != cfg_dict:
        raise UsageError(f"--openvino {path} was exported with ITAE settings {side.get('itae')}, but this run uses "
                         f"{cfg_dict}; pass the same ITAE flags (or --settings FILE), or the matching IR")


def _claim_attention_figures(args, ds, stack: contextlib.ExitStack, inputs: list[Path]) -> OutputTransaction | None:
    """The output transaction of the attention PNGs (claimed before the model is built), if any."""
    if args.viz <= 0 or len(ds) == 0:
        return None
    from ..viz import attention_figure_paths

    figs = attention_figure_paths(Path(args.report_dir) / "attention", min(args.viz, len(ds)),
                                  _figure_names(args, ds))
    return stack.enter_context(OutputTransaction(
        figs[-1], extra=figs[:-1], inputs=inputs, force=args.force, flag="--report-dir"))


def _make_backends(args, embedder, cfg, engine_facts: dict | None) -> tuple[list, dict[str, str]]:
    """The PyTorch baseline and ITAE, then the given ONNX models / engine; and for each exported
    backend the PyTorch run it is compared with."""
    from ..embed import onnx_backend, tensorrt_backend, torch_baseline_backend, torch_itae_backend

    backends = [torch_baseline_backend(embedder), torch_itae_backend(embedder, cfg)]
    compare_to = {}
    providers = args.ort_providers.split(",") if args.ort_providers else None
    if args.onnx_baseline:
        be = onnx_backend(args.onnx_baseline, name="onnxruntime-baseline", itae=None, providers=providers)
        backends.append(be)
        compare_to[be.name] = "torch-baseline"
    if args.onnx:
        be = onnx_backend(args.onnx, name="onnxruntime-itae", itae=cfg.to_dict(), providers=providers)
        backends.append(be)
        compare_to[be.name] = "torch-itae"
    if args.engine:
        be = tensorrt_backend(args.engine, name="tensorrt-itae", itae=cfg.to_dict())
        be.identity["sidecar"] = engine_facts
        backends.append(be)
        compare_to[be.name] = "torch-itae"
    if getattr(args, "openvino", None):
        from ..embed import openvino_backend

        be = openvino_backend(args.openvino, name="openvino-itae", itae=cfg.to_dict())
        backends.append(be)
        compare_to[be.name] = "torch-itae"
    if args.ray_workers:
        _on_ray(args, backends)
    return backends, compare_to


def _on_ray(args, backends: list) -> None:
    """--ray-workers: the exported backends compute their embeddings on the Ray Data pipeline."""
    from ..collection import require_scale
    from ..collection_dataset import dataset_model, ray_bulk
    from ..collection_ray import RaySettings

    if args.ray_workers < 0:
        raise UsageError(f"--ray-workers must be >= 0, got {args.ray_workers}")
    require_scale("itae-eval --ray-workers")
    paths = {"onnxruntime-baseline": args.onnx_baseline, "onnxruntime-itae": args.onnx, "tensorrt-itae": args.engine,
             "openvino-itae": getattr(args, "openvino", None)}
    settings = RaySettings(workers=args.ray_workers, batch_size=args.batch_size)
    for be in backends:
        if be.name in paths:
            be.bulk = ray_bulk(dataset_model(paths[be.name], be.kind, args.img_size), settings)


def _embed_and_cluster(args, backends: list, ds, pre, model_ident: dict, km_settings,
                       idents: dict[str, dict] | None = None) -> _Runs:
    """Embeddings (cached or computed, a progress bar of the images embedded) and k-means per backend.
    idents: the model identity of the backends that run another model (the demo's clean twin)."""
    from ..cluster import clustering_metrics, kmeans
    from ..embed import EmbeddingCache, get_embeddings

    cache = EmbeddingCache(None if args.no_cache else (args.cache_dir or Path(args.report_dir) / "embeddings"))
    runs = _Runs()
    for be in backends:
        ident = (idents or {}).get(be.name, model_ident)
        emb, info = get_embeddings(be, ds, pre, ident, cache, batch_size=args.batch_size,
                                   progress=not args.no_progress, workers=args.workers)
        k = km_settings.n_clusters or ds.num_classes
        _status(args, f"{be.name}: k-means (k = {k}, n_init {km_settings.n_init}) on "
                      f"{plural(len(emb), 'embedding')} of dimension {emb.shape[1]}...")
        assign, km_info = kmeans(emb, km_settings, ds.num_classes)
        metrics = clustering_metrics(ds.labels, assign)
        runs.embeddings[be.name], runs.assignments[be.name] = emb, assign
        runs.records[be.name] = {
            "backend": be.kind,
            "itae": be.itae,
            "metrics": metrics,
            "embedding": {"dim": int(emb.shape[1]), **info},
            "kmeans": km_info,
            "identity": be.identity,
            **({"model": ident} if ident is not model_ident else {}),
        }
        took = "cached" if info["cached"] else f"{info['seconds']:.1f} s"
        print(
            f"{be.name:22s} ACC {_pct(metrics['acc'])}  NMI {_pct(metrics['nmi'])}  ARI {_pct(metrics['ari'])}  ({took})",
            file=sys.stderr,
        )
    return runs


def _eval_report(args, argv, *, model_ident: dict, ds, pre, km_settings, cfg, runs: _Runs,
                 compare_to: dict[str, str], figures: list[Path], histogram: dict | None,
                 timings: dict[str, float], demo: dict | None = None) -> dict:
    """report.json's content (report.md is rendered from it)."""
    from ..cluster import backend_agreement

    emb, assign, rec = runs.embeddings, runs.assignments, runs.records
    agreement = {
        f"{name} vs {ref}": backend_agreement(emb[ref], emb[name], assign[ref], assign[name])
        for name, ref in compare_to.items()
    }
    delta = {m: rec["torch-itae"]["metrics"][m] - rec["torch-baseline"]["metrics"][m] for m in ("acc", "nmi", "ari")}
    report_dir = Path(args.report_dir)
    title = f"itae-eval: {model_ident['name']} on {dataset_title(ds.describe())}"
    if demo is not None:
        title += f" - {demo['label']}"
    return {
        "tool": "itae-eval",
        "title": title,
        **({"demo": demo} if demo is not None else {}),
        "argv": argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model_ident,
        "dataset": ds.describe(),
        "preprocessing": {**pre.to_dict(), "description": pre.describe()},
        "kmeans": km_settings.to_dict(),
        "itae": cfg.to_dict(),
        "runs": rec,
        "itae_minus_baseline": delta,
        "agreement": agreement,
        "figures": [str(p.relative_to(report_dir)) for p in figures],
        "norm_histogram": histogram,
        "timings": timings,
        "environment": _environment(),
    }


def _write_report(report: dict, report_dir: Path, report_tx: OutputTransaction,
                  attention_tx: OutputTransaction | None) -> None:
    """Stage report.md and report.json and commit: the figures first, the report that links them last.
    Reports are generated, not copied: no source caps their mode (0o644)."""
    json_path, md_path = report_dir / "report.json", report_dir / "report.md"
    for path, text in ((md_path, render_eval_markdown(report)),
                       (json_path, json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")):
        staged = report_tx.stage_path(path)
        staged.write_text(text)
        report_tx.add(staged, path)
    if attention_tx is not None:
        attention_tx.commit()
    report_tx.commit()
    print(f"report: {md_path} and {json_path}", file=sys.stderr)


def _figure_names(args, ds) -> list[str]:
    n = min(args.viz, len(ds))
    return [
        f"{ds.name}_{i:05d}_{ds.classes[ds.labels[i]]}".replace("/", "_").replace(" ", "_").replace(os.sep, "_")
        for i in range(n)
    ]


def _eval_figures(args, embedder, ds, pre, cfg, report_dir: Path, report_tx: OutputTransaction,
                  attention_tx: OutputTransaction | None) -> tuple[list[Path], dict, dict]:
    """Attention before/after ITAE for the first --viz images, and the patch-length histogram of every
    evaluated image, staged in the report's transactions. Returns (paths, the histogram's record, what
    ITAE flags on those images: calibrate.collect_patch_lengths' info["flags"])."""
    import torch

    from ..calibrate import collect_patch_lengths
    from ..data import iter_batches
    from ..reference import last_block_stats
    from ..viz import attention_figures, plot_norm_histogram

    n = min(args.viz, len(ds))
    _status(args, "attention figure of the first image..." if n == 1 else f"attention figures of the first {n} images...")
    x = np.stack([pre(ds.load(i)) for i in range(n)])
    st = last_block_stats(embedder, torch.from_numpy(x), cfg)
    images = np.stack([pre.denormalize(xi) for xi in x])
    paths = attention_figures(st, images, report_dir / "attention", names=_figure_names(args, ds), tx=attention_tx)
    batches = (b for b, _ in iter_batches(ds, pre, args.batch_size, progress=False, workers=args.workers))
    lengths, info = collect_patch_lengths(embedder, batches, cfg, progress=not args.no_progress, total=len(ds),
                                          desc="norm histogram")
    histogram = {"file": "norm_histogram.png", "images": info["num_images"], "lengths": int(lengths.size),
                 "norm_source": cfg.norm_source, "norm_scope": cfg.norm_scope}
    title = (f"{_model_words(args)}: {cfg.norm_source} lengths of patch tokens ({cfg.norm_scope} scope), "
             f"last block\n{dataset_title(ds.describe())}, {plural(lengths.size, 'length')}")
    paths.append(plot_norm_histogram(lengths, report_dir / "norm_histogram.png", threshold=cfg.threshold,
                                     title=title, tx=report_tx))
    return paths, histogram, info["flags"]


def dataset_title(d: dict) -> str:
    """The evaluated images, from ImageDataset.describe(): 'digits (200 of 1797 images, seed 0)',
    'cifar10 (test, all 10000 images)'."""
    sub = d.get("subset")
    if sub:
        count = f"{sub['limit']} of {plural(sub['of'], 'image')}, seed {sub['seed']}"
    else:
        count = plural(d["count"], "image") if d["count"] == 1 else f"all {d['count']} images"
    split = "" if d.get("split") in (None, "all") else f"{d['split']}, "
    return f"{d['dataset']} ({split}{count})"


def _weights_words(w: dict | None, demo: dict | None = None) -> str:
    if demo is not None:
        return (f"synthetic demo: random (seed {w['seed']}), edited: "
                + (f"{plural(len(demo['positions']), 'planted artifact position')} {demo['positions']}"
                   if demo["artifacts"] else "no planted artifacts (the clean twin)")
                + f", parameters sha256 {demo['params_sha256'][:12]}...")
    if not w:
        return "n/a"
    if w.get("random"):
        return f"random (seed {w['seed']})"
    if w.get("format") == "transformers":
        return (f"{w['path']} (transformers checkpoint, {plural(len(w['files']), 'file')}, "
                f"sha256 {w['sha256'][:12]}...)")
    return f"{w['path']} (sha256 {w['sha256'][:12]}...)"


def _demo_markdown(demo: dict) -> list[str]:
    """The synthetic demo's summary section of report.md."""
    lines = ["## Summary: synthetic demo model", "", f"**{demo['label']}.** The numbers show how ITAE acts on "
             "planted artifacts; they say nothing about trained DINOv2 weights.", "",
             "| model | ACC % | NMI % | ARI % |", "|---|---:|---:|---:|"]
    lines += [f"| {row['description']} (`{row['run']}`) | {_pct(row['acc'])} | {_pct(row['nmi'])} | "
              f"{_pct(row['ari'])} |" for row in demo["rows"].values()]
    lines += [""] + [f"- {line.strip()}" for line in demo["summary"][len(demo["rows"]) + 1:]] + [""]
    return lines


def render_eval_markdown(r: dict) -> str:
    m, d, pre, km = r["model"], r["dataset"], r["preprocessing"], r["kmeans"]
    weights = _weights_words(m["weights"], m.get("demo"))
    title = r.get("title") or f"itae-eval: {m['name']} on {dataset_title(d)}"
    lines = [
        f"# {title}",
        "",
        f"Command: `itae-eval {' '.join(r['argv'])}`  ",
        f"Created: {r['created']}",
        "",
    ]
    if r.get("demo"):
        lines += _demo_markdown(r["demo"])
    lines += [
        "## Clustering (k-means on the final-norm CLS embedding)",
        "",
        "| run | backend | ACC % | NMI % | ARI % | embed s (wall) | backend s | img/s (backend) | cached |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, run in r["runs"].items():
        e, mt = run["embedding"], run["metrics"]
        ips = f"{e['images_per_s']:.1f}" if e.get("images_per_s") else "-"
        lines.append(
            f"| {name} | {run['backend']} | {_pct(mt['acc'])} | {_pct(mt['nmi'])} | {_pct(mt['ari'])} | "
            f"{e['seconds']:.1f} | {e['backend_seconds']:.1f} | {ips} | {'yes' if e['cached'] else 'no'} |"
        )
    dl = r["itae_minus_baseline"]
    lines += [
        "",
        f"ITAE - baseline (PyTorch): ACC {100 * dl['acc']:+.2f}, NMI {100 * dl['nmi']:+.2f}, ARI {100 * dl['ari']:+.2f} points.",
        "",
    ]
    if r["agreement"]:
        lines += [
            "## Backend agreement",
            "",
            "| comparison | cos mean | cos min | max abs | mean abs | ARI of assignments | matched assignment rate |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, a in r["agreement"].items():
            lines.append(
                f"| {name} | {a['cos_mean']:.7f} | {a['cos_min']:.7f} | {a['max_abs']:.3g} | {a['mean_abs']:.3g} | "
                f"{a['assignment_ari']:.5f} | {a['assignment_acc']:.5f} |"
            )
        lines.append("")
    lines += [
        "## Settings",
        "",
        f"- model: {m['name']}, image size {m['img_size']}"
        + (f", depth {m['depth']}" if "depth" in m else "")
        + f", weights {weights}",
        f"- data: {d['dataset']}, split {d['split']}, {plural(d['count'], 'image')}, "
        f"{plural(d['num_classes'], 'class', 'classes')}, root {d['root']}"
        + (f", labels {d['labels']}" if "labels" in d else "")
        + (f", a seeded random subset (seed {d['subset']['seed']}) of {plural(d['subset']['of'], 'image')}"
           if "subset" in d else ""),
        f"- preprocessing: {pre['description']}",
        f"- k-means: sklearn KMeans, k = {km['n_clusters'] or 'number of classes'}, n_init {km['n_init']}, seed {km['seed']}, "
        f"max_iter {km['max_iter']}, normalisation {km['normalize']}",
        "- metrics: ACC with Hungarian matching (scipy linear_sum_assignment), NMI (sklearn, arithmetic mean), ARI (sklearn)",
        f"- ITAE: `{json.dumps(r['itae'], sort_keys=True)}`",
        "",
        "## Timings",
        "",
        f"- load data {r['timings']['load_data_s']:.1f} s, build model {r['timings']['build_model_s']:.1f} s, "
        f"total {r['timings']['total_s']:.1f} s; k-means: "
        + ", ".join(f"{n} {run['kmeans']['seconds']:.1f} s" for n, run in r["runs"].items()),
        f"- environment: {json.dumps(r['environment'], sort_keys=True)}",
        "",
    ]
    if r["figures"]:
        lines += ["## Figures", ""]
        h = r.get("norm_histogram")
        if h:
            lines += [f"{h['file']}: {plural(h['lengths'], 'patch-token length')} ({h['norm_source']}, "
                      f"{h['norm_scope']} scope) from the {plural(h['images'], 'evaluated image')}.", ""]
        lines += [f"![{f}]({f})" for f in r["figures"]] + [""]
    return "\n".join(lines)


def eval_main(argv: list[str] | None = None) -> int:
    return _run_cli(eval_command, build_eval_parser(), argv)


# -------------------------------------------------------------------------------------- itae-calibrate


def build_calibrate_parser() -> argparse.ArgumentParser:
    p = make_parser(
        prog="itae-calibrate",
        description="Find ITAE's absolute threshold at the valley of the histogram of patch-token lengths in the last "
        "block (the norm source, scope and direction below), and save it with those settings as a settings file "
        "for --settings of itae-export, itae-patch and itae-eval. The histogram PNG is written in any case; "
        "without a valley (a unimodal histogram) no settings file is written and the exit status is 2.",
    )
    _add_model_args(p)
    _add_data_args(p, default_limit=1000)
    c = p.add_argument_group("calibration")
    c.add_argument("--out", required=True, metavar="FILE", help="settings JSON to write")
    c.add_argument("--plot", metavar="PNG", help="histogram figure (default: FILE with .png)")
    c.add_argument("--bins", type=int, default=None, metavar="N",
                   help="histogram bins (default: sqrt(number of lengths) clipped to 20..200)")
    c.add_argument("--smooth", type=float, default=2.0, metavar="SIGMA", help="Gaussian smoothing, in bins")
    c.add_argument(
        "--min-prominence",
        type=float,
        default=0.1,
        metavar="FRACTION",
        help="a mode counts if its prominence is >= this x the tallest peak",
    )
    c.add_argument("--force", action="store_true", help="overwrite existing outputs")
    add_itae_args(p, attenuation=False, thresholds=False)  # the threshold is what it computes
    for a in p._actions:
        if a.dest == "relative_stat":
            a.help = ("statistic of the relative rule, kept in the settings file (for itae-export/itae-eval "
                      "--relative-threshold later; default mean)")
        elif a.dest == "settings":
            a.help = "JSON settings file to start from (its threshold is replaced); flags override it"
    return p


def calibrate_command(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    if os.path.abspath(plot) == os.path.abspath(out):
        raise UsageError(f"--plot {plot} is the --out file; give the histogram another name (--plot FILE.png)")
    _check_demo_args(args)
    inputs = _input_files(args, "settings", "weights")
    with contextlib.ExitStack() as stack:
        # Both outputs are validated and claimed before any image is read.
        out_tx = stack.enter_context(OutputTransaction(out, inputs=inputs, force=args.force))
        plot_tx = stack.enter_context(OutputTransaction(plot, inputs=inputs, force=args.force, flag="--plot"))
        return _calibrate(args, argv, out_tx, plot_tx)


def _calibrate(args, argv, out_tx: OutputTransaction, plot_tx: OutputTransaction) -> int:
    """Load the data, build the model, collect the patch lengths, fit the valley and draw it, write
    the settings."""
    from ..calibrate import calibrated_config, length_summary, settings_text
    from ..errors import DataError

    cfg = itae_config_from_args(args)
    ds, pre, _ = _load_data(args)
    embedder, model_ident, _ = _build(args)
    lengths, info = _calibration_lengths(args, embedder, ds, pre, cfg)
    res = _fit_and_plot(args, lengths, ds, cfg, plot_tx)
    if not res.found:
        raise DataError(f"{res.message} (calibration set: {dataset_title(ds.describe())}); no settings written")
    calibration = {
        "command": "itae-calibrate " + " ".join(argv),
        "method": res.method,
        "threshold": res.threshold,
        "result": res.to_dict(),
        "lengths": length_summary(lengths, res.threshold, cfg.direction),
        "model": model_ident,
        "dataset": ds.describe(),
        "preprocessing": pre.to_dict(),
        "num_prefix_tokens": info["num_prefix_tokens"],
        "grid": info["grid"],
        "seconds": info["seconds"],
        "histogram_png": str(plot_tx.dest),
    }
    staged = out_tx.stage_path()
    staged.write_text(settings_text(calibrated_config(cfg, res.threshold), calibration))
    out_tx.add(staged)
    out_tx.commit()
    frac = calibration["lengths"].get("fraction_flagged", 0.0)
    print(f"{res.message}; {100 * frac:.3f}% of patch tokens flagged; settings: {out_tx.dest}", file=sys.stderr)
    return 0


def _calibration_lengths(args, embedder, ds, pre, cfg) -> tuple[np.ndarray, dict]:
    """Every calibration image's patch lengths; the bar counts the images whose lengths are collected."""
    from ..calibrate import check_lengths, collect_patch_lengths
    from ..data import iter_batches

    batches = (x for x, _ in iter_batches(ds, pre, args.batch_size, progress=False, workers=args.workers))
    lengths, info = collect_patch_lengths(embedder, batches, cfg, progress=not args.no_progress, total=len(ds),
                                          desc="calibration")
    check_lengths(lengths, dataset_title(ds.describe()))
    return lengths, info


def _fit_and_plot(args, lengths: np.ndarray, ds, cfg, plot_tx: OutputTransaction):
    """The valley (calibrate.find_valley_threshold) and the committed histogram PNG (drawn even without
    a valley: it shows why)."""
    from ..calibrate import find_valley_threshold
    from ..viz import plot_norm_histogram

    _status(args, f"fitting the valley of {plural(lengths.size, 'length')} from {plural(len(ds), 'image')}...")
    res = find_valley_threshold(lengths, bins=args.bins, smooth=args.smooth, min_prominence=args.min_prominence)
    _status(args, "drawing the histogram...")
    title = (f"{_model_words(args)}: {cfg.norm_source} lengths of patch tokens ({cfg.norm_scope} scope), "
             f"last block\n{dataset_title(ds.describe())}, {plural(lengths.size, 'length')}")
    plot_norm_histogram(lengths, plot_tx.dest, threshold=res.threshold, title=title,
                        note=None if res.found else "no valley found", tx=plot_tx)
    plot_tx.commit()
    print(f"histogram: {plot_tx.dest}", file=sys.stderr)
    return res


def calibrate_main(argv: list[str] | None = None) -> int:
    return _run_cli(calibrate_command, build_calibrate_parser(), argv)
