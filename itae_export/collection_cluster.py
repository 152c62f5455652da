"""itae_export.cluster() / itae-cluster: faiss k-means over an itae-embed folder -> assignments.parquet
(path, cluster, distance), centroids.npy, one contact sheet per cluster, index.html and metrics.json,
committed together through one output transaction."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .collection import require_scale
from .collection_kmeans import KMeansOptions, Model, assign, fit
from .errors import DataError, UsageError
from .gallery import SHEET_NAME, index_html, write_sheets
from .outputs import OutputTransaction
from .shards import EmbeddingRun, open_run

ASSIGNMENTS, CENTROIDS, INDEX, METRICS = "assignments.parquet", "centroids.npy", "index.html", "metrics.json"


@dataclass
class ClusterRequest:
    """embeddings: an itae-embed folder; out: the output folder; k: clusters (a tuple: one per level of
    the hierarchical mode, finest first); labels: "folders" (the first folder below an image-folder
    SOURCE, ImageFolder style) or a CSV/TSV/Parquet file of path,label; compare: another itae-embed
    folder, clustered the same way, whose assignments are compared (ARI) on the images both hold."""

    embeddings: str | Path
    out: str | Path
    k: int | tuple[int, ...]
    spherical: bool = True
    seed: int = 0
    nredo: int = 1
    niter: int = 25
    max_points_per_centroid: int = 256
    gpu: bool | None = None
    labels: str | Path | None = None
    compare: str | Path | None = None
    sheet_images: int = 16
    thumb: int = 96
    force: bool = False
    progress: bool = True

    def options(self) -> KMeansOptions:
        k = (self.k,) if isinstance(self.k, int) else tuple(self.k)
        return KMeansOptions(k, self.spherical, self.seed, self.nredo, self.niter, self.max_points_per_centroid,
                             self.gpu)


@dataclass
class ClusterResult:
    out: Path
    k: tuple[int, ...]
    images: int
    sizes: np.ndarray
    metrics: dict | None
    compare: dict | None
    seconds: float
    files: list[Path] = field(default_factory=list)

    @property
    def index_html(self) -> Path:
        return self.out / INDEX

    def summary(self) -> str:
        m = f"; ACC {100 * self.metrics['acc']:.2f}%, NMI {100 * self.metrics['nmi']:.2f}%, ARI " \
            f"{100 * self.metrics['ari']:.2f}%" if self.metrics else ""
        c = f"; ARI vs {self.compare['other']}: {self.compare['ari']:.4f}" if self.compare else ""
        return f"{self.images} images in {len(self.sizes)} clusters{m}{c}; gallery: {self.index_html}"


def _check_k(run: EmbeddingRun, opts: KMeansOptions) -> None:
    if opts.k[0] > run.count:
        raise UsageError(f"--k {opts.k[0]} exceeds the number of embedded images in {run.folder} ({run.count}); "
                         "choose a smaller --k")


def read_labels(spec: str | Path, run: EmbeddingRun) -> tuple[dict[str, str], str]:
    """path -> class name, and a description. "folders": the first folder below an image-folder SOURCE."""
    if str(spec) == "folders":
        src = run.manifest["source"]
        if src["kind"] != "folder":
            raise UsageError(f"--labels folders needs embeddings of a folder SOURCE; {run.folder} was made from a "
                             f"{src['kind']} source; pass --labels FILE")
        root = Path(src["location"])
        out = {}
        for part in _paths(run):
            for p in part:
                rel = Path(p).relative_to(root).parts
                if len(rel) > 1:
                    out[p] = rel[0]
        return out, f"folder names under {root}"
    return _label_file(Path(spec)), str(spec)


def _paths(run: EmbeddingRun):
    from .shards import iter_shards

    for part in iter_shards(run, columns=("path",)):
        yield part["path"]


def _label_file(p: Path) -> dict[str, str]:
    import os

    from .safe_io import read_text_checked

    if not p.is_file():
        raise UsageError(f"--labels {p} does not exist; give 'folders' or a CSV/TSV/Parquet file of path,label")
    if p.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        t = pq.read_table(p)
        if not {"path", "label"} <= set(t.column_names):
            raise UsageError(f"--labels {p} needs columns path and label; it has {', '.join(t.column_names)}")
        pairs: Iterable[tuple] = zip(t.column("path").to_pylist(), t.column("label").to_pylist(), strict=True)
    else:
        rows = [line.split("\t" if "\t" in line else ",", 1) for line in read_text_checked(p).splitlines()
                if line.strip() and not line.startswith("#")]
        if any(len(r) != 2 for r in rows):
            raise UsageError(f"--labels {p}: every line must be path,label (or path<TAB>label)")
        pairs = ((a.strip(), b.strip()) for a, b in rows)
    return {(k if os.path.isabs(k) else str((p.parent / k).absolute())): str(v) for k, v in pairs
            if k is not None and v is not None}


def cluster(req: ClusterRequest) -> ClusterResult:
    """Run itae-cluster (see ClusterRequest); every input is checked before the output is claimed."""
    require_scale("itae-cluster")
    t0 = time.perf_counter()
    opts = req.options()
    run = open_run(req.embeddings, "DIR")
    _check_k(run, opts)
    labels = read_labels(req.labels, run) if req.labels is not None else None
    other = open_run(req.compare, "--compare") if req.compare is not None else None
    if other is not None:
        _check_k(other, opts)
    out = Path(req.out).absolute()
    k_top = opts.k[-1]
    sheets = [out / SHEET_NAME.format(c) for c in range(k_top)]
    with OutputTransaction(out / INDEX, extra=[out / ASSIGNMENTS, out / CENTROIDS, out / METRICS, *sheets],
                           inputs=[r.folder / "manifest.json" for r in (run, other) if r is not None],
                           force=req.force) as tx:
        model = fit(run, opts)
        assignment, nearest = _write_assignments(tx, run, model, opts, req.sheet_images)
        metrics = _metrics(assignment, labels)
        compare = _compare(assignment, other, opts) if other is not None else None
        sizes = np.bincount(assignment["cluster"], minlength=k_top)
        np.save(tx.stage_path(out / CENTROIDS), model.top, allow_pickle=False)
        names = write_sheets(tx.staging, run.manifest["source"], nearest, req.thumb, progress=req.progress)
        info = {"images": run.count, "method": opts.describe(), "metrics": metrics, "compare": compare}
        tx.stage_path(out / INDEX).write_text(index_html(f"itae-cluster: {run.folder.name}", sizes, names, info))
        report = {**info, "k": list(opts.k), "sizes": sizes.tolist(), "objective": model.objective,
                  "train_seconds": model.seconds, "embeddings": str(run.folder), "model": run.manifest["model"],
                  "options": {**opts.__dict__, "k": list(opts.k)}}
        tx.stage_path(out / METRICS).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        for p in [out / ASSIGNMENTS, out / CENTROIDS, out / METRICS, *(out / n for n in names.values()), out / INDEX]:
            tx.add(tx.stage_path(p), p)
        files = tx.commit()
    return ClusterResult(out, opts.k, run.count, sizes, metrics, compare, time.perf_counter() - t0, files)


def _write_assignments(tx: OutputTransaction, run: EmbeddingRun, model: Model, opts: KMeansOptions,
                       per_sheet: int) -> tuple[dict, dict[int, list[tuple[int, str]]]]:
    """Stream assignments.parquet into the staging folder; keep the paths (for labels and --compare), the
    top-level clusters and, per cluster, the `per_sheet` rows nearest its centroid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths: list[str] = []
    clusters: list[np.ndarray] = []
    best: dict[int, list[tuple[float, int, str]]] = {}
    writer = None
    for part in assign(run, model, opts.spherical):
        cols = {"path": pa.array(part["path"], pa.string()), "cluster": pa.array(part["cluster"], pa.int32()),
                "distance": pa.array(part["distance"], pa.float32()), "index": pa.array(part["index"], pa.int64())}
        if len(opts.k) > 1:
            cols.update({f"level_{i + 1}": pa.array(ids, pa.int32()) for i, ids in enumerate(part["levels"])})
        table = pa.table(cols)
        if writer is None:
            writer = pq.ParquetWriter(tx.stage_path(tx.folder / ASSIGNMENTS), table.schema)
        writer.write_table(table)
        paths += part["path"]
        clusters.append(part["cluster"])
        _keep_nearest(best, part, per_sheet)
    assert writer is not None
    writer.close()
    nearest = {c: [(i, p) for _, i, p in sorted(v)] for c, v in best.items()}
    return {"path": paths, "cluster": np.concatenate(clusters)}, nearest


