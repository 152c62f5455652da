"""Image data sets read from local folders in their native release formats, and DINOv2 preprocessing.

Nothing here downloads: every reader takes a folder the user already has and raises DataError naming
the expected layout when the folder is not it. sklearn's bundled digits need no folder at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .safe_io import open_image_rgb, read_text_checked, safe_pickle_load

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

DATASETS = ("cifar10", "cifar100", "stl10", "tiny-imagenet", "imagefolder", "digits")
# Test splits by default. Tiny ImageNet's test labels were never released, so its labelled
# held-out split is "val" (10,000 images, 50 per class), the split clustering papers report.
DEFAULT_SPLIT = {
    "cifar10": "test",
    "cifar100": "test",
    "stl10": "test",
    "tiny-imagenet": "val",
    "imagefolder": None,
    "digits": "all",
}
SPLITS = {
    "cifar10": ("test", "train"),
    "cifar100": ("test", "train"),
    "stl10": ("test", "train"),
    "tiny-imagenet": ("val", "train"),
    "digits": ("all", "train", "test"),
}

LAYOUTS = {
    "cifar10": "DIR/cifar-10-batches-py/{test_batch, data_batch_1..5, batches.meta} (the python pickle release "
    "cifar-10-python.tar.gz, extracted); DIR may also be the cifar-10-batches-py folder itself",
    "cifar100": "DIR/cifar-100-python/{test, train, meta} (the python pickle release cifar-100-python.tar.gz, "
    "extracted); DIR may also be the cifar-100-python folder itself",
    "stl10": "DIR/stl10_binary/{test_X.bin, test_y.bin, train_X.bin, train_y.bin, class_names.txt} (the binary "
    "release stl10_binary.tar.gz, extracted); DIR may also be the stl10_binary folder itself",
    "tiny-imagenet": "DIR/tiny-imagenet-200/{wnids.txt, val/val_annotations.txt, val/images/*.JPEG, "
    "train/<wnid>/images/*.JPEG} (tiny-imagenet-200.zip, extracted); DIR may also be the tiny-imagenet-200 "
    "folder itself",
    "imagefolder": "DIR/<class name>/<image files> (one sub-folder per class, images inside; "
    "with --split S the tree is DIR/S/<class name>/...)",
    "digits": "no folder: scikit-learn's bundled copy (sklearn.datasets.load_digits)",
}


@dataclass
class ImageDataset:
    """Images with integer labels. `images` is either an in-memory uint8 array [N, H, W, 3] or a list
    of file paths loaded on demand (Tiny ImageNet, ImageFolder)."""

    name: str
    split: str | None
    images: np.ndarray | list[Path]
    labels: np.ndarray
    classes: list[str]
    root: Path | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load(self, i: int) -> Image.Image:
        item = self.images[i]
        if isinstance(item, Path):
            return open_image_rgb(item)
        return Image.fromarray(np.asarray(item))

    def subset(self, limit: int | None, seed: int = 0) -> ImageDataset:
        """A seeded random subset of `limit` images (kept in data set order), so every class is likely
        present; None or limit >= len returns self."""
        if limit is None or limit >= len(self):
            return self
        if limit <= 0:
            raise DataError(f"--limit must be positive, got {limit}")
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=limit, replace=False))
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        info = dict(self.info, subset={"limit": int(limit), "seed": int(seed), "of": len(self)})
        return ImageDataset(self.name, self.split, images, self.labels[idx], self.classes, self.root, info)

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "split": self.split,
            "root": str(self.root) if self.root is not None else None,
            "count": len(self),
            "num_classes": self.num_classes,
            **self.info,
        }


# ---------------------------------------------------------------------------------------------- readers


def _find_dir(root: Path, name: str, marker: str, dataset: str) -> Path:
    """`root/name` or `root` itself, whichever holds `marker`."""
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a directory; {dataset} expects {LAYOUTS[dataset]}")
    for cand in (root / name, root):
        if (cand / marker).exists():
            return cand
    raise DataError(
        f"--data-root {root} is not a {dataset} folder (no {name}/{marker}); expected {LAYOUTS[dataset]}"
    )


def _check_split(dataset: str, split: str) -> None:
    if split not in SPLITS[dataset]:
        raise DataError(
            f"--split {split!r} is not available for {dataset}; choose one of {', '.join(SPLITS[dataset])}"
        )


def _unpickle(path: Path, dataset: str) -> dict:
    """A CIFAR batch through the restricted unpickler (numpy arrays and plain data only)."""
    if not path.exists():
        raise DataError(f"{path} is missing; {dataset} expects {LAYOUTS[dataset]}")
    obj = safe_pickle_load(path, "CIFAR python pickle batch")
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a dict batch; expected {LAYOUTS[dataset]}")
    # The official batches have bytes keys; accept str keys too (re-pickled copies).
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_images(batch: dict, path: Path, dataset: str) -> np.ndarray:
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
            or data.dtype.kind not in "ui" or (data.size and (data.min() < 0 or data.max() > 255)):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"{path}: 'data' must be a [N, 3072] uint8 array (3x32x32, channel-major), got {got}; "
            f"expected {LAYOUTS[dataset]}"
        )
    return data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _cifar_labels(batch: dict, key: str, path: Path, n: int) -> np.ndarray:
    """Integer labels in 0..n-1 under `key`, else DataError naming the file and key."""
    values = batch[key]
    labels = np.asarray(values) if isinstance(values, (list, tuple, np.ndarray)) else np.zeros((0, 0))
    if labels.ndim != 1 or labels.dtype.kind not in "ui" or (labels.size and (labels.min() < 0 or labels.max() >= n)):
        raise DataError(f"{path}: '{key}' must be a list of integers in 0..{n - 1}; replace the file")
    return labels.astype(np.int64)


def _names(meta: Path, dataset: str, key: str, n: int) -> list[str]:
    """Class names from a meta pickle; a missing file gives '0'..'n-1', a wrong one a DataError."""
    if not meta.is_file():
        return [str(i) for i in range(n)]
    values = _unpickle(meta, dataset).get(key)
    if not isinstance(values, (list, tuple)) or len(values) != n or not all(isinstance(v, (bytes, str)) for v in values):
        raise DataError(f"{meta}: '{key}' must be a list of {n} names; replace the file or delete it")
    try:
        return [v.decode() if isinstance(v, bytes) else v for v in values]
    except UnicodeDecodeError:
        raise DataError(f"{meta}: '{key}' holds names that are not UTF-8; replace the file or delete it") from None


def load_cifar10(root: Path, split: str = "test") -> ImageDataset:
    _check_split("cifar10", split)
    d = _find_dir(root, "cifar-10-batches-py", "test_batch" if split == "test" else "data_batch_1", "cifar10")
    files = [d / "test_batch"] if split == "test" else [d / f"data_batch_{i}" for i in range(1, 6)]
    images, labels = [], []
    for p in files:
        b = _unpickle(p, "cifar10")
        if "labels" not in b:
            raise DataError(
                f"{p} has no 'labels' entry; is it a CIFAR-100 file? expected {LAYOUTS['cifar10']}"
            )
        images.append(_cifar_images(b, p, "cifar10"))
        labels.append(_cifar_labels(b, "labels", p, 10))
    classes = _names(d / "batches.meta", "cifar10", "label_names", 10)
    return ImageDataset("cifar10", split, np.concatenate(images), np.concatenate(labels), classes, d)


def load_cifar100(root: Path, split: str = "test", *, coarse: bool = False) -> ImageDataset:
    """Fine labels (100 classes, the paper's setting) by default; coarse=True gives the 20 superclasses."""
    _check_split("cifar100", split)
    d = _find_dir(root, "cifar-100-python", split, "cifar100")
    b = _unpickle(d / split, "cifar100")
    key = "coarse_labels" if coarse else "fine_labels"
    if key not in b:
        raise DataError(
            f"{d / split} has no '{key}' entry; is it a CIFAR-10 file? expected {LAYOUTS['cifar100']}"
        )
    n = 20 if coarse else 100
    labels = _cifar_labels(b, key, d / split, n)
    classes = _names(d / "meta", "cifar100", "coarse_label_names" if coarse else "fine_label_names", n)
    ds = ImageDataset("cifar100", split, _cifar_images(b, d / split, "cifar100"), labels, classes, d)
    ds.info["labels"] = "coarse (20 superclasses)" if coarse else "fine (100 classes)"
    return ds


def load_stl10(root: Path, split: str = "test") -> ImageDataset:
    _check_split("stl10", split)
    d = _find_dir(root, "stl10_binary", f"{split}_X.bin", "stl10")
    xp, yp = d / f"{split}_X.bin", d / f"{split}_y.bin"
    # Raw uint8 files, no pickle: the sizes must match the layout before anything is read.
    for f in (xp, yp):
        if not f.is_file():
            raise DataError(f"{f} is missing or not a regular file; stl10 expects {LAYOUTS['stl10']}")
    per = 3 * 96 * 96
    nx, ny = xp.stat().st_size, yp.stat().st_size
    if nx == 0 or nx % per:
        raise DataError(f"{xp} has {nx} bytes, not a positive multiple of 3*96*96; expected {LAYOUTS['stl10']}")
    if ny != nx // per:
        raise DataError(f"{yp} has {ny} labels (bytes) for {nx // per} images in {xp}; the files do not belong together")
    try:
        raw = np.fromfile(xp, dtype=np.uint8, count=nx)
        y = np.fromfile(yp, dtype=np.uint8, count=ny).astype(np.int64)
    except (OSError, ValueError, MemoryError) as e:
        raise DataError(f"{xp} or {yp} could not be read ({type(e).__name__}: {e}); replace them") from None
    if raw.size != nx or y.size != ny:
        raise DataError(f"{xp} or {yp} changed size while being read; try again")
    # The release stores each image column-major (Fortran order): channel, then column, then row.
    images = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1).copy()
    if y.min() < 1 or y.max() > 10:
        raise DataError(f"{yp}: STL-10 labels must lie in 1..10, found {y.min()}..{y.max()}")
    names_p = d / "class_names.txt"
    classes = read_text_checked(names_p).split() if names_p.is_file() else [str(i) for i in range(1, 11)]
    if len(classes) != 10:
        classes = [str(i) for i in range(1, 11)]
    return ImageDataset("stl10", split, images, y - 1, classes, d)


