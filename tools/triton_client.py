#!/usr/bin/env python3
"""Send images to a model served by Triton (over HTTP) and save the embeddings as .npy.

    python tools/triton_client.py --url localhost:8000 --model-name dinov2_vitl14_itae \
        --out embeddings.npy img1.jpg img2.png ...

The input name, layout and size are read from the server's model config:
  - uint8 [H, W, 3] input (exported with --input-format uint8-nhwc): raw RGB pixels are sent and the
    model normalises them itself;
  - float [3, H, W] input: the client normalises with ImageNet mean/std (--mean/--std) and sends NCHW.
Each image is resized (shorter side to the model size, bicubic) and centre-cropped (--resize crop,
default) or squashed to the model size (--resize squash). Output: OUT ([N, D], in the order of the
files given) and OUT with suffix .files.txt listing the files, one per line.

Needs `pip install "tritonclient[http]" pillow`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NP_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_UINT8": np.uint8}


@dataclass(frozen=True)
class ModelIO:
    input_name: str
    datatype: str  # Triton config enum name: TYPE_UINT8 / TYPE_FP32 / TYPE_FP16
    layout: str  # "NHWC" (uint8 pixels) or "NCHW" (normalised floats)
    height: int
    width: int
    output_name: str
    max_batch: int  # 0: the model takes the batch dim in its dims (no Triton batching)

    @property
    def raw_pixels(self) -> bool:
        return self.datatype == "TYPE_UINT8"


def model_io(config: dict[str, Any]) -> ModelIO:
    """Read the image input and embedding output from a model config (HTTP JSON or protobuf-JSON)."""
    inputs, outputs = config.get("input") or [], config.get("output") or []
    if len(inputs) != 1 or not outputs:
        raise SystemExit(f"error: expected one image input and an output in the model config, got {config}")
    inp = inputs[0]
    dtype = str(inp.get("data_type"))
    if dtype not in _NP_TYPES:
        raise SystemExit(
            f"error: input {inp.get('name')!r} has type {dtype}; expected TYPE_UINT8 or TYPE_FP32/16"
        )
    dims = [int(d) for d in inp.get("dims", [])]  # protobuf JSON writes int64 as strings
    max_batch = int(config.get("max_batch_size", 0))
    if max_batch == 0:
        dims = dims[1:]  # the config's dims include the batch dim
    if dtype == "TYPE_UINT8":
        if len(dims) != 3 or dims[2] != 3:
            raise SystemExit(f"error: uint8 input dims {dims}; expected [H, W, 3]")
        layout, h, w = "NHWC", dims[0], dims[1]
    else:
        if len(dims) != 3 or dims[0] != 3:
            raise SystemExit(f"error: float input dims {dims}; expected [3, H, W]")
        layout, h, w = "NCHW", dims[1], dims[2]
    if h <= 0 or w <= 0:
        raise SystemExit(f"error: the model's image size is dynamic ({dims}); this client needs a fixed size")
    return ModelIO(inp["name"], dtype, layout, h, w, outputs[0]["name"], max_batch)


def load_image(path: str | Path, height: int, width: int, resize: str = "crop") -> np.ndarray:
    """RGB uint8 [height, width, 3]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if resize == "squash":
            im = im.resize((width, height), Image.Resampling.BICUBIC)
        else:
            scale = max(height / im.height, width / im.width)
            size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
            im = im.resize(size, Image.Resampling.BICUBIC)
            left, top = (im.width - width) // 2, (im.height - height) // 2
            im = im.crop((left, top, left + width, top + height))
        return np.asarray(im, dtype=np.uint8).copy()


def to_model_input(pixels: np.ndarray, io: ModelIO, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 [N, H, W, 3] -> what the model takes (as is for uint8 models; normalised NCHW floats else)."""
    if io.raw_pixels:
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    x = pixels.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(std, np.float32).reshape(
        1, 3, 1, 1
    )
    return np.ascontiguousarray(x, dtype=_NP_TYPES[io.datatype])


def embed(
    client: Any, httpclient: Any, model_name: str, io: ModelIO, x: np.ndarray, version: str = ""
) -> np.ndarray:
    inp = httpclient.InferInput(io.input_name, list(x.shape), io.datatype.removeprefix("TYPE_"))
    inp.set_data_from_numpy(x, binary_data=True)
    out = httpclient.InferRequestedOutput(io.output_name, binary_data=True)
    res = client.infer(model_name, inputs=[inp], outputs=[out], model_version=version)
    return res.as_numpy(io.output_name)


def main(argv: list[str] | None = None, *, client: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="image files (any format PIL reads)")
    p.add_argument(
        "--url", default="localhost:8000", help="Triton HTTP endpoint host:port (default %(default)s)"
    )
    p.add_argument("--model-name", required=True)
    p.add_argument("--model-version", default="", help="default: the version the server picks (latest)")
    p.add_argument(
        "--out", type=Path, default=Path("embeddings.npy"), help="output .npy (default %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: the model's max_batch_size (or 8)")
    p.add_argument("--resize", choices=("crop", "squash"), default="crop")
    p.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, help="float models only")
    p.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, help="float models only")
    args = p.parse_args(argv)

    try:
        import tritonclient.http as httpclient
    except ImportError:
        print('error: this client needs tritonclient: pip install "tritonclient[http]"', file=sys.stderr)
        return 2
    if client is None:
        client = httpclient.InferenceServerClient(url=args.url)
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        print(f"error: no such file(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    io = model_io(client.get_model_config(args.model_name, args.model_version))
    bs = args.batch_size or io.max_batch or 8
    if io.max_batch and bs > io.max_batch:
        print(f"error: --batch-size {bs} exceeds the model's max_batch_size {io.max_batch}", file=sys.stderr)
        return 2
    chunks = []
    for start in range(0, len(args.files), bs):
        names = args.files[start : start + bs]
        pixels = np.stack([load_image(f, io.height, io.width, args.resize) for f in names])
        x = to_model_input(pixels, io, args.mean, args.std)
        chunks.append(np.asarray(embed(client, httpclient, args.model_name, io, x, args.model_version)))
    emb = np.concatenate(chunks)

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".npy", dir=out.parent)
    os.close(fd)
    try:
        np.save(tmp, emb)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    out.with_suffix(".files.txt").write_text("".join(f"{f}\n" for f in args.files))
    kind = "uint8 pixels" if io.raw_pixels else "normalised floats"
    print(f"{len(emb)} embeddings of dim {emb.shape[-1]} ({kind} sent to {args.model_name}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
