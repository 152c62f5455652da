"""`itae-embed SOURCE --model M --out DIR`: embed an image collection on Ray Data (docs/collections.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..collection import MAX_IMAGE_BYTES
from ..safe_io import MAX_IMAGE_PIXELS
from .common import make_parser, run_command


def embed_parser() -> argparse.ArgumentParser:
    p = make_parser("itae-embed", "Embed every image of a collection with an itae-export artifact on Ray Data, "
                    "into resumable Parquet shards (path, embedding, model digest); unreadable images are listed "
                    "in DIR/failed.parquet. A rerun of the same command resumes. Workflow: docs/collections.md.")
    p.add_argument("source", metavar="SOURCE", help="a folder of images (searched recursively), a text file of "
                   "image paths (one a line), a Parquet file of paths, or a Parquet file of encoded images")
    p.add_argument("--model", required=True, metavar="FILE", help="itae-export artifact: .onnx (ONNX Runtime), "
                   ".engine/.plan (TensorRT), .xml (OpenVINO IR)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new, or an earlier run's to resume)")
    r = p.add_argument_group("Ray")
    r.add_argument("--address", metavar="ADDR", help="join this Ray cluster (e.g. ray://head:10001 or "
                   "head:6379); default: start a local Ray on this machine")
    r.add_argument("--workers", type=int, default=2, metavar="N", help="model actors, one runtime session each")
    r.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per model call")
    r.add_argument("--num-gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="GPUs each actor reserves (TensorRT engines, ONNX Runtime CUDA)")
    r.add_argument("--num-cpus", type=int, metavar="N", help="logical CPUs of the local Ray "
                   "(default: this machine's, at least workers + 1)")
    r.add_argument("--threads-per-worker", type=int, metavar="N",
                   help="ONNX Runtime threads per actor (default: CPUs / workers)")
    d = p.add_argument_group("data")
    d.add_argument("--shard-size", type=int, default=4096, metavar="N",
                   help="images per output shard (rounded up to a multiple of --batch-size); the unit of resuming")
    d.add_argument("--column", metavar="NAME", help="Parquet SOURCE: the column of paths or image bytes "
                   "(default: path/file/... or image/bytes/...)")
    d.add_argument("--img-size", type=int, metavar="PX", help="only for an artifact that records no image size")
    d.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, metavar="N",
                   help="larger encoded images are skipped (listed in failed.parquet) before decoding")
    d.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                   help="images with more pixels (read from the header) are skipped before decoding")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def embed_command(args: argparse.Namespace) -> int:
    from ..collection_embed import EmbedRequest, embed

    req = EmbedRequest(source=args.source, model=args.model, out=args.out, workers=args.workers,
                       batch_size=args.batch_size, shard_size=args.shard_size,
                       num_gpus_per_worker=args.num_gpus_per_worker, address=args.address, num_cpus=args.num_cpus,
                       threads_per_worker=args.threads_per_worker, column=args.column, img_size=args.img_size,
                       max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels,
                       progress=not args.no_progress)
    res = embed(req)
    print(res.summary(), file=sys.stderr)
    return 0


def embed_main(argv: Sequence[str] | None = None) -> int:
    return run_command("itae-embed", embed_parser(), embed_command, argv)


if __name__ == "__main__":
    sys.exit(embed_main())
