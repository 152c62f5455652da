#!/usr/bin/env python3
"""CPU latency benchmark: PyTorch and ONNX Runtime, baseline and ITAE, in one run.

For each model and batch size it times PyTorch eager (fp32), the PyTorch ITAE reference, PyTorch
bf16 autocast, ONNX Runtime baseline and ONNX Runtime ITAE (medians of --repeats runs after
--warmup), measures export and patch time / peak memory in child processes, measures the machine's
fp32 GEMM throughput in the same run and reports the fraction of it each model reaches.
Prints a table and writes JSON (--out). Not a test: numbers depend on the machine and its load.

    python tools/bench.py --out bench.json
    python tools/bench.py --models dinov2_vits14 --batches 1,8 --repeats 3
    python tools/bench.py --smoke          # tiny depth-2 model, seconds; checks the script runs
    python tools/bench.py --cpu-race --threads 2 --out race.json   # every CPU path + the OpenVINO peers
                                                                   # and matmul peaks (tools/bench_cpu.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_MODELS = "dinov2_vits14,dinov2_vitl14"
GAP_S = 0.25  # idle time before each timed run (see time_interleaved)

# Runs `argv[1:]` as the wrapper's only child, so RUSAGE_CHILDREN.ru_maxrss is that child's peak
# (ru_maxrss of children is the largest peak among waited-for descendants, not a sum).
_WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
dt = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": r.returncode, "wall_s": dt, "peak_rss_mb": ru.ru_maxrss / 1024,
                  "stdout": r.stdout[-4000:], "stderr": r.stderr[-4000:]}))
"""


