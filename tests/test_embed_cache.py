"""The embeddings cache (itae_export.embed.EmbeddingCache) writes through the output transaction."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np

from itae_export.embed import EmbeddingCache, file_digest
from itae_export.hashing import sha256_file
from itae_export.outputs import OutputTransaction

META = {"format": 1, "model": {"name": "m"}, "backend": {"backend": "torch"}, "itae": None,
        "data": {"dataset": "digits", "split": "all", "count": 3}}


def test_put_writes_both_files_and_nothing_else(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    npy = cache.put(META, emb)
    assert npy is not None and npy.parent == tmp_path / "cache"
    assert sorted(p.name for p in npy.parent.iterdir()) == [npy.with_suffix(".json").name, npy.name]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in npy.parent.iterdir())
    got, path = cache.get(META)
    np.testing.assert_array_equal(got, emb)
    assert path == npy
    # a second put replaces the entry (force), still nothing else left behind
    assert cache.put(META, emb + 1) == npy
    np.testing.assert_array_equal(cache.get(META)[0], emb + 1)
    assert len(os.listdir(npy.parent)) == 2


def test_put_leaves_an_entry_being_written_elsewhere_alone(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    js = cache.stem(META).with_suffix(".json")
    with OutputTransaction(js):  # another run is storing this very entry
        assert cache.put(META, np.zeros((3, 2), np.float32)) is None
    assert cache.get(META) == (None, None)
    assert os.listdir(tmp_path) == []


def test_no_cache_dir_writes_nothing(tmp_path: Path) -> None:
    assert EmbeddingCache(None).put(META, np.zeros((3, 2), np.float32)) is None


def test_file_digest_is_the_one_sha256(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(1000))
    d = file_digest(f)
    assert d == {"path": str(f.resolve()), "size": 1000, "sha256": sha256_file(f)}
    assert json.dumps(d)


def test_file_digest_refuses_a_folder(tmp_path: Path) -> None:
    import pytest

    from itae_export.errors import UsageError

    with pytest.raises(UsageError, match="is a folder"):
        file_digest(tmp_path)


def _fake_sharded_checkpoint(d: Path) -> list[Path]:
    """A transformers-shaped folder: config.json, the index and two shards (bytes only: digests only)."""
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 384}))
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for i, s in enumerate(shards):
        (d / s).write_bytes(os.urandom(100 + i))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1], "c.weight": shards[1]}}))
    (d / "README.md").write_text("not part of the weights")
    return [d / "config.json", d / "model.safetensors.index.json"] + [d / s for s in shards]


def test_weights_digest_of_a_sharded_transformers_folder_covers_config_index_and_shards(tmp_path: Path) -> None:
    from itae_export.embed import model_identity, weights_digest

    folder = tmp_path / "hf"
    files = _fake_sharded_checkpoint(folder)
    d = weights_digest(folder)
    assert d["format"] == "transformers" and d["path"] == str(folder.resolve())
    assert [f["path"] for f in d["files"]] == [str(f.resolve()) for f in files]
    assert [f["sha256"] for f in d["files"]] == [sha256_file(f) for f in files]
    assert d["size"] == sum(f.stat().st_size for f in files) and len(d["sha256"]) == 64
    ident = model_identity("dinov2_vits14", weights=folder, random_weights=False, seed=0, img_size=56)
    assert ident["weights"] == d and json.dumps(ident)
    # every file counts: a changed shard, a changed config give another identity; README does not
    (folder / "README.md").write_text("edited")
    assert weights_digest(folder)["sha256"] == d["sha256"]
    for f in (files[3], files[0]):
        before = weights_digest(folder)["sha256"]
        f.write_bytes(f.read_bytes() + b" ")
        assert weights_digest(folder)["sha256"] != before, f.name
    # a plain weights file keeps its file digest
    pth = tmp_path / "w.pth"
    pth.write_bytes(b"x" * 10)
    assert weights_digest(pth) == file_digest(pth)


def test_weights_digest_of_a_single_file_transformers_checkpoint(tmp_path: Path) -> None:
    from itae_export.embed import weights_digest

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    (folder / "model.safetensors").write_bytes(os.urandom(64))
    by_folder, by_file = weights_digest(folder), weights_digest(folder / "model.safetensors")
    names = [Path(f["path"]).name for f in by_folder["files"]]
    assert names == ["config.json", "model.safetensors"]
    assert by_file["sha256"] == by_folder["sha256"] and by_file["files"] == by_folder["files"]


def test_progress_bar_counts_images_embedded_not_decoded(monkeypatch) -> None:
    import tqdm

    from itae_export.data import Preprocess, load_dataset
    from itae_export.embed import Backend, compute_embeddings

    embedded: list[int] = []
    seen: list[tuple[int, int]] = []

    class Recorder(tqdm.tqdm):
        def update(self, n=1):
            if not self.disable:
                seen.append((self.n + n, sum(embedded)))  # (bar count after this update, images embedded)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Recorder)

    def run(x: np.ndarray) -> np.ndarray:
        embedded.append(len(x))
        return np.zeros((len(x), 3), np.float32)

    ds = load_dataset("digits").subset(10, 0)
    emb, _ = compute_embeddings(Backend("fake", "torch", run), ds, Preprocess(img_size=28), batch_size=4,
                                progress=True)
    assert emb.shape == (10, 3)
    assert seen == [(4, 4), (8, 8), (10, 10)]
