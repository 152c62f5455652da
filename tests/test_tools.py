"""The benchmark scripts in tools/ run end to end (tiny settings) and write the JSON they promise.
Their timings are not asserted: they are measurements, not tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_smoke_with_fast_paths(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run([str(TOOLS / "bench.py"), "--smoke", "--fast-path", "--out", str(out)])
    rep = json.loads(out.read_text())
    (mod,) = rep["models"]
    (row,) = mod["rows"]
    for k in ("torch_fp32", "torch_itae", "torch_bf16", "ort_fp32", "ort_itae"):
        assert row[k]["median_ms"] > 0, k
    assert rep["gemm"]["gflops"] > 0 and 0 < row["gemm_fraction"]["ort_fp32"]
    fp = mod["fast_path_int8"]
    assert fp["fused_blocks"] == 1  # smoke model: depth 2, the final block stays unfused
    (frow,) = fp["rows"]
    assert frow["cos_min_vs_torch_itae_fp32"] > 0.99 and frow["fused_cos_min_vs_torch_itae_fp32"] > 0.99999
    assert "fast paths" in proc.stdout and "GEMM peak" in proc.stdout
    # refuses to overwrite its report
    again = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--smoke", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith("bench.py: error: ") and "already exists" in again.stderr


def test_bench_fusion_tiny(tmp_path):
    out = tmp_path / "fusion.json"
    _run([str(TOOLS / "bench_fusion.py"), "--model", "dinov2_vits14", "--depth", "3", "--img-size", "56",
          "--batch", "1", "--repeats", "1", "--rows", "--k-transpose", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert rep["fused_blocks"] == 2
    assert rep["parity"]["fp32+fused~fp32"]["max_abs"] < 1e-4
    base = {"fp32", "fp32+fused", "int8", "int8+fused", "fp32+kt", "int8+kt"}
    assert set(rep["median_ms"]) == base | {f"{k}+rows" for k in base}
    assert rep["parity"]["fp32+rows~fp32"]["max_abs"] < 1e-5  # the pruning is exact
    assert rep["parity"]["fp32+kt~fp32"]["max_abs"] < 1e-4  # k^T: the same up to rounding
    assert len(rep["load_average"]) == 3
