#!/usr/bin/env python3
"""ONNX Runtime CPU latency with and without graph_passes.fuse_attention (non-final attention
blocks as com.microsoft.MultiHeadAttention), fp32 and, unless --no-int8, the int8 fast path
(fused before quantizing; MultiHeadAttention nodes are not quantized).

One export of a random-weight DINOv2 (default ViT-L/14, 224 px, batch 8, 2 threads), variants timed
interleaved (round robin, one call of each variant per round), medians reported with the ratio
fused/unfused and the cosine / max abs difference of the fused outputs to the unfused ones.
Not a test: numbers depend on the machine and its load.

With --rows, each variant also runs output-row pruned (graph_passes.output_rows, what itae-export
applies by default: the final block's projection, MLP and norm on the CLS row only), "+rows".
With --k-transpose, fp32 and int8 also run with k^T as one Transpose (graph_passes.k_transpose,
also a default of itae-export), "+kt".

    python tools/bench_fusion.py
    python tools/bench_fusion.py --rows --no-int8
    python tools/bench_fusion.py --model dinov2_vits14 --depth 4 --img-size 112 --batch 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    from itae_export.parity import cosine_rows

    return float(cosine_rows(a, b).min())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dinov2_vitl14")
    ap.add_argument("--depth", type=int, default=None, help="keep only the first N blocks (smaller runs)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    ap.add_argument("--no-int8", action="store_true", help="fp32 only")
    ap.add_argument("--rows", action="store_true", help="also race every variant output-row pruned")
    ap.add_argument("--k-transpose", action="store_true", help="also race fp32 and int8 with k^T as one Transpose")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)

    import onnx
    import torch

    from graph_passes.fuse_attention import fuse_attention
    from itae_export.models import build_model
    from itae_export.onnx_export import export_onnx

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    t0 = time.perf_counter()
    model = build_model(args.model, random_weights=True, img_size=args.img_size, depth=args.depth)
    base = export_onnx(model, work / "base.onnx", img_size=args.img_size, exporter=args.exporter)
    del model
    print(f"export ({args.exporter}): {time.perf_counter() - t0:.1f} s -> {base}", flush=True)

    graph = onnx.load(str(base), load_external_data=False)
    t0 = time.perf_counter()
    fused_graph, res = fuse_attention(graph)
    print(f"fuse: {time.perf_counter() - t0:.2f} s; {res.summary()}", flush=True)
    fused = work / "fused.onnx"  # same folder: references the same external data file
    onnx.save_model(fused_graph, str(fused))
    paths = {"fp32": base, "fp32+fused": fused}

    if not args.no_int8:
        from graph_passes.final_block import final_block_nodes
        from itae_export.fastpath import quantize_int8

        t0 = time.perf_counter()
        paths["int8"] = quantize_int8(base, work / "int8.onnx", exclude=final_block_nodes(graph))
        paths["int8+fused"] = quantize_int8(fused, work / "int8_fused.onnx", exclude=final_block_nodes(fused_graph))
        print(f"quantize x2: {time.perf_counter() - t0:.1f} s", flush=True)
        q = onnx.load(str(paths["int8+fused"]), load_external_data=False)
        n_mha = sum(n.op_type == "MultiHeadAttention" for n in q.graph.node)
        print(f"int8+fused graph keeps {n_mha} MultiHeadAttention nodes", flush=True)
    if args.k_transpose:
        from graph_passes.k_transpose import canonical_k_transpose

        kt_graph, kt = canonical_k_transpose(graph)
        print(f"k_transpose: {kt.summary().splitlines()[0]}", flush=True)
        paths["fp32+kt"] = work / "kt.onnx"
        onnx.save_model(kt_graph, str(paths["fp32+kt"]))
        if not args.no_int8:
            paths["int8+kt"] = quantize_int8(paths["fp32+kt"], work / "int8_kt.onnx",
                                             exclude=final_block_nodes(kt_graph))
    del graph, fused_graph
    if args.rows:
        from graph_passes.output_rows import prune_output_rows

        for k in list(paths):
            pruned, rows = prune_output_rows(onnx.load(str(paths[k]), load_external_data=False))
            paths[f"{k}+rows"] = work / f"{paths[k].stem}.rows.onnx"
            onnx.save_model(pruned, str(paths[f"{k}+rows"]))
        print(f"rows: {rows.summary()}", flush=True)

    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.img_size, args.img_size)).astype(np.float32)
    sessions = {k: _session(p, args.threads) for k, p in paths.items()}
    outs: dict[str, np.ndarray] = {}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    load0 = os.getloadavg()[0]
    for r in range(args.repeats + 1):  # round 0 is the warm-up
        for k, s in sessions.items():
            time.sleep(0.2)
            t = time.perf_counter()
            y = s.run(None, {"pixel_values": x})[0]
            dt = time.perf_counter() - t
            if r == 0:
                outs[k] = y
            else:
                times[k].append(dt)
        print(f"round {r}: " + ", ".join(f"{k} {times[k][-1] * 1e3:.0f} ms" for k in sessions if r), flush=True)

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    report = {"model": args.model, "depth": args.depth, "img_size": args.img_size, "batch": args.batch,
              "threads": args.threads, "exporter": args.exporter, "repeats": args.repeats,
              "fused_blocks": res.num_fused, "median_ms": med, "min_ms": {k: min(v) * 1e3 for k, v in times.items()}}
    report["load_average"] = list(os.getloadavg())
    print(f"\n{args.model} depth={args.depth or 'full'} {args.img_size}px batch {args.batch}, "
          f"{args.threads} threads, {args.repeats} interleaved rounds; fused {res.num_fused} blocks; "
          f"load average {load0:.2f} at the start, {report['load_average'][0]:.2f} at the end")
    print(f"{'variant':<16} {'median ms':>10} {'min ms':>9}")
    for k in sessions:
        print(f"{k:<16} {med[k]:>10.1f} {report['min_ms'][k]:>9.1f}")
    pairs = [("fp32+fused", "fp32")] + ([("int8+fused", "int8"), ("int8+fused", "fp32")] if "int8" in med else [])
    pairs += [(f"{k}+rows", k) for k in list(med) if f"{k}+rows" in med]
    pairs += [(f"{k}+kt", k) for k in ("fp32", "int8") if f"{k}+kt" in med]
    report["ratios"] = {}
    for a, b in pairs:
        ratio = med[a] / med[b]
        report["ratios"][f"{a}/{b}"] = ratio
        print(f"ratio {a} / {b}: {ratio:.3f}  (cosine min {_cos(outs[a], outs[b]):.7f}, "
              f"max abs {np.abs(outs[a] - outs[b]).max():.2e})")
    report["parity"] = {f"{a}~{b}": {"cos_min": _cos(outs[a], outs[b]), "max_abs": float(np.abs(outs[a] - outs[b]).max())}
                        for a, b in pairs}
    if args.out:
        from itae_export.outputs import write_text_atomic

        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n", force=True)
    for p in work.iterdir():
        p.unlink()
    work.rmdir()
    return 0


if __name__ == "__main__":
    from itae_export.cli.common import run_tool

    sys.exit(run_tool("bench_fusion.py", main))
