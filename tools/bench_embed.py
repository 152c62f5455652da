#!/usr/bin/env python3
"""Throughput and memory of itae-embed, and faiss k-means against scikit-learn.

1. model-only images/s: one ONNX Runtime session (all cores) on ready-made [B,3,S,S] batches;
2. itae-embed end to end on generated JPEGs (decode, preprocess, model, Parquet shards) with --workers,
   in a fresh process with its own local Ray, after an untimed warm-up run (workers started, model
   loaded): steady images/s (after the first result batch) and the ratio to (1) (target >= 0.85 at
   224 px with 2 workers);
3. peak memory (RSS summed over the process tree: driver, Ray daemons and workers; polled) of itae-embed
   on each of --peak-sizes generated images (flat in the number of images is the goal);
4. faiss k-means against sklearn KMeans on --kmeans-n x --kmeans-d synthetic vectors (a Gaussian
   mixture of --kmeans-k centres): seconds each and the ARI between the two assignments.

Prints a table and writes JSON (--out). Not a test: numbers depend on the machine and its load.

    python tools/bench_embed.py --out bench_embed.json                 # the full run (see --help defaults)
    python tools/bench_embed.py --smoke --out /tmp/b.json              # tiny sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_images(folder: Path, n: int, side: int, seed: int = 0) -> Path:
    """n JPEGs of side x side-ish pixels: smooth random colour fields (realistic JPEG sizes)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    have = len(list(folder.glob("*.jpg")))
    for i in range(have, n):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side + (i % 7) * 8, side), Image.Resampling.BICUBIC)
        img.save(folder / f"{i:07d}.jpg", quality=90)
    return folder


def export_model(path: Path, name: str, img_size: int, depth: int | None) -> Path:
    import itae_export

    if not path.exists():
        itae_export.export(name, path, random_weights=True, img_size=img_size, depth=depth, exporter="torchscript",
                           validate=False)
    return path


