#!/usr/bin/env python3
"""The cost of a dynamic-size graph: ONNX Runtime CPU latency of `--dynamic-size` vs the fixed-size
export at the same size (default 224 px), both with ITAE, same random weights, timed interleaved
(round robin: one call of each graph per round) so that load from other processes hits both alike.
Also prints the dynamic graph's latency at other sizes and the outputs' agreement at 224.

Not a test: numbers depend on the machine and its load (the load average is printed; race only on
a quiet machine).

    python tools/bench_dynamic.py                      # ViT-S/14 and ViT-L/14, batch 1 and 8
    python tools/bench_dynamic.py --models dinov2_vits14 --depth 2 --repeats 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
for p in (HERE.parent, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench import machine_info, ort_session, time_interleaved  # noqa: E402 - tools/bench.py


def export_pair(model: str, work: Path, img_size: int, depth: int | None) -> tuple[Path, Path]:
    import itae_export

    fixed = itae_export.export(model, work / f"{model}-fixed.onnx", random_weights=True, img_size=img_size,
                               depth=depth, validate=False)
    dynamic = itae_export.export(model, work / f"{model}-dynamic.onnx", random_weights=True, img_size=img_size,
                                 depth=depth, validate=False, dynamic_size=True)
    return fixed.onnx, dynamic.onnx


def bench_model(model: str, args: argparse.Namespace, work: Path) -> dict:
    from itae_export.parity import compare

    fixed_path, dyn_path = export_pair(model, work, args.img_size, args.depth)
    fixed, dyn = ort_session(fixed_path, args.threads), ort_session(dyn_path, args.threads)
    out: dict = {"model": model, "depth": args.depth, "img_size": args.img_size, "batches": {}}
    rng = np.random.default_rng(0)
    for batch in args.batches:
        x = rng.standard_normal((batch, 3, args.img_size, args.img_size)).astype(np.float32)
        agree = compare(fixed.run(None, {"pixel_values": x})[0], dyn.run(None, {"pixel_values": x})[0])
        t = time_interleaved({"fixed": lambda x=x: fixed.run(None, {"pixel_values": x}),
                              "dynamic": lambda x=x: dyn.run(None, {"pixel_values": x})}, args.warmup, args.repeats)
        ratio = t["dynamic"]["median_ms"] / t["fixed"]["median_ms"]
        out["batches"][batch] = {"fixed_ms": t["fixed"]["median_ms"], "dynamic_ms": t["dynamic"]["median_ms"],
                                 "ratio": ratio, "max_abs": agree.max_abs, "cos_min": agree.cos_min}
        print(f"{model} b{batch} @{args.img_size}: fixed {t['fixed']['median_ms']:.1f} ms, dynamic "
              f"{t['dynamic']['median_ms']:.1f} ms, ratio {ratio:.3f} (outputs: {agree})", flush=True)
    others = {}
    for size in args.other_sizes:
        x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        others[size] = time_interleaved({"d": lambda x=x: dyn.run(None, {"pixel_values": x})}, 1,
                                        max(2, args.repeats // 2))["d"]["median_ms"]
        print(f"{model} b1 @{size}: dynamic {others[size]:.1f} ms", flush=True)
    out["dynamic_other_sizes_ms"] = others
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["dinov2_vits14", "dinov2_vitl14"])
    ap.add_argument("--depth", type=int, default=None, help="keep only the first N blocks (smoke runs)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--other-sizes", type=int, nargs="*", default=[112, 518])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    report = {"machine": machine_info(), "results": []}
    print(f"load average at start: {report['machine']['loadavg_at_start']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-dynamic-") as d:
        for model in args.models:
            report["results"].append(bench_model(model, args, Path(d)))
    report["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"load average at end: {report['loadavg_at_end']}")
    print("\n| model | batch | fixed (ms) | dynamic (ms) | dynamic / fixed |\n|---|---:|---:|---:|---:|")
    for r in report["results"]:
        for b, v in r["batches"].items():
            print(f"| {r['model']} | {b} | {v['fixed_ms']:.1f} | {v['dynamic_ms']:.1f} | {v['ratio']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    from itae_export.cli.common import run_tool

    sys.exit(run_tool("bench_dynamic.py", main))