def _keep_nearest(best: dict, part: dict, m: int) -> None:
    order = np.lexsort((part["distance"], part["cluster"]))
    c_sorted = part["cluster"][order]
    for c in np.unique(c_sorted).tolist():
        rows = order[c_sorted == c][:m]
        cand = best.get(c, []) + [(float(part["distance"][r]), int(part["index"][r]), part["path"][r]) for r in rows]
        best[c] = sorted(cand)[:m]


def _metrics(assignment: dict, labels: tuple[dict[str, str], str] | None) -> dict | None:
    from .cluster import clustering_metrics

    if labels is None:
        return None
    table, what = labels
    rows = [i for i, p in enumerate(assignment["path"]) if p in table]
    if not rows:
        raise DataError(f"--labels ({what}) names none of the embedded images; check the paths it lists")
    names = sorted({table[assignment["path"][i]] for i in rows})
    ids = {n: j for j, n in enumerate(names)}
    y_true = np.asarray([ids[table[assignment["path"][i]]] for i in rows])
    m = clustering_metrics(y_true, assignment["cluster"][rows])
    return {**m, "labels": what, "labelled": len(rows), "classes": len(names)}


def _compare(assignment: dict, other: EmbeddingRun, opts: KMeansOptions) -> dict:
    """Cluster the other run the same way and compare the two assignments on their common images."""
    from sklearn.metrics import adjusted_rand_score

    model = fit(other, opts)
    theirs: dict[str, int] = {}
    for part in assign(other, model, opts.spherical):
        theirs.update(zip(part["path"], part["cluster"].tolist(), strict=True))
    common = [i for i, p in enumerate(assignment["path"]) if p in theirs]
    if not common:
        raise DataError(f"--compare {other.folder} shares no image paths with the embeddings; compare two runs "
                        "over the same SOURCE")
    mine = assignment["cluster"][common]
    other_ids = np.asarray([theirs[assignment["path"][i]] for i in common])
    return {"other": str(other.folder), "other_model": other.manifest["model"]["path"], "common": len(common),
            "ari": float(adjusted_rand_score(mine, other_ids))}
