"""The CPU race of tools/bench.py (`--cpu-race`): every CPU way to run the same ITAE ONNX, timed in
one interleaved run per model and batch, with the fp32 / bf16 / int8 matrix-multiply peaks of this
CPU measured in the same run and each path's fraction of its own peak.

Paths (name: what runs):
    torch_fp32         PyTorch eager, the ITAE reference (fp32)
    torch_bf16         the same under torch.autocast(bfloat16)
    ort_fp32           ONNX Runtime, the ITAE ONNX
    ort_int8           ONNX Runtime, our --fast-path int8 (dynamic int8, final block fp32, optimized graph)
    ov_fp32/bf16/int8  OpenVINO, our IR (itae-export --out *.xml --precision ...) with its compile_config
    peer_ov_bf16       OpenVINO on the plain ITAE ONNX with only INFERENCE_PRECISION_HINT=bf16
    peer_ov_int8       nncf.quantize defaults (TRANSFORMER, the same calibration images, itae/.* ignored),
                       compiled with OpenVINO's defaults
    ort_fp32_noitae, ov_bf16_noitae   the unpatched ONNX (ITAE overhead)

Accuracy: cosine min to torch_fp32 on the timed batch, and the centred cosine min on --race-digits
digits images (itae_export.fastpath.centered_cosine). Not a test: numbers depend on the machine and
its load; race only on a quiet machine (load average is printed at start and end).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PEAK_CLASS = {"torch_fp32": "fp32", "ort_fp32": "fp32", "ov_fp32": "fp32", "ort_fp32_noitae": "fp32",
              "torch_bf16": "bf16", "ov_bf16": "bf16", "peer_ov_bf16": "bf16", "ov_bf16_noitae": "bf16",
              "ort_int8": "int8", "ov_int8": "int8", "peer_ov_int8": "int8"}
TARGETS = (("ov_bf16", "peer_ov_bf16", 1.05, "accurate default <= 1.05x the bf16 peer"),
           ("ov_int8", "peer_ov_int8", 0.9, "fastest artifact <= 0.9x the int8 peer"),
           ("ort_fp32", "ort_fp32_noitae", 1.02, "ITAE overhead on ONNX Runtime <= 1.02x"),
           ("ov_bf16", "ov_bf16_noitae", 1.02, "ITAE overhead on OpenVINO bf16 <= 1.02x"))


# ------------------------------------------------------------------------------------ peaks
def _best_rate(fn: Callable[[], Any], ops: float, tries: int) -> float:
    fn()
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return ops / best / 1e9


def _ov_matmul(n: int, threads: int, hint: str, int8: bool):
    """A one-MatMul OpenVINO model (FakeQuantize'd inputs for int8: the form NNCF writes)."""
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([n, n], ov.Type.f32)
    w = ops.constant(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    x, y = a, w
    if int8:
        lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        x = ops.fake_quantize(a, lo, hi, lo, hi, 256)
        y = ops.fake_quantize(w, lo, hi, lo, hi, 255)
    model = ov.Model([ops.matmul(x, y, False, True)], [a])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                      "INFERENCE_NUM_THREADS": str(threads)})
    req, data = compiled.create_infer_request(), np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    return lambda: req.infer({0: data}, share_inputs=True)


def matmul_peaks(n: int, tries: int, threads: int) -> dict[str, dict[str, float]]:
    """Best-of-`tries` n x n matmul rates (2 n^3 ops) in GFLOP/s (GOP/s for int8): fp32 and bf16
    through torch and OpenVINO, int8 through torch._int_mm and an OpenVINO FakeQuantize MatMul."""
    import torch

    ops = 2.0 * n**3
    a, b = torch.randn(n, n), torch.randn(n, n)
    res: dict[str, dict[str, float]] = {"fp32": {}, "bf16": {}, "int8": {}}
    res["fp32"]["torch"] = _best_rate(lambda: torch.matmul(a, b), ops, tries)
    ab, bb = a.bfloat16(), b.bfloat16()
    res["bf16"]["torch"] = _best_rate(lambda: torch.matmul(ab, bb), ops, tries)
    ai, bi = torch.randint(-128, 127, (n, n), dtype=torch.int8), torch.randint(-128, 127, (n, n), dtype=torch.int8)
    try:
        res["int8"]["torch"] = _best_rate(lambda: torch._int_mm(ai, bi), ops, tries)
    except RuntimeError:  # no CPU kernel in this torch build
        pass
    for cls, hint, int8 in (("fp32", "f32", False), ("bf16", "bf16", False), ("int8", "bf16", True)):
        res[cls]["openvino"] = _best_rate(_ov_matmul(n, threads, hint, int8), ops, tries)
    for d in res.values():
        d["best"] = max(d.values())
    return res