# ---------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def gemm_peak_gflops(n: int = 2048, tries: int = 5) -> dict[str, float]:
    """Best-of-`tries` fp32 n x n matrix-multiply throughput (2 n^3 FLOPs each) through torch.matmul
    (MKL) and through an ONNX Runtime MatMul (MLAS). Both are measured because on AMD CPUs MKL may
    take a slower code path than MLAS, and "the machine's peak" is the better of the two."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    def best_of(fn: Callable[[], Any]) -> float:
        fn()  # warm up thread pool and allocator
        best = float("inf")
        for _ in range(tries):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return 2 * n**3 / best / 1e9

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    res = {"torch": best_of(lambda: torch.matmul(a, b))}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(
        onnx.ModelProto.SerializeToString(model), opts, providers=["CPUExecutionProvider"]
    )
    feeds = {"a": a.numpy(), "b": b.numpy()}
    res["onnxruntime"] = best_of(lambda: sess.run(None, feeds))
    res["best"] = max(res.values())
    return res


def model_flops_per_image(embedder) -> dict[str, float]:
    """Analytic FLOPs of one forward pass for one image (multiply-add = 2 FLOPs).

    With T tokens (CLS + registers + patches), D the width and P_b the weight count of the block's
    linear layers (qkv 3D^2 + proj D^2 + MLP 2*D*H):
        FLOPs = patch_embed 2 * (3 * p^2 * D) * N_patches
              + sum over blocks [ 2 * P_b * T            (token-wise matmuls)
                                  + 4 * T^2 * D ]        (Q K^T and attn @ V, 2 T^2 D each)
    Norms, softmax, GELU and residual adds are left out (they are O(T D), a few percent).
    """
    import torch.nn as nn

    spec = embedder.spec
    n_patches = embedder.grid[0] * embedder.grid[1]
    tokens = embedder.num_prefix_tokens + n_patches
    dim = spec.embed_dim
    patch = 2 * embedder.vit.patch_embed.proj.weight.numel() * n_patches
    linear = 0
    for blk in embedder.vit.blocks:
        linear += sum(m.weight.numel() for m in blk.modules() if isinstance(m, nn.Linear))
    depth = len(embedder.vit.blocks)
    matmul = 2 * linear * tokens
    attn = depth * 4 * tokens**2 * dim
    return {
        "tokens": tokens,
        "gflops": (patch + matmul + attn) / 1e9,
        "attention_share": attn / (patch + matmul + attn),
    }


# ---------------------------------------------------------------------------------------- children


def run_measured(cmd: list[str]) -> dict[str, Any]:
    """Run cmd under a fresh wrapper; return its wall time, peak RSS and output tails."""
    r = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, check=False)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"measuring {cmd[:4]} failed: {r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"child {' '.join(cmd[:6])} failed (rc {res['rc']}): {res['stderr'][-2000:]}")
    inner = {}
    for line in res["stdout"].splitlines():
        if line.startswith("BENCH_CHILD "):
            inner = json.loads(line[len("BENCH_CHILD ") :])
    return {"wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"], **inner}


def child_export(model: str, img_size: int, depth: int | None, out: str) -> None:
    from itae_export.models import build_model
    from itae_export.onnx_export import export_onnx

    emb = build_model(model, random_weights=True, img_size=img_size, depth=depth)
    t = time.perf_counter()
    export_onnx(emb, out, img_size=img_size)
    print("BENCH_CHILD " + json.dumps({"export_s": time.perf_counter() - t}))


def child_patch(src: str, out: str) -> None:
    """Like `itae-patch IN --out OUT --check no`: the graph only, weights stay in the .data file."""
    import onnx

    from graph_passes.config import ITAEConfig
    from graph_passes.itae import apply_itae

    t = time.perf_counter()
    model = onnx.load(src, load_external_data=False)
    patched, _ = apply_itae(model, ITAEConfig())
    onnx.save_model(patched, out)  # same directory: external data locations stay valid
    print("BENCH_CHILD " + json.dumps({"patch_s": time.perf_counter() - t}))


# ---------------------------------------------------------------------------------------- timing


def _summary(ts: list[float]) -> dict[str, float]:
    return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts)}


def time_fn(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    return time_interleaved({"f": fn}, warmup, repeats)["f"]


def time_interleaved(
    cases: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Warm each case up, then time them round-robin (one run of each per round), so that load from
    other processes on a shared machine hits every case alike and the ratios stay meaningful."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    ts: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            # ORT's and OpenMP's worker threads spin for a while after a run; on a 2-core machine that
            # steals the cores from the next case (a different runtime), so let them go idle first
            time.sleep(GAP_S)
            t = time.perf_counter()
            fn()
            ts[key].append(time.perf_counter() - t)
    return {k: _summary(v) for k, v in ts.items()}


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    from itae_export.parity import cosine_rows

    return float(cosine_rows(a, b).min())


def export_pair(name: str, args: argparse.Namespace, work: Path) -> tuple[Path, Path, dict, dict]:
    """The baseline and ITAE ONNX of `name` (random weights), exported and patched in measured child
    processes: (base, itae, export figures, patch figures)."""
    me = [sys.executable, str(Path(__file__).resolve())]
    depth_args = ["--depth", str(args.depth)] if args.depth else []
    base = work / f"{name}.onnx"
    itae = work / f"{name}.itae.onnx"
    log(f"[{name}] export (child process)")
    exp = run_measured([*me, "--child", "export", "--child-model", name, "--img-size", str(args.img_size),
                        *depth_args, "--child-out", str(base)])
    log(f"[{name}] patch (child process)")
    pat = run_measured([*me, "--child", "patch", "--child-in", str(base), "--child-out", str(itae)])
    return base, itae, exp, pat


def bench_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from graph_passes.config import ITAEConfig
    from itae_export.models import build_model
    from itae_export.reference import ITAEReference

    threads = os.cpu_count() or 1
    base, itae, exp, pat = export_pair(name, args, work)

    emb = build_model(name, random_weights=True, img_size=args.img_size, depth=args.depth)
    ref = ITAEReference(emb, ITAEConfig()).eval()
    # the reference's explicit final-block attention without ITAE: splits the PyTorch ITAE cost into
    # "explicit attention instead of fused SDPA" and "the ITAE ops themselves"
    ref_plain = ITAEReference(emb, None).eval()
    flops = model_flops_per_image(emb)
    sess_base = ort_session(base, threads)
    sess_itae = ort_session(itae, threads)
    in_name = sess_base.get_inputs()[0].name

    rows = []
    rng = np.random.default_rng(0)
    for bs in args.batch_list:
        x = rng.standard_normal((bs, 3, args.img_size, args.img_size), dtype=np.float32)
        xt = torch.from_numpy(x)

        def eager(m=emb, xt=xt):
            with torch.inference_mode():
                return m(xt)

        def eager_itae(m=ref, xt=xt):
            with torch.inference_mode():
                return m(xt)

        def eager_ref_plain(m=ref_plain, xt=xt):
            with torch.inference_mode():
                return m(xt)

        def bf16(m=emb, xt=xt):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return m(xt)

        cases = {
            "torch_fp32": eager,
            "torch_itae": eager_itae,
            "torch_ref_no_itae": eager_ref_plain,
            "torch_bf16": bf16,
            "ort_fp32": lambda s=sess_base, x=x: s.run(None, {in_name: x}),
            "ort_itae": lambda s=sess_itae, x=x: s.run(None, {in_name: x}),
        }
        res: dict[str, Any] = {"model": name, "batch": bs}
        log(f"[{name}] batch {bs}: timing {', '.join(cases)} interleaved")
        res.update(time_interleaved(cases, args.warmup, args.repeats))
        med = {k: res[k]["median_ms"] for k in cases}
        res["ratios"] = {
            "torch_itae/torch_fp32": med["torch_itae"] / med["torch_fp32"],
            "torch_itae/torch_ref_no_itae": med["torch_itae"] / med["torch_ref_no_itae"],
            "ort_itae/ort_fp32": med["ort_itae"] / med["ort_fp32"],
            "ort_fp32/torch_fp32": med["ort_fp32"] / med["torch_fp32"],
            "ort_itae/torch_itae": med["ort_itae"] / med["torch_itae"],
            "torch_bf16/torch_fp32": med["torch_bf16"] / med["torch_fp32"],
        }
        # on a loaded machine the minimum is the better estimate of the uncontended latency
        mn = {k: res[k]["min_ms"] for k in cases}
        res["ratios_of_min"] = {
            "torch_itae/torch_fp32": mn["torch_itae"] / mn["torch_fp32"],
            "torch_itae/torch_ref_no_itae": mn["torch_itae"] / mn["torch_ref_no_itae"],
            "ort_itae/ort_fp32": mn["ort_itae"] / mn["ort_fp32"],
            "ort_fp32/torch_fp32": mn["ort_fp32"] / mn["torch_fp32"],
            "ort_itae/torch_itae": mn["ort_itae"] / mn["torch_itae"],
            "torch_bf16/torch_fp32": mn["torch_bf16"] / mn["torch_fp32"],
        }
        # achieved throughput of the fp32 paths; main() divides by the GEMM peak measured in this run
        res["achieved_gflops"] = {
            k: flops["gflops"] * bs / (med[k] / 1e3) for k in ("torch_fp32", "ort_fp32")
        }
        # same-output sanity: the ORT files are the models that were timed
        with torch.inference_mode():
            y_ref = ref(xt).numpy()
        res["cos_ort_itae_vs_torch_itae"] = cosine(sess_itae.run(None, {in_name: x})[0], y_ref)
        rows.append(res)

    out: dict[str, Any] = {
        "model": name,
        "depth": len(emb.vit.blocks),
        "params_m": sum(p.numel() for p in emb.parameters()) / 1e6,
        "flops_per_image": flops,
        "export": exp,
        "patch": pat,
        "rows": rows,
    }
    if args.fast_path:
        out["fast_path_int8"] = fast_path(emb, ref, base, work, args, threads)
    del sess_base, sess_itae
    return out


# ---------------------------------------------------------------------------------------- fast path


def fast_path(emb, ref, base: Path, work: Path, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """The two `itae-export --fast-path` models, timed interleaved with PyTorch fp32 eager:
    int8 (ORT dynamic int8, ITAE nodes and the final block kept fp32) and fused (exact fp32, the
    earlier blocks' attention as com.microsoft.MultiHeadAttention). Accuracy as cosine to the fp32
    PyTorch ITAE reference on random inputs."""
    import onnx
    import torch

    from graph_passes.final_block import final_block_nodes
    from itae_export.fastpath import fuse_model, quantize_int8

    itae = work / f"{emb.spec.name}.itae.onnx"
    excluded = final_block_nodes(onnx.load(str(itae), load_external_data=False))
    q_path = work / f"{emb.spec.name}.itae.int8.onnx"
    f_path = work / f"{emb.spec.name}.itae.fused.onnx"
    log(f"[{emb.spec.name}] fast path: itae_export.fastpath.quantize_int8, {len(excluded)} nodes excluded")
    t = time.perf_counter()
    quantize_int8(itae, q_path, excluded)
    q_time = time.perf_counter() - t
    log(f"[{emb.spec.name}] fast path: itae_export.fastpath.fuse_model")
    t = time.perf_counter()
    fused = fuse_model(itae, f_path)
    f_time = time.perf_counter() - t
    sess = ort_session(q_path, threads)
    sess_f = ort_session(f_path, threads)
    in_name = sess.get_inputs()[0].name
    rng = np.random.default_rng(1)
    res: dict[str, Any] = {"quantize_s": q_time, "excluded_nodes": len(excluded), "fuse_s": f_time,
                           "fused_blocks": fused["num_fused"], "rows": []}
    for bs in args.batch_list:
        x = rng.standard_normal((bs, 3, args.img_size, args.img_size), dtype=np.float32)
        xt = torch.from_numpy(x)

        def eager(xt=xt):
            with torch.inference_mode():
                return emb(xt)

        t = time_interleaved(
            {"q": lambda x=x: sess.run(None, {in_name: x}), "f": lambda x=x: sess_f.run(None, {in_name: x}),
             "e": eager}, args.warmup, args.repeats
        )
        t_q, t_f, t_e = t["q"], t["f"], t["e"]
        with torch.inference_mode():
            y_ref = ref(xt).numpy()
        res["rows"].append(
            {
                "batch": bs,
                "ort_int8_itae": t_q,
                "ort_fused_itae": t_f,
                "torch_fp32": t_e,
                "ratio_int8/torch_fp32": t_q["median_ms"] / t_e["median_ms"],
                "ratio_fused/torch_fp32": t_f["median_ms"] / t_e["median_ms"],
                "cos_min_vs_torch_itae_fp32": cosine(sess.run(None, {in_name: x})[0], y_ref),
                "fused_cos_min_vs_torch_itae_fp32": cosine(sess_f.run(None, {in_name: x})[0], y_ref),
            }
        )
    return res


# ---------------------------------------------------------------------------------------- report


def cpu_race(name: str, args: argparse.Namespace, work: Path, report: dict[str, Any], n: int, tries: int) -> dict:
    """tools/bench_cpu.py's race for one model; the matmul peaks are measured once, before the first
    model, and again after each (the better kept)."""
    import bench_cpu

    threads = args.threads or os.cpu_count() or 1
    if "peaks" not in report:
        log("measuring fp32/bf16/int8 matmul peaks")
        report["peaks"] = bench_cpu.matmul_peaks(n, tries, threads)
    args.peaks = report["peaks"]
    res = bench_cpu.race_model(name, args, work, log, time_interleaved,
                               lambda m: export_pair(m, args, work)[:2])
    again = bench_cpu.matmul_peaks(n, tries, threads)
    for cls, d in again.items():
        report["peaks"][cls] = {k: max(v, report["peaks"][cls].get(k, 0.0)) for k, v in d.items()}
    return res


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    g = report["gemm"]
    lines = [
        f"machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"onnxruntime {m['onnxruntime']}, load avg at start {m['loadavg_at_start']}",
        f"fp32 GEMM peak ({g['n']}^2 matmul, best of {g['tries']}, torch and ORT, at start and end): "
        f"{g['gflops']:.1f} GFLOP/s (torch {g['start']['torch']:.0f}/{g['end']['torch']:.0f}, "
        f"ORT {g['start']['onnxruntime']:.0f}/{g['end']['onnxruntime']:.0f}); medians of {report['repeats']} runs after {report['warmup']} warm-up, "
        f"img {report['img_size']}",
        "",
    ]
    hdr = (
        f"{'model':<15}{'B':>3} {'pt fp32':>9}{'pt ITAE':>9}{'pt ref':>9}{'pt bf16':>9}{'ort fp32':>9}{'ort ITAE':>9}"
        f" | {'ITAE/base pt':>12}{'ITAE/base ort':>14}{'ort/pt':>8}{'bf16/fp32':>10}"
        f" | {'GEMM% pt':>9}{'GEMM% ort':>10}"
    )
    lines += [
        "latency ms (median); pt ref = the PyTorch ITAE reference's explicit attention with ITAE off",
        hdr,
        "-" * len(hdr),
    ]
    for mod in report["models"]:
        for r in mod["rows"]:
            q = r["ratios"]
            g = r["gemm_fraction"]
            lines.append(
                f"{r['model']:<15}{r['batch']:>3} "
                + "".join(
                    f"{r[k]['median_ms']:>9.1f}"
                    for k in (
                        "torch_fp32",
                        "torch_itae",
                        "torch_ref_no_itae",
                        "torch_bf16",
                        "ort_fp32",
                        "ort_itae",
                    )
                )
                + f" | {q['torch_itae/torch_fp32']:>12.3f}{q['ort_itae/ort_fp32']:>14.3f}{q['ort_fp32/torch_fp32']:>8.3f}"
                f"{q['torch_bf16/torch_fp32']:>10.3f} | {100 * g['torch_fp32']:>8.1f}%{100 * g['ort_fp32']:>9.1f}%"
            )
    lines += [
        "",
        f"{'model':<15}{'params M':>9}{'GFLOP/img':>10}{'attn %':>7} | {'export s':>9}{'export peak MB':>15}"
        f" | {'patch s':>8}{'patch peak MB':>14}",
    ]
    for mod in report["models"]:
        f = mod["flops_per_image"]
        e = mod["export"]
        p = mod["patch"]
        lines.append(
            f"{mod['model']:<15}{mod['params_m']:>9.1f}{f['gflops']:>10.2f}{100 * f['attention_share']:>6.1f}%"
            f" | {e.get('export_s', e['wall_s']):>9.1f}{e['peak_rss_mb']:>15.0f}"
            f" | {p.get('patch_s', p['wall_s']):>8.2f}{p['peak_rss_mb']:>14.0f}"
        )
    for mod in report["models"]:
        fp = mod.get("fast_path_int8")
        if not fp:
            continue
        lines += [
            "",
            f"fast paths (itae-export --fast-path int8 / fused): {mod['model']}; int8: ORT dynamic int8, ITAE + "
            f"final block fp32; fused: exact fp32, {fp.get('fused_blocks', '?')} blocks' attention fused",
        ]
        for r in fp["rows"]:
            lines.append(
                f"  B={r['batch']}: int8 {r['ort_int8_itae']['median_ms']:.1f} ms, fused "
                f"{r['ort_fused_itae']['median_ms']:.1f} ms vs torch fp32 {r['torch_fp32']['median_ms']:.1f} ms "
                f"(ratios {r['ratio_int8/torch_fp32']:.3f} / {r['ratio_fused/torch_fp32']:.3f}); cos min to fp32 "
                f"ITAE reference {r['cos_min_vs_torch_itae_fp32']:.5f} / {r['fused_cos_min_vs_torch_itae_fp32']:.7f}"
            )
    lines.append(
        f"load avg at end {report['loadavg_at_end']} (other processes on the machine make timings noisy)"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", default=DEFAULT_MODELS, help=f"comma-separated catalogue names (default {DEFAULT_MODELS})"
    )
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument(
        "--repeats", type=int, default=10, help="timed runs per case; the median is reported (default 10)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default 2)")
    p.add_argument("--img-size", type=int, default=224, help="input size, a multiple of 14 (default 224)")
    p.add_argument(
        "--depth", type=int, default=None, help="reduced depth (random weights only; for quick checks)"
    )
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--fast-path", action="store_true", help="also time the fast paths of itae-export --fast-path int8 / fused")
    p.add_argument("--cpu-race", action="store_true",
                   help="race every CPU path (PyTorch fp32/bf16, ORT fp32/int8, our OpenVINO fp32/bf16/int8 IR, "
                   "the OpenVINO bf16-hint and NNCF-default peers) with fp32/bf16/int8 matmul peaks (tools/bench_cpu.py)")
    p.add_argument("--threads", type=int, default=None, help="--cpu-race: threads per runtime (default: all cores)")
    p.add_argument("--calibration-images", type=int, default=32,
                   help="--cpu-race: digits images calibrating both int8 IRs (default 32)")
    p.add_argument("--race-digits", type=int, default=64,
                   help="--cpu-race: digits images for the centred cosine (default 64)")
    p.add_argument("--smoke", action="store_true", help="tiny run: ViT-S depth 2, img 56, batch 1, 1 repeat")
    p.add_argument("--work-dir", default=None, help="keep the ONNX files here instead of a temp dir")
    # internal: the measured child processes
    p.add_argument("--child", choices=("export", "patch"), help=argparse.SUPPRESS)
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    p.add_argument("--child-in", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.repeats, args.warmup, args.img_size, args.depth = (
            "dinov2_vits14",
            "1",
            1,
            1,
            56,
            2,
        )
        args.calibration_images, args.race_digits = min(args.calibration_images, 4), min(args.race_digits, 16)
    try:
        args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches {args.batches!r} must be comma-separated integers, e.g. 1,8")
    if not args.batch_list or min(args.batch_list) < 1:
        p.error("--batches needs positive integers")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "export":
        child_export(args.child_model, args.img_size, args.depth, args.child_out)
        return 0
    if args.child == "patch":
        child_patch(args.child_in, args.child_out)
        return 0

    import torch

    from itae_export.outputs import OutputTransaction, write_text_atomic

    if args.out:
        with OutputTransaction(args.out, force=args.force):
            pass  # validated up front (exists without --force, a directory, unwritable), written at the end
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "img_size": args.img_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "gap_s_before_each_run": GAP_S,
        "depth_override": args.depth,
    }
    n, tries = (512, 3) if args.smoke else (2048, 8)
    log("measuring fp32 GEMM peak")
    gemm_start = gemm_peak_gflops(n, tries)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    report["models"] = []
    with tempfile.TemporaryDirectory(prefix="itae-bench-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in models:
            if args.cpu_race:
                report.setdefault("cpu_race", []).append(cpu_race(name, args, work, report, n, tries))
            else:
                report["models"].append(bench_model(name, args, work))
    # measured again at the end and the better one kept: on a shared machine a single measurement
    # can land in someone else's burst and make the model look faster than "peak"
    gemm_end = gemm_peak_gflops(n, tries)
    peak = max(gemm_start["best"], gemm_end["best"])
    report["gemm"] = {"n": n, "tries": tries, "gflops": peak, "start": gemm_start, "end": gemm_end}
    for mod in report["models"]:
        for r in mod["rows"]:
            r["gemm_fraction"] = {k: v / peak for k, v in r["achieved_gflops"].items()}
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.cpu_race:
        from bench_cpu import format_race

        print(format_race(report))
    else:
        print(format_table(report))
    if args.out:
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n", force=args.force)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from itae_export.cli.common import run_tool

    sys.exit(run_tool("bench.py", main))
