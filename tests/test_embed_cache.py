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
