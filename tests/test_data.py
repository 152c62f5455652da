"""Data set readers on small files written here in each release's native format, wrong layouts, and
the DINOv2 preprocessing."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itae_export.data import Preprocess, iter_batches, load_dataset
from itae_export.errors import DataError


def _rng_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    # The release stores [N, 3072]: the red plane row by row, then green, then blue.
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


# ----------------------------------------------------------------------------------------- CIFAR


def test_cifar10_reads_test_batch_and_names(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    imgs = _rng_images(5, 32, 32)
    labels = [3, 1, 4, 1, 5]
    with open(d / "test_batch", "wb") as f:
        pickle.dump(
            {b"data": _cifar_rows(imgs), b"labels": labels, b"batch_label": b"testing batch 1 of 1"}, f
        )
    names = [f"class{i}".encode() for i in range(10)]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)

    for root in (tmp_path, d):  # the parent folder or the batches folder itself
        ds = load_dataset("cifar10", root)
        assert ds.split == "test" and len(ds) == 5 and ds.num_classes == 10
        np.testing.assert_array_equal(ds.labels, labels)
        np.testing.assert_array_equal(np.asarray(ds.load(2)), imgs[2])
        assert ds.classes[3] == "class3"


def test_cifar10_train_split_concatenates_five_batches(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": _cifar_rows(_rng_images(2, 32, 32, seed=i)), b"labels": [i, i]}, f)
    ds = load_dataset("cifar10", tmp_path, "train")
    assert len(ds) == 10
    np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(1, 6), 2))
    np.testing.assert_array_equal(np.asarray(ds.load(9)), _rng_images(2, 32, 32, seed=5)[1])


def test_cifar100_fine_by_default_coarse_as_option(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    imgs = _rng_images(4, 32, 32, seed=7)
    with open(d / "test", "wb") as f:
        pickle.dump(
            {b"data": _cifar_rows(imgs), b"fine_labels": [99, 0, 42, 7], b"coarse_labels": [19, 4, 0, 3]}, f
        )
    with open(d / "meta", "wb") as f:
        pickle.dump(
            {
                b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
            },
            f,
        )
    fine = load_dataset("cifar100", tmp_path)
    assert fine.num_classes == 100 and fine.classes[42] == "f42"
    np.testing.assert_array_equal(fine.labels, [99, 0, 42, 7])
    assert "fine" in fine.describe()["labels"]
    coarse = load_dataset("cifar100", tmp_path, coarse=True)
    assert coarse.num_classes == 20
    np.testing.assert_array_equal(coarse.labels, [19, 4, 0, 3])
    np.testing.assert_array_equal(np.asarray(coarse.load(3)), imgs[3])


def test_cifar_wrong_layouts_name_the_expected_one(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("cifar10", tmp_path / "missing")
    # A CIFAR-100 file where CIFAR-10 is expected.
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]}, f)
    with pytest.raises(DataError, match="no 'labels' entry"):
        load_dataset("cifar10", tmp_path)
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR python pickle batch"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(DataError, match="needs --data-root"):
        load_dataset("cifar10", None)


# ---------------------------------------------------------------------------------------- STL-10


def _write_stl(d: Path, split: str, imgs: np.ndarray, labels: list[int]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    # Column-major per image: channel, then column, then row (row varies fastest).
    imgs.transpose(0, 3, 2, 1).astype(np.uint8).tofile(d / f"{split}_X.bin")
    np.asarray(labels, np.uint8).tofile(d / f"{split}_y.bin")


def test_stl10_binary_column_major_and_labels_from_one(tmp_path: Path) -> None:
    imgs = _rng_images(3, 96, 96, seed=3)
    imgs[1, 3, 10] = (255, 0, 7)  # a pixel at row 3, column 10: a transposed read would move it
    _write_stl(tmp_path / "stl10_binary", "test", imgs, [1, 10, 5])
    (tmp_path / "stl10_binary" / "class_names.txt").write_text("\n".join(f"n{i}" for i in range(10)) + "\n")
    ds = load_dataset("stl10", tmp_path)
    assert len(ds) == 3 and ds.classes[9] == "n9"
    np.testing.assert_array_equal(ds.labels, [0, 9, 4])
    got = np.asarray(ds.load(1))
    np.testing.assert_array_equal(got, imgs[1])
    assert tuple(got[3, 10]) == (255, 0, 7)


def test_stl10_wrong_layouts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="stl10_binary"):
        load_dataset("stl10", tmp_path)
    d = tmp_path / "stl10_binary"
    d.mkdir()
    (d / "test_X.bin").write_bytes(b"\x00" * 1000)
    np.asarray([1], np.uint8).tofile(d / "test_y.bin")
    with pytest.raises(DataError, match="multiple of 3\\*96\\*96"):
        load_dataset("stl10", tmp_path)
    _write_stl(d, "test", _rng_images(2, 96, 96), [1, 11])
    with pytest.raises(DataError, match="1..10"):
        load_dataset("stl10", tmp_path)
    with pytest.raises(DataError, match="not available"):
        load_dataset("stl10", tmp_path, "unlabeled")


# --------------------------------------------------------------------------------- Tiny ImageNet


def _write_tiny(root: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    d = root / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (d / "words.txt").write_text(
        "n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n"
    )
    pixels = {}
    lines = []
    for i, w in enumerate([wnids[2], wnids[0], wnids[1], wnids[0]]):
        arr = np.full((64, 64, 3), 40 * i, np.uint8)
        name = f"val_{i}.JPEG"
        Image.fromarray(arr).save(d / "val" / "images" / name, format="PNG")  # lossless: the bytes decide
        pixels[name] = arr
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    for w in wnids:
        (d / "train" / w / "images").mkdir(parents=True)
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(
            d / "train" / w / "images" / f"{w}_0.JPEG", format="PNG"
        )
    return wnids, pixels


def test_tiny_imagenet_val_annotations(tmp_path: Path) -> None:
    wnids, pixels = _write_tiny(tmp_path)
    ds = load_dataset("tiny-imagenet", tmp_path)
    assert ds.split == "val" and len(ds) == 4 and ds.num_classes == 3
    np.testing.assert_array_equal(ds.labels, [2, 0, 1, 0])
    assert ds.classes[0].startswith("goldfish") and ds.classes[2] == "n01641577"  # words.txt lacks it
    np.testing.assert_array_equal(np.asarray(ds.load(3)), pixels["val_3.JPEG"])
    train = load_dataset("tiny-imagenet", tmp_path / "tiny-imagenet-200", "train")
    assert len(train) == 3
    np.testing.assert_array_equal(train.labels, [0, 1, 2])


def test_tiny_imagenet_wrong_layouts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="wnids.txt"):
        load_dataset("tiny-imagenet", tmp_path)
    _write_tiny(tmp_path)
    with pytest.raises(DataError, match="no released labels"):
        load_dataset("tiny-imagenet", tmp_path, "test")
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="val_annotations.txt:1"):
        load_dataset("tiny-imagenet", tmp_path)
    ann.unlink()
    with pytest.raises(DataError, match="tiny-imagenet-200"):
        load_dataset("tiny-imagenet", tmp_path)


# -------------------------------------------------------------------------------- ImageFolder


def test_imagefolder_classes_sorted_and_split(tmp_path: Path) -> None:
    for split in ("test", "train"):
        for cls, n in (("dog", 2), ("cat", 1), ("empty", 0)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((20, 30, 3), 9 * i, np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    (tmp_path / "test" / "dog" / "notes.txt").write_text("ignored")
    ds = load_dataset("imagefolder", tmp_path, "test")
    assert ds.classes == ["cat", "dog"]  # folders without images are not classes
    np.testing.assert_array_equal(ds.labels, [0, 1, 1])
    assert np.asarray(ds.load(1)).shape == (20, 30, 3)
    assert len(load_dataset("imagefolder", tmp_path / "train")) == 3


def test_imagefolder_wrong_layout(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="one sub-folder per class"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(DataError, match="is not a directory"):
        load_dataset("imagefolder", tmp_path, "val")


# ------------------------------------------------------------------------------------- digits


def test_digits_bundled_grey_to_rgb_and_splits() -> None:
    ds = load_dataset("digits")
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.split == "all"
    img = np.asarray(ds.load(0))
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8
    assert (img[..., 0] == img[..., 2]).all() and np.asarray(ds.images).max() == 255  # grey, 0..16 -> 0..255
    test, train = load_dataset("digits", split="test"), load_dataset("digits", split="train")
    assert len(test) + len(train) == 1797
    np.testing.assert_array_equal(np.concatenate([train.labels, test.labels]), ds.labels)
    sub = ds.subset(200, seed=1)
    assert len(sub) == 200 and len(set(sub.labels.tolist())) == 10
    np.testing.assert_array_equal(sub.labels, ds.subset(200, seed=1).labels)
    assert sub.describe()["subset"] == {"limit": 200, "seed": 1, "of": 1797}
    with pytest.raises(DataError, match="--dataset 'nope'"):
        load_dataset("nope")


# ------------------------------------------------------------------------------- preprocessing


def test_preprocess_resize_shorter_side_crop_and_normalise() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(30, 45, 3), dtype=np.uint8)  # H=30, W=45
    pre = Preprocess(img_size=28)
    assert pre.effective_resize == 32  # round(28 * 256 / 224)
    x = pre(Image.fromarray(arr))
    assert x.shape == (3, 28, 28) and x.dtype == np.float32
    # By hand: shorter side 30 -> 32 keeps the aspect (45 -> 48), bicubic, then the centre 28x28.
    manual = np.asarray(Image.fromarray(arr).resize((48, 32), Image.Resampling.BICUBIC))[2:30, 10:38]
    want = (manual / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x, want.transpose(2, 0, 1), atol=1e-5)
    np.testing.assert_array_equal(pre.denormalize(x), manual)
    sq = Preprocess(img_size=28, resize="square", resize_size=28)(Image.fromarray(arr))
    assert sq.shape == (3, 28, 28) and not np.allclose(sq, x)
    assert "bicubic" in pre.describe() and pre.to_dict()["resize_size"] == 32
    with pytest.raises(DataError, match="--resize-size"):
        Preprocess(img_size=28, resize_size=20)


def test_iter_batches_keeps_order() -> None:
    ds = load_dataset("digits").subset(10)
    pre = Preprocess(img_size=14)
    seen = []
    for x, idx in iter_batches(ds, pre, batch_size=4, progress=False):
        assert x.shape[1:] == (3, 14, 14)
        np.testing.assert_array_equal(x, np.stack([pre(ds.load(i)) for i in idx]))
        seen += idx.tolist()
    assert seen == list(range(10))
