"""itae-cluster: faiss k-means over an itae-embed folder (written here with the shard writer and
known embeddings, so no Ray is needed), metrics against labels, --compare, --levels, refusals, and the
gallery looked at in a real browser (headless Chromium)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from PIL import Image  # noqa: E402

from itae_export.collection_cluster import ClusterRequest, cluster  # noqa: E402
from itae_export.errors import DataError, OutputExistsError, UsageError  # noqa: E402
from itae_export.shards import FORMAT, n_shards, write_manifest, write_shard  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 80, 230)]


def fake_run(out: Path, src: Path, emb: np.ndarray, paths: list[str], digest: str = "d" * 64,
             shard_size: int = 8) -> Path:
    """An itae-embed folder holding `emb` for `paths` (a folder SOURCE), through the real writers."""
    manifest = {"format": FORMAT, "model": {"digest": digest, "path": "model.onnx"}, "shard_size": shard_size,
                "source": {"kind": "folder", "location": str(src), "column": None, "count": len(paths)},
                "preprocessing": {}}
    write_manifest(out, manifest, paths, [])
    for s in range(n_shards(len(paths), shard_size)):
        sl = slice(s * shard_size, (s + 1) * shard_size)
        idx = list(range(len(paths)))[sl]
        write_shard(out, s, digest, {"index": idx, "path": paths[sl], "embedding": emb[sl]},
                    {"index": [], "path": [], "reason": []})
    return out


@pytest.fixture
def collection(tmp_path):
    """Three classes of coloured images (ImageFolder layout) with embeddings in three tight groups."""
    rng = np.random.default_rng(0)
    src = tmp_path / "photos"
    paths, labels = [], []
    for c, colour in enumerate(COLOURS):
        (src / f"class{c}").mkdir(parents=True)
        for i in range(10):
            arr = np.clip(np.asarray(colour) + rng.integers(-30, 30, (48, 64, 3)), 0, 255).astype(np.uint8)
            p = src / f"class{c}" / f"{i:02d}.png"
            Image.fromarray(arr).save(p)
            paths.append(str(p))
            labels.append(c)
    order = np.argsort(paths)
    paths = [paths[i] for i in order]
    labels = np.asarray(labels)[order]
    centres = rng.standard_normal((3, 32)).astype(np.float32) * 4
    emb = centres[labels] + 0.05 * rng.standard_normal((len(paths), 32)).astype(np.float32)
    run = fake_run(tmp_path / "emb", src, emb, paths)
    return run, paths, labels, emb


def test_cluster_writes_assignments_centroids_sheets_and_metrics(collection, tmp_path):
    from itae_export.cluster import clustering_metrics

    run, paths, labels, emb = collection
    res = cluster(ClusterRequest(run, tmp_path / "out", 3, labels="folders", sheet_images=4, nredo=3,
                                 progress=False))
    t = pq.read_table(tmp_path / "out" / "assignments.parquet")
    assert t.column("path").to_pylist() == paths
    assigned = np.asarray(t.column("cluster").to_pylist())
    cent = np.load(tmp_path / "out" / "centroids.npy")
    assert cent.shape == (3, 32) and np.allclose(np.linalg.norm(cent, axis=1), 1, atol=1e-5)  # spherical
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d = ((unit[:, None] - cent[None]) ** 2).sum(-1)
    assert np.array_equal(assigned, d.argmin(1))
    assert np.allclose(t.column("distance").to_numpy(), d.min(1), atol=1e-5)
    expect = clustering_metrics(labels, assigned)
    assert res.metrics["acc"] == pytest.approx(expect["acc"]) and res.metrics["acc"] == 1.0
    assert res.metrics["labelled"] == 30 and res.metrics["classes"] == 3
    assert sorted(res.sizes.tolist()) == [10, 10, 10]
    html = (tmp_path / "out" / "index.html").read_text()
    for c in range(3):
        sheet = tmp_path / "out" / f"cluster-{c:05d}.png"
        with Image.open(sheet) as im:
            assert im.size == (2 + 2 * 98, 2 + 2 * 98)  # 4 thumbnails of 96 px, 2 px gaps
            mean = np.asarray(im.convert("RGB"), float)[10:90, 10:90].mean((0, 1))
        assert int(np.argmax(mean)) == int(np.argmax(COLOURS[labels[assigned == c][0]]))  # its own pictures
        assert f'href="cluster-{c:05d}.png"' in html and f"cluster {c}: 10 images" in html
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".itae-")]


def test_levels_and_compare(collection, tmp_path):
    run, paths, labels, emb = collection
    res = cluster(ClusterRequest(run, tmp_path / "h", (6, 3), progress=False))
    t = pq.read_table(tmp_path / "h" / "assignments.parquet").to_pydict()
    parent = {}
    for a, b in zip(t["level_1"], t["level_2"], strict=True):
        assert parent.setdefault(a, b) == b  # a level-1 cluster lies inside one top cluster
    assert t["cluster"] == t["level_2"] and len(res.sizes) == 3 and len(set(t["level_1"])) <= 6
    perm = np.random.default_rng(1).permutation(32)
    other = fake_run(tmp_path / "emb2", Path(paths[0]).parents[1], emb[:, perm] * 2.0, paths, digest="e" * 64)
    res = cluster(ClusterRequest(run, tmp_path / "c", 3, compare=other, progress=False))
    assert res.compare["ari"] == pytest.approx(1.0) and res.compare["common"] == 30
    noisy = fake_run(tmp_path / "emb3", Path(paths[0]).parents[1],
                     np.random.default_rng(2).standard_normal(emb.shape).astype(np.float32), paths, digest="f" * 64)
    res = cluster(ClusterRequest(run, tmp_path / "n", 3, compare=noisy, progress=False))
    assert res.compare["ari"] < 0.5


def test_refusals_leave_nothing_behind(collection, tmp_path):
    run, paths, *_ = collection
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"--k 31 exceeds the number of embedded images .* \(30\)"):
        cluster(ClusterRequest(run, out, 31))
    with pytest.raises(UsageError, match="each level must have at most as many clusters"):
        cluster(ClusterRequest(run, out, (3, 6)))
    with pytest.raises(DataError, match="is not an itae-embed output folder"):
        cluster(ClusterRequest(tmp_path / "photos", out, 3))
    (run / "shards" / "shard-00001.parquet").rename(tmp_path / "moved.parquet")
    with pytest.raises(DataError, match="incomplete: 1 of 4 shards are missing"):
        cluster(ClusterRequest(run, out, 3))
    assert not out.exists()
    (tmp_path / "moved.parquet").rename(run / "shards" / "shard-00001.parquet")
    cluster(ClusterRequest(run, out, 3, progress=False))
    with pytest.raises(OutputExistsError, match="pass --force"):
        cluster(ClusterRequest(run, out, 3))


def test_cli_levels_must_match_k(collection, tmp_path, capsys):
    from itae_export.cli.cluster_cmd import cluster_main

    run, *_ = collection
    assert cluster_main([str(run), "--k", "6,3", "--out", str(tmp_path / "o")]) == 2
    assert "--levels 1 needs 1 comma-separated --k values" in capsys.readouterr().err
    assert cluster_main([str(run), "--k", "6,3", "--levels", "2", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert (tmp_path / "o" / "index.html").is_file()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless Chromium (/usr/bin/chromium: apt-get install chromium)")
def test_gallery_renders_in_chromium(collection, tmp_path):
    run, *_ = collection
    cluster(ClusterRequest(run, tmp_path / "out", 3, sheet_images=9, progress=False))
    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        r = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                            "--no-first-run", "--disable-background-networking", "--disable-component-update",
                            "--disable-sync", f"--user-data-dir={profile}", "--window-size=1000,700",
                            f"--screenshot={shot}", (tmp_path / "out" / "index.html").as_uri()],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": profile})
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert shot.is_file(), r.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    assert px.shape[:2] == (700, 1000)
    # the three sheets were loaded and drawn: strongly red, green and blue pixels are all on the page
    for ch in range(3):
        others = [o for o in range(3) if o != ch]
        strong = (px[..., ch] > 150) & (px[..., others[0]] < 110) & (px[..., others[1]] < 110)
        assert strong.sum() > 2000, f"colour channel {ch}: the contact sheets did not render"


def test_every_option_of_the_new_commands_has_help():
    import argparse

    from itae_export.cli.cluster_cmd import cluster_parser
    from itae_export.cli.embed_cmd import embed_parser

    for parser in (embed_parser(), cluster_parser()):
        missing = [a.dest for a in parser._actions  # noqa: SLF001 - walking the parser is the point
                   if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
        assert not missing, f"{parser.prog}: options without help: {missing}"
        assert "docs/collections.md" in parser.format_help()


def test_labels_file_csv_tsv_and_parquet(collection, tmp_path):
    run, paths, labels, _ = collection
    names = [f"colour{c}" for c in labels]
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{n}\n" for p, n in zip(paths, names, strict=True)))
    tsv = tmp_path / "photos" / "labels.tsv"  # relative paths, relative to the file
    tsv.write_text("".join(f"{Path(p).relative_to(tsv.parent)}\t{n}\n" for p, n in zip(paths[:12], names[:12], strict=True)))
    pq.write_table(pa.table({"path": paths, "label": names}), tmp_path / "labels.parquet")
    got = {}
    for f in (csv, tsv, tmp_path / "labels.parquet"):
        got[f.suffix] = cluster(ClusterRequest(run, tmp_path / f"o{f.suffix}", 3, labels=f, progress=False)).metrics
    assert got[".csv"]["labelled"] == 30 and got[".csv"]["acc"] == 1.0 and got[".parquet"] == got[".csv"] | {
        "labels": str(tmp_path / "labels.parquet")}
    assert got[".tsv"]["labelled"] == 12
    bad = tmp_path / "bad.csv"
    bad.write_text("just-a-path\n")
    with pytest.raises(UsageError, match="every line must be path,label"):
        cluster(ClusterRequest(run, tmp_path / "o-bad", 3, labels=bad))
    (tmp_path / "none.csv").write_text("/nowhere/x.png,a\n")
    with pytest.raises(DataError, match="names none of the embedded images"):
        cluster(ClusterRequest(run, tmp_path / "o-none", 3, labels=tmp_path / "none.csv", progress=False))
    assert not (tmp_path / "o-bad").exists() and not (tmp_path / "o-none").exists()
