#!/usr/bin/env python3
"""Peak memory and time of graph_passes.int8.quantize_dynamic_int8 (weight streaming) vs
onnxruntime.quantization.quantize_dynamic on one ONNX file, plus an interleaved ONNX Runtime
latency comparison of the two quantized models (on the same file or a smaller --latency-model).

Each quantizer runs in a child of a fresh wrapper process, so ru_maxrss of the wrapper's children
(resource.getrusage(RUSAGE_CHILDREN)) is the peak of that one run. Not a test: numbers depend on
the machine.

    python tools/measure_int8.py /tmp/fg/g.fp32.onnx --latency-model build/s.onnx --batch 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_export import fresh_dir, write_report  # noqa: E402 - sibling tool, found through the line above
from measure_export import measure as measure_step  # noqa: E402

_CHILD = r"""
import json, sys, time
from pathlib import Path
import onnx
from graph_passes.final_block import final_block_nodes
which, src, dst, per_channel = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
g = onnx.load(src, load_external_data=False)
exclude = final_block_nodes(g)
external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.graph.initializer)
del g
t = time.perf_counter()
if which == "ours":
    from graph_passes.int8 import quantize_dynamic_int8
    r = quantize_dynamic_int8(src, dst, exclude=exclude, per_channel=per_channel)
    n = len(r.quantized)
else:
    import logging
    logging.disable(logging.WARNING)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                     per_channel=per_channel, nodes_to_exclude=sorted(exclude), use_external_data_format=external)
    n = sum(1 for x in onnx.load(dst, load_external_data=False).graph.node if x.op_type == "MatMulInteger")
print(json.dumps({"seconds_in_call": time.perf_counter() - t, "matmuls_quantized": n}))
"""


def measure(which: str, src: Path, dst: Path, per_channel: bool) -> dict:
    cmd = [sys.executable, "-c", _CHILD, which, str(src), str(dst), "1" if per_channel else "0"]
    res = measure_step(cmd, what=f"{which} quantizer on {src}")
    res.update(json.loads(res.pop("stdout").strip().splitlines()[-1]))
    res.pop("stderr")
    return res


def latency(a: Path, b: Path, batch: int, runs: int, threads: int) -> dict:
    """Interleaved timing (a, b, a, b, ...) so drift and noisy neighbours hit both alike."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sa = ort.InferenceSession(str(a), so, providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(str(b), so, providers=["CPUExecutionProvider"])
    inp = sa.get_inputs()[0]
    h, w = (d if isinstance(d, int) else 224 for d in inp.shape[2:])
    x = np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(np.float32)
    ya, yb = sa.run(None, {inp.name: x})[0], sb.run(None, {inp.name: x})[0]
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(runs):
        for s, ts in ((sa, ta), (sb, tb)):
            t = time.perf_counter()
            s.run(None, {inp.name: x})
            ts.append(time.perf_counter() - t)
    return {"batch": batch, "img": [h, w], "runs": runs, "ours_min_ms": 1e3 * min(ta), "ort_min_ms": 1e3 * min(tb),
            "ours_median_ms": 1e3 * float(np.median(ta)), "ort_median_ms": 1e3 * float(np.median(tb)),
            "ratio_min_ours_over_ort": min(ta) / min(tb), "max_abs_output_diff": float(np.abs(ya - yb).max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="fp32 ONNX to quantize (external data beside it is fine)")
    p.add_argument("--latency-model", default=None, help="ONNX to time both quantized versions on "
                   "(default: MODEL; use a small one such as ViT-S for big models)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT default)")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default per channel)")
    p.add_argument("--out-dir", default="build/measure_int8")
    p.add_argument("--json", default=None, help="where to write the JSON (default OUT_DIR/measure_int8.json)")
    p.add_argument("--keep", action="store_true", help="keep the quantized models")
    args = p.parse_args()
    src = Path(args.model)
    if not src.is_file():
        raise SystemExit(f"{src} not found; pass an fp32 .onnx file")
    out = fresh_dir(args.out_dir)
    pc = not args.per_tensor
    rows = {}
    for which in ("ours", "ort"):
        print(f"quantizing {src} with {which} ...", flush=True)
        rows[which] = measure(which, src, out / f"{which}.onnx", pc)
        print(f"  {rows[which]['seconds']:.1f} s, peak {rows[which]['peak_bytes'] / 1e9:.2f} GB", flush=True)
    lat_src = Path(args.latency_model) if args.latency_model else src
    if lat_src != src:
        for which in ("ours", "ort"):
            measure(which, lat_src, out / f"lat_{which}.onnx", pc)
        la, lb = out / "lat_ours.onnx", out / "lat_ort.onnx"
    else:
        la, lb = out / "ours.onnx", out / "ort.onnx"
    print(f"timing {la.name} vs {lb.name} (batch {args.batch}) ...", flush=True)
    lat = latency(la, lb, args.batch, args.runs, args.threads)
    print("\n| quantizer | time (s) | peak memory (GB) | MatMuls quantized |\n|---|---:|---:|---:|")
    for which, r in rows.items():
        print(f"| {which} | {r['seconds']:.1f} | {r['peak_bytes'] / 1e9:.2f} | {r['matmuls_quantized']} |")
    print(f"\nlatency on {lat_src.name}, batch {lat['batch']}: ours {lat['ours_min_ms']:.1f} ms, "
          f"ORT-quantized {lat['ort_min_ms']:.1f} ms (min of {lat['runs']}), ratio {lat['ratio_min_ours_over_ort']:.3f}, "
          f"max |output diff| {lat['max_abs_output_diff']:.3g}")
    result = {"model": str(src), "per_channel": pc, "quantize": rows, "latency_model": str(lat_src),
              "latency": lat, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_report(result, args.json, out, "measure_int8.json", args.keep)
    return 0


if __name__ == "__main__":
    from itae_export.cli.common import run_tool

    sys.exit(run_tool("measure_int8.py", main))