# ------------------------------------------------------------------------------------ the paths
def _ov_callable(compiled) -> Callable[[np.ndarray], np.ndarray]:
    req = compiled.create_infer_request()
    out = compiled.output(0)
    return lambda x: req.infer({0: x}, share_inputs=True)[out]


def _ort_callable(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    from itae_export.runtime import OrtRunner

    return OrtRunner(path, threads=threads).run


def _torch_callables(ref) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    import torch

    def fp32(x):
        with torch.inference_mode():
            return ref(torch.from_numpy(x)).numpy()

    def bf16(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return ref(torch.from_numpy(x)).float().numpy()

    return {"torch_fp32": fp32, "torch_bf16": bf16}


def _our_ir(onnx_path: Path, prec: str, img: int, calib_n: int, threads: int, log) -> tuple[Callable, float]:
    import openvino as ov

    from itae_export.openvino_target import OpenVinoOptions, compile_config, convert_to_ir

    xml = onnx_path.with_name(f"{onnx_path.stem}.{prec}.xml")
    t = time.perf_counter()
    convert_to_ir(onnx_path, xml, OpenVinoOptions(precision=prec, calibration_images=calib_n), img)
    build = time.perf_counter() - t
    log(f"  {xml.name}: built in {build:.1f} s")
    core = ov.Core()
    cfg = {**compile_config(prec), "INFERENCE_NUM_THREADS": str(threads)}
    return _ov_callable(core.compile_model(core.read_model(str(xml)), "CPU", cfg)), build


def _peers(itae: Path, calib: np.ndarray, threads: int) -> tuple[dict[str, Callable], dict[str, float]]:
    """What a user does without this project, on the plain ITAE ONNX."""
    import nncf
    import openvino as ov

    core = ov.Core()
    peers = {"peer_ov_bf16": _ov_callable(core.compile_model(
        core.read_model(str(itae)), "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": str(threads)}))}
    t = time.perf_counter()
    q = nncf.quantize(ov.convert_model(str(itae)), nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]),
                      model_type=nncf.ModelType.TRANSFORMER, ignored_scope=nncf.IgnoredScope(patterns=["itae/.*"]),
                      subset_size=len(calib))
    seconds = {"peer_ov_int8_quantize_s": time.perf_counter() - t}
    peers["peer_ov_int8"] = _ov_callable(core.compile_model(q, "CPU", {"INFERENCE_NUM_THREADS": str(threads)}))
    return peers, seconds


def _as_shipped(onnx_path: Path) -> Path:
    """The graph with the export's optimizations (graph_passes.optimize), as itae-export ships it,
    beside `onnx_path` and sharing its external data."""
    import onnx

    from graph_passes.optimize import optimize

    out = onnx_path.with_name(f"{onnx_path.stem}.optimized.onnx")
    onnx.save_model(optimize(onnx.load(str(onnx_path), load_external_data=False))[0], str(out))
    return out


def build_paths(emb, ref, base: Path, itae: Path, args, threads: int, log) -> tuple[dict[str, Callable], dict]:
    """Every racer as x -> embeddings, and the seconds each took to build."""
    import nncf

    from itae_export.fastpath import digits_eval_inputs, quantize_int8

    nncf.set_log_level(40)
    img, n_cal = args.img_size, args.calibration_images
    calib = digits_eval_inputs(img, n_cal, seed=1)[0]
    paths = _torch_callables(ref)
    built: dict[str, float] = {}
    paths["ort_fp32"], paths["ort_fp32_noitae"] = _ort_callable(itae, threads), _ort_callable(base, threads)
    t = time.perf_counter()
    # our int8 fast path as itae-export ships it: from the optimized graph
    q = quantize_int8(_as_shipped(itae), itae.with_name(itae.stem + ".int8.onnx"))
    built["ort_int8_quantize_s"] = time.perf_counter() - t
    paths["ort_int8"] = _ort_callable(q, threads)
    for prec in ("fp32", "bf16", "int8"):
        paths[f"ov_{prec}"], built[f"ov_{prec}_build_s"] = _our_ir(itae, prec, img, n_cal, threads, log)
    paths["ov_bf16_noitae"], built["ov_bf16_noitae_build_s"] = _our_ir(base, "bf16", img, n_cal, threads, log)
    peers, secs = _peers(itae, calib, threads)
    return {**paths, **peers}, {**built, **secs}


