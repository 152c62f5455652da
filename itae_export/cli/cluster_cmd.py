"""`itae-cluster DIR --k K --out OUT`: faiss k-means over an itae-embed folder, with a picture of every
cluster (docs/collections.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import UsageError
from .common import make_parser, run_command


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or a comma-separated list of them") from None
    return ks


def cluster_parser() -> argparse.ArgumentParser:
    p = make_parser("itae-cluster", "faiss k-means over the embeddings of an itae-embed folder: writes "
                    "assignments.parquet (path, cluster, distance), centroids.npy, one contact sheet PNG per "
                    "cluster, index.html (open it in a browser) and metrics.json. Workflow: docs/collections.md.")
    p.add_argument("embeddings", metavar="DIR", help="an itae-embed output folder")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--k", required=True, type=_ks, metavar="K", help="number of clusters; with --levels L, L "
                   "comma-separated values, finest first (e.g. --levels 2 --k 1000,100)")
    p.add_argument("--levels", type=int, default=1, metavar="L",
                   help="hierarchical k-means levels (ssl-data-curation style: each level clusters the centroids "
                   "of the one below)")
    k = p.add_argument_group("k-means")
    k.add_argument("--euclidean", action="store_true", help="plain (Euclidean) k-means instead of spherical (cosine)")
    k.add_argument("--seed", type=int, default=0, help="k-means seed")
    k.add_argument("--nredo", type=int, default=1, metavar="N", help="restarts; the best objective is kept")
    k.add_argument("--niter", type=int, default=25, metavar="N", help="k-means iterations")
    k.add_argument("--max-points-per-centroid", type=int, default=256, metavar="N",
                   help="training reads a seeded sample of at most K x N embeddings")
    k.add_argument("--cpu", action="store_true", help="stay on the CPU even with the faiss GPU build")
    e = p.add_argument_group("evaluation and pictures")
    e.add_argument("--labels", metavar="FILE|folders", help="'folders' (class = first folder below an image-folder "
                   "SOURCE) or a CSV/TSV/Parquet file of path,label: adds ACC/NMI/ARI")
    e.add_argument("--compare", metavar="OTHER_DIR", help="another itae-embed folder (e.g. baseline vs ITAE, ORT vs "
                   "engine): clustered the same way, agreement as ARI")
    e.add_argument("--sheet-images", type=int, default=16, metavar="N", help="images per contact sheet")
    e.add_argument("--thumb", type=int, default=96, metavar="PX", help="thumbnail size on the sheets")
    p.add_argument("--force", action="store_true", help="overwrite the outputs of an earlier run in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cluster_command(args: argparse.Namespace) -> int:
    from ..collection_cluster import ClusterRequest, cluster

    if len(args.k) != args.levels:
        raise UsageError(f"--levels {args.levels} needs {args.levels} comma-separated --k values (finest first), "
                         f"got {len(args.k)}")
    for name in ("sheet_images", "thumb"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    req = ClusterRequest(embeddings=args.embeddings, out=args.out, k=args.k, spherical=not args.euclidean,
                         seed=args.seed, nredo=args.nredo, niter=args.niter,
                         max_points_per_centroid=args.max_points_per_centroid, gpu=False if args.cpu else None,
                         labels=args.labels, compare=args.compare, sheet_images=args.sheet_images, thumb=args.thumb,
                         force=args.force, progress=not args.no_progress)
    res = cluster(req)
    print(res.summary(), file=sys.stderr)
    return 0


def cluster_main(argv: Sequence[str] | None = None) -> int:
    return run_command("itae-cluster", cluster_parser(), cluster_command, argv)


if __name__ == "__main__":
    sys.exit(cluster_main())
