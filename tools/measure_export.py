#!/usr/bin/env python3
"""Measure the export spine on a real model size: `itae-export` (time, peak memory) and
`itae-patch` on an ONNX with external weights (time, peak memory).

Each step runs as a child of a fresh wrapper process, so ru_maxrss of the children is the peak
of that one step. Prints a table and writes JSON. Not a test: numbers depend on the machine.

    python tools/measure_export.py --model dinov2_vitl14 --out-dir build/measure
    python tools/measure_export.py --model dinov2_vitl14 --dynamic   # + the --dynamic-size export
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def measure(cmd: list[str], what: str | None = None) -> dict:
    """Run cmd in a wrapper process that has it as its only child; return seconds and peak RSS (and
    the child's stdout/stderr tails). `what` names the step in the failure message."""
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print(json.dumps({'rc': r.returncode, 'seconds': dt, 'peak_bytes': peak, 'stdout': r.stdout[-3000:], "
        "'stderr': r.stderr[-3000:]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        head = f"{what} failed:" if what else f"step failed: {' '.join(cmd)}"
        raise SystemExit(f"{head}\n{res['stderr']}")
    return res


def fresh_dir(path: str | Path) -> Path:
    """An empty output folder (a previous run's files are removed)."""
    out = Path(path)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def write_report(result: dict, json_path: str | None, out: Path, default_name: str, keep: bool) -> Path:
    """Write the JSON report (default OUT/default_name) and, unless keep, delete the other outputs."""
    jp = Path(json_path) if json_path else out / default_name
    jp.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {jp}")
    if not keep:
        for f in out.iterdir():
            if f != jp:
                f.unlink()
    return jp


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dinov2_vitl14")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    p.add_argument("--out-dir", default="build/measure")
    p.add_argument("--json", default=None, help="where to write the JSON (default OUT_DIR/measure_export.json)")
    p.add_argument("--keep", action="store_true", help="keep the ONNX files")
    p.add_argument("--dynamic", action="store_true",
                   help="also measure the --dynamic-size export (112-518 px, parity at its four sizes)")
    args = p.parse_args()
    out = fresh_dir(args.out_dir)
    exe = shutil.which("itae-export") or "itae-export"
    patch = shutil.which("itae-patch") or "itae-patch"
    common = [args.model, "--random-weights", "--img-size", str(args.img_size), "--exporter", args.exporter]
    rows = {}
    print(f"measuring {args.model} at {args.img_size}px with the {args.exporter} exporter in {out} ...", flush=True)
    rows["export baseline (--no-itae --skip-validation)"] = measure(
        [exe, *common, "--no-itae", "--skip-validation", "--out", str(out / "base.onnx")])
    rows["export + ITAE pass (--skip-validation)"] = measure(
        [exe, *common, "--skip-validation", "--out", str(out / "itae_novalid.onnx")])
    rows["export + ITAE pass + ONNX Runtime parity (default)"] = measure(
        [exe, *common, "--out", str(out / "itae.onnx")])
    if args.dynamic:
        rows["export --dynamic-size + ITAE pass + parity at 4 sizes"] = measure(
            [exe, *common, "--dynamic-size", "--out", str(out / "itae_dynamic.onnx")])
    rows["itae-patch on the baseline (weights not loaded)"] = measure(
        [patch, str(out / "base.onnx"), "--out", str(out / "patched.onnx"), "--check", "no"])
    data_files = sorted(f.name for f in out.iterdir() if f.suffix == ".data")
    machine = {
        "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "",
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import onnx
        import torch

        machine.update(torch=torch.__version__, onnx=onnx.__version__)
    except ImportError:
        pass
    print(f"\nmachine: {machine}")
    print(f"external data files: {data_files}\n")
    print("| step | time (s) | peak memory (GB) |\n|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_bytes'] / 1e9:.2f} |")
    result = {"model": args.model, "img_size": args.img_size, "exporter": args.exporter, "machine": machine,
              "external_data_files": data_files,
              "steps": {k: {"seconds": v["seconds"], "peak_bytes": v["peak_bytes"]} for k, v in rows.items()},
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_report(result, args.json, out, "measure_export.json", args.keep)
    return 0


if __name__ == "__main__":
    from itae_export.cli.common import run_tool

    sys.exit(run_tool("measure_export.py", main))