# ------------------------------------------------------------------------------------ the race
def race_rows(paths: dict[str, Callable], emb, flops: float, peaks: dict, args, time_interleaved) -> list[dict]:
    from itae_export.fastpath import centered_cosine, digits_eval_inputs
    from itae_export.parity import cosine_rows
    from itae_export.runtime import run_batched

    digits = digits_eval_inputs(args.img_size, args.race_digits, seed=0)[0]
    ref_digits = run_batched(paths["torch_fp32"], digits, batch=8).astype(np.float64)
    centred = {k: float(centered_cosine(ref_digits, run_batched(fn, digits, batch=8).astype(np.float64)).min())
               for k, fn in paths.items()}
    rows, rng = [], np.random.default_rng(0)
    for bs in args.batch_list:
        x = rng.standard_normal((bs, 3, args.img_size, args.img_size), dtype=np.float32)
        cases = {k: (lambda fn=fn, x=x: fn(x)) for k, fn in paths.items()}
        timed = time_interleaved(cases, args.warmup, args.repeats)
        y_ref = paths["torch_fp32"](x)
        row: dict[str, Any] = {"batch": bs, "paths": {}}
        base_ms = timed["ort_fp32"]["median_ms"]
        for k in paths:
            ms = timed[k]["median_ms"]
            rate = flops * bs / (ms / 1e3) / 1e9  # GFLOP/s (GOP/s), as the peaks
            row["paths"][k] = {**timed[k], "vs_ort_fp32": ms / base_ms,
                               "cos_min": float(cosine_rows(y_ref, np.asarray(paths[k](x))).min()),
                               "centred_cos_min_digits": centred[k], "gflops": rate,
                               "peak": PEAK_CLASS.get(k), "fraction_of_peak": rate / peaks[PEAK_CLASS[k]]["best"]
                               if k in PEAK_CLASS else None}
        row["targets"] = [{"what": what, "ratio": timed[a]["median_ms"] / timed[b]["median_ms"], "bound": bound,
                           "met": timed[a]["median_ms"] / timed[b]["median_ms"] <= bound}
                          for a, b, bound, what in TARGETS]
        rows.append(row)
    return rows


def race_model(name: str, args, work: Path, log, time_interleaved, export_pair) -> dict[str, Any]:
    """Export (child processes, as bench.py does), build every path, race them per batch size."""
    from graph_passes.config import ITAEConfig
    from itae_export.models import build_model
    from itae_export.reference import ITAEReference

    threads = args.threads or os.cpu_count() or 1
    base, itae = export_pair(name)
    emb = build_model(name, random_weights=True, img_size=args.img_size, depth=args.depth)
    ref = ITAEReference(emb, ITAEConfig()).eval()
    from bench import model_flops_per_image

    flops = model_flops_per_image(emb)["gflops"] * 1e9
    log(f"[{name}] building the racers ({threads} threads)")
    paths, built = build_paths(emb, ref, base, itae, args, threads, log)
    log(f"[{name}] racing {', '.join(paths)} interleaved")
    return {"model": name, "depth": len(emb.vit.blocks), "threads": threads, "build_seconds": built,
            "flops_per_image": flops, "rows": race_rows(paths, emb, flops, args.peaks, args, time_interleaved)}


def format_race(report: dict[str, Any]) -> str:
    pk = report["peaks"]
    lines = ["", f"CPU race (one interleaved run; load avg start {report['machine']['loadavg_at_start']}, end "
             f"{report['loadavg_at_end']}); matmul peaks GFLOP/s or GOP/s: " + ", ".join(
                 f"{c} {d['best']:.0f} ({', '.join(f'{k} {v:.0f}' for k, v in d.items() if k != 'best')})"
                 for c, d in pk.items())]
    for mod in report["cpu_race"]:
        for row in mod["rows"]:
            lines += ["", f"{mod['model']} (depth {mod['depth']}) batch {row['batch']}, {mod['threads']} threads",
                      f"  {'path':<17}{'ms':>9}{'vs ORT fp32':>12}{'cos min':>11}{'centred':>9}{'% peak':>8}"]
            for k, p in row["paths"].items():
                frac = f"{100 * p['fraction_of_peak']:>7.0f}%" if p["fraction_of_peak"] is not None else f"{'':>8}"
                lines.append(f"  {k:<17}{p['median_ms']:>9.1f}{p['vs_ort_fp32']:>12.3f}{p['cos_min']:>11.6f}"
                             f"{p['centred_cos_min_digits']:>9.4f}{frac}")
            lines += [f"  target: {t['what']}: {t['ratio']:.3f} ({'met' if t['met'] else 'MISSED'})"
                      for t in row["targets"]]
    return "\n".join(lines)