def model_only(model: Path, img_size: int, batch: int, n: int) -> dict:
    """Images/s of one ORT session with all cores on ready batches (no decoding)."""
    from itae_export.runtime import OrtRunner

    runner = OrtRunner(str(model), threads=os.cpu_count())
    x = np.random.default_rng(0).standard_normal((batch, 3, img_size, img_size)).astype(np.float32)
    runner.run(x)  # warm-up
    batches = max(1, n // batch)
    t0 = time.perf_counter()
    for _ in range(batches):
        runner.run(x)
    dt = time.perf_counter() - t0
    return {"images": batches * batch, "seconds": dt, "images_per_s": batches * batch / dt}


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


CHILD = """
import json, sys
from pathlib import Path
from itae_export.collection_embed import EmbedRequest, embed
from itae_export.collection_ray import RaySettings, ray_session
src, model, out, workers, batch, shard, warm = sys.argv[1:8]
kw = dict(workers=int(workers), batch_size=int(batch), shard_size=int(shard), progress=False)
with ray_session(RaySettings(workers=int(workers))):
    if int(warm):  # start the workers and load the model once, so the timed run measures the steady state
        files = sorted(Path(src).glob("*.jpg"))[: int(warm)]
        Path(out + "-warm.txt").write_text("\\n".join(map(str, files)))
        embed(EmbedRequest(out + "-warm.txt", model, out + "-warm", **kw))
    r = embed(EmbedRequest(src, model, out, **kw))
print("RESULT", json.dumps({"embedded": r.embedded, "failed": r.failed, "seconds": r.seconds,
                            "images_per_s": r.images_per_s, **r.extra}))
"""


def embed_child(src: Path, model: Path, out: Path, workers: int, batch: int, shard: int, warm: int = 0) -> dict:
    """itae-embed in a fresh process (its own local Ray; `warm` images embedded first, untimed); returns
    the timed run's figures and the process tree's peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [sys.executable, "-c", CHILD, str(src), str(model), str(out), str(workers), str(batch), str(shard),
            str(warm)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"itae-embed child failed (exit {proc.returncode}): {stderr[-2000:]}")
    return {**json.loads(line[7:]), "peak_rss_mb": peak / 2**20}


def kmeans_compare(n: int, d: int, k: int, niter: int, seed: int = 0) -> dict:
    """faiss vs sklearn Lloyd k-means on the same Gaussian mixture, same iteration budget, one init each."""
    import faiss
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    truth = rng.integers(0, k, n)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65536):  # in slices: no float64 temporary of the whole set
        e = min(n, s + 65536)
        x[s:e] = centres[truth[s:e]] + 0.5 * rng.standard_normal((e - s, d)).astype(np.float32)
    t0 = time.perf_counter()
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, max_points_per_centroid=max(256, n // k + 1), verbose=False)
    km.train(x)
    _, fa = km.index.search(x, 1)
    t_faiss = time.perf_counter() - t0
    t0 = time.perf_counter()
    sk = KMeans(n_clusters=k, n_init=1, max_iter=niter, random_state=seed, algorithm="lloyd").fit_predict(x)
    t_sk = time.perf_counter() - t0
    return {"n": n, "d": d, "k": k, "niter": niter, "faiss_s": t_faiss, "sklearn_s": t_sk,
            "speedup": t_sk / t_faiss, "ari_faiss_sklearn": float(adjusted_rand_score(fa[:, 0], sk)),
            "ari_faiss_truth": float(adjusted_rand_score(truth, fa[:, 0])),
            "ari_sklearn_truth": float(adjusted_rand_score(truth, sk)), "faiss": faiss.__version__}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-name", default="dinov2_vits14")
    p.add_argument("--model", type=Path, help="an existing itae-export .onnx (default: export a random-weight one)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--depth", type=int, default=None, help="shallower random model (smoke runs)")
    p.add_argument("--images", type=int, default=2000, help="images for the throughput comparison")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--peak-sizes", default="1000,10000", help="image counts for the peak-memory runs")
    p.add_argument("--kmeans-n", type=int, default=1_000_000)
    p.add_argument("--kmeans-d", type=int, default=1024)
    p.add_argument("--kmeans-k", type=int, default=100)
    p.add_argument("--kmeans-niter", type=int, default=20)
    p.add_argument("--skip", default="", help="comma list of parts to skip: throughput,memory,kmeans")
    p.add_argument("--work", type=Path, help="folder for the model, images and outputs (default: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (depth-1 model at 56 px, 48 images, 2k vectors)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args()
    if a.smoke:
        a.img_size, a.depth, a.images, a.peak_sizes, a.batch_size, a.shard_size = 56, 1, 48, "24,48", 8, 16
        a.kmeans_n, a.kmeans_d, a.kmeans_k, a.kmeans_niter = 2000, 32, 10, 10
    return a


def run_embed_parts(a: argparse.Namespace, work: Path, skip: set[str]) -> dict:
    res: dict = {}
    model = a.model or export_model(work / f"{a.model_name}-{a.img_size}.onnx", a.model_name, a.img_size, a.depth)
    side = max(a.img_size + 32, 64)
    if "throughput" not in skip:
        src = make_images(work / f"images-{a.images}", a.images, side)
        res["model_only"] = model_only(model, a.img_size, a.batch_size, a.images)
        res["itae_embed"] = embed_child(src, model, work / f"out-tp-{time.time_ns()}", a.workers, a.batch_size,
                                        a.shard_size, warm=min(a.images, 4 * a.workers * a.batch_size))
        steady = res["itae_embed"].get("steady_images_per_s")
        res["ratio_end_to_end_over_model"] = steady / res["model_only"]["images_per_s"] if steady else None
    if "memory" not in skip:
        res["peak_memory"] = {}
        for n in [int(v) for v in a.peak_sizes.split(",")]:
            src = make_images(work / f"images-{n}", n, side)
            r = embed_child(src, model, work / f"out-mem-{n}-{time.time_ns()}", a.workers, a.batch_size,
                            a.shard_size)
            res["peak_memory"][n] = {"peak_rss_mb": r["peak_rss_mb"], "seconds": r["seconds"]}
    return res


def main() -> int:
    a = parse()
    skip = set(filter(None, a.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        work = a.work or Path(tmp)
        res = {"args": {k: str(v) for k, v in vars(a).items()}, "cpus": os.cpu_count()}
        res.update(run_embed_parts(a, work, skip))
        if "kmeans" not in skip:
            res["kmeans"] = kmeans_compare(a.kmeans_n, a.kmeans_d, a.kmeans_k, a.kmeans_niter)
    print(render(res))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


def render(r: dict) -> str:
    lines = ["| measurement | value |", "|---|---:|"]
    if "model_only" in r:
        e = r["itae_embed"]
        lines += [f"| model only (1 ORT session, all cores), images/s | {r['model_only']['images_per_s']:.1f} |",
                  f"| itae-embed steady, images/s | {e['steady_images_per_s'] or 0:.1f} |",
                  f"| itae-embed / model only | {100 * (r['ratio_end_to_end_over_model'] or 0):.1f}% |",
                  f"| itae-embed startup (Ray + actors), s | {e['startup_s']:.1f} |"]
    for n, m in r.get("peak_memory", {}).items():
        lines.append(f"| peak RSS (process tree), {n} images, MB | {m['peak_rss_mb']:.0f} |")
    if "kmeans" in r:
        k = r["kmeans"]
        lines += [f"| k-means {k['n']} x {k['d']}, k={k['k']}: faiss s / sklearn s | {k['faiss_s']:.2f} / "
                  f"{k['sklearn_s']:.2f} |", f"| ARI faiss vs sklearn | {k['ari_faiss_sklearn']:.4f} |"]
    return "\n".join(lines)


if __name__ == "__main__":
    from itae_export.cli.common import run_tool

    sys.exit(run_tool("bench_embed.py", main))