def load_tiny_imagenet(root: Path, split: str = "val") -> ImageDataset:
    if split == "test":
        raise DataError("tiny-imagenet: the test split has no released labels; use --split val (the default)")
    _check_split("tiny-imagenet", split)
    d = _find_dir(root, "tiny-imagenet-200", "wnids.txt", "tiny-imagenet")
    wnids = read_text_checked(d / "wnids.txt").split()
    if not wnids:
        raise DataError(f"{d / 'wnids.txt'} is empty; expected {LAYOUTS['tiny-imagenet']}")
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    if split == "val":
        ann = d / "val" / "val_annotations.txt"
        img_dir = d / "val" / "images"
        if not ann.is_file() or not img_dir.is_dir():
            raise DataError(f"{ann} or {img_dir} is missing; expected {LAYOUTS['tiny-imagenet']}")
        for n, line in enumerate(read_text_checked(ann).splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise DataError(
                    f"{ann}:{n}: expected 'FILE<TAB>WNID<TAB>x<TAB>y<TAB>w<TAB>h' with a wnid from wnids.txt"
                )
            p = img_dir / parts[0]
            if not p.is_file():
                raise DataError(f"{ann}:{n}: image {p} is missing")
            paths.append(p)
            labels.append(index[parts[1]])
    else:
        for w in wnids:
            folder = d / "train" / w / "images"
            if not folder.is_dir():
                raise DataError(f"{folder} is missing; expected {LAYOUTS['tiny-imagenet']}")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            paths += files
            labels += [index[w]] * len(files)
    if not paths:
        raise DataError(
            f"no images found for tiny-imagenet split {split} under {d}; expected {LAYOUTS['tiny-imagenet']}"
        )
    words = d / "words.txt"
    names = (
        dict(line.split("\t", 1) for line in read_text_checked(words).splitlines() if "\t" in line)
        if words.is_file()
        else {}
    )
    classes = [names.get(w, w).strip() for w in wnids]
    return ImageDataset("tiny-imagenet", split, paths, np.array(labels), classes, d)


def load_imagefolder(root: Path, split: str | None = None) -> ImageDataset:
    base = root / split if split else root
    if not base.is_dir():
        raise DataError(f"{base} is not a directory; imagefolder expects {LAYOUTS['imagefolder']}")
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    for c in class_dirs:
        files = sorted(p for p in c.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            continue
        classes.append(c.name)
        paths += files
        labels += [len(classes) - 1] * len(files)
    if not paths:
        raise DataError(
            f"no class sub-folders with images under {base}; imagefolder expects {LAYOUTS['imagefolder']}"
        )
    return ImageDataset("imagefolder", split, paths, np.array(labels), classes, base)


def load_digits_dataset(split: str = "all") -> ImageDataset:
    """sklearn's 1,797 8x8 grey digits (values 0..16) as uint8 RGB; preprocessing upsamples them.
    train/test: the first/second half, as in scikit-learn's own digits classification example."""
    _check_split("digits", split)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    half = len(labels) // 2
    sl = {"all": slice(None), "train": slice(0, half), "test": slice(half, None)}[split]
    return ImageDataset("digits", split, images[sl].copy(), labels[sl], [str(i) for i in range(10)], None)


def load_dataset(
    name: str, root: str | Path | None = None, split: str | None = None, *, coarse: bool = False
) -> ImageDataset:
    """Read data set `name` from `root` (its native release layout); split None -> the default split."""
    if name not in DATASETS:
        raise DataError(f"--dataset {name!r} is not known; choose one of {', '.join(DATASETS)}")
    split = split if split is not None else DEFAULT_SPLIT[name]
    if coarse and name != "cifar100":
        raise DataError("--coarse only applies to --dataset cifar100 (its 20 superclasses)")
    if name == "digits":
        return load_digits_dataset(split or "all")
    if root is None:
        raise DataError(f"--dataset {name} needs --data-root DIR with {LAYOUTS[name]}")
    root = Path(root)
    if name == "cifar10":
        return load_cifar10(root, split)
    if name == "cifar100":
        return load_cifar100(root, split, coarse=coarse)
    if name == "stl10":
        return load_stl10(root, split)
    if name == "tiny-imagenet":
        return load_tiny_imagenet(root, split)
    return load_imagefolder(root, split)


# ----------------------------------------------------------------------------------------- preprocessing

_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocess:
    """DINOv2 evaluation preprocessing: resize (shorter side to round(img_size*256/224), bicubic), centre
    crop img_size, scale to [0, 1], normalise with ImageNet mean/std. `resize="square"` resizes both sides
    to resize_size instead (no aspect-ratio keeping); resize_size=img_size then makes the crop a no-op."""

    img_size: int = 224
    resize: str = "shorter"  # "shorter" | "square"
    resize_size: int | None = None  # None -> round(img_size * 256 / 224)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.resize not in ("shorter", "square"):
            raise DataError(f"--resize {self.resize!r} is not valid; choose shorter or square")
        if self.interpolation not in _INTERP:
            raise DataError(
                f"--interpolation {self.interpolation!r} is not valid; choose one of {', '.join(_INTERP)}"
            )
        if self.img_size <= 0:
            raise DataError(f"--img-size must be positive, got {self.img_size}")
        if self.resize_size is not None and self.resize_size < self.img_size:
            raise DataError(
                f"--resize-size {self.resize_size} is smaller than --img-size {self.img_size}; the crop would not fit"
            )

    @property
    def effective_resize(self) -> int:
        return self.resize_size if self.resize_size is not None else round(self.img_size * 256 / 224)

    def to_dict(self) -> dict:
        return {
            "img_size": self.img_size,
            "resize": self.resize,
            "resize_size": self.effective_resize,
            "interpolation": self.interpolation,
            "crop": "center",
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def describe(self) -> str:
        side = "shorter side" if self.resize == "shorter" else "both sides"
        return (
            f"resize {side} to {self.effective_resize} px ({self.interpolation}), centre crop "
            f"{self.img_size}x{self.img_size}, scale to [0,1], normalise with mean {self.mean} std {self.std}"
        )

    def crop_image(self, img: Image.Image) -> Image.Image:
        """Resize + centre crop (the RGB picture the model sees, before normalisation)."""
        img = img.convert("RGB")
        s = self.effective_resize
        w, h = img.size
        if self.resize == "shorter":
            scale = s / min(w, h)
            new = (max(s, round(w * scale)), max(s, round(h * scale)))
        else:
            new = (s, s)
        if new != (w, h):
            img = img.resize(new, _INTERP[self.interpolation])
        w, h = img.size
        left = int(round((w - self.img_size) / 2.0))
        top = int(round((h - self.img_size) / 2.0))
        return img.crop((left, top, left + self.img_size, top + self.img_size))

    def __call__(self, img: Image.Image) -> np.ndarray:
        """PIL image -> float32 [3, img_size, img_size], normalised."""
        return self.normalize(np.asarray(self.crop_image(img)))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB [..., H, W, 3] (crop_image's pixels) -> float32 [..., 3, H, W]: scale to [0, 1] and
        normalise. __call__ is crop_image + normalize, so itae-embed can crop in its decoding tasks and
        normalise a whole batch in the model's worker with the same numbers."""
        arr = np.asarray(pixels, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(np.moveaxis(arr, -1, -3))

    def denormalize(self, x: np.ndarray) -> np.ndarray:
        """float [3, H, W] normalised -> uint8 [H, W, 3] (for drawing)."""
        img = x.transpose(1, 2, 0) * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def iter_batches(
    dataset: ImageDataset,
    preprocess: Preprocess,
    batch_size: int = 64,
    *,
    progress: bool = True,
    desc: str = "images",
    workers: int = 2,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (pixel_values float32 [B,3,S,S], indices) in data set order. Images are decoded and resized
    in a small thread pool (PIL releases the GIL while resizing); a tqdm bar shows progress."""
    from tqdm import tqdm

    if batch_size <= 0:
        raise DataError(f"--batch-size must be positive, got {batch_size}")
    n = len(dataset)

    def one(i: int) -> np.ndarray:
        return preprocess(dataset.load(i))

    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar,
    ):
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(n, start + batch_size))
            batch = np.stack(list(pool.map(one, idx.tolist())))
            bar.update(len(idx))
            yield batch, idx
