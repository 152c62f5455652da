"""itae-embed on Ray Data: exactness against single-process ONNX Runtime, bad images in failed.parquet,
the source kinds, resuming after the driver is killed, an actor killed mid-run, clean refusals.

One local Ray session serves the whole module (starting Ray takes seconds); the driver-kill test runs
the CLI in a subprocess with its own Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from PIL import Image  # noqa: E402

from itae_export.collection_embed import EmbedRequest, embed  # noqa: E402
from itae_export.errors import DataError, MissingDependencyError, UsageError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local():
    from itae_export.collection_ray import RaySettings, ray_session

    with ray_session(RaySettings(num_cpus=3, workers=2)):
        yield


def make_images(root: Path, n: int, seed: int = 0, classes=("cats", "dogs")) -> list[Path]:
    """n images per class of varied sizes and formats, some in nested folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for ci, c in enumerate(classes):
        for i in range(n):
            folder = root / c / ("deep" if i % 3 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            base = np.full((h, w, 3), 60 + 120 * ci, dtype=np.uint8)
            arr = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            ext = (".png", ".jpg", ".webp")[i % 3]
            p = folder / f"img{i:03d}{ext}"
            Image.fromarray(arr).save(p)
            paths.append(p)
    return sorted(paths, key=str)


def reference(model: Path, paths: list[Path]) -> np.ndarray:
    """Single-process ONNX Runtime on itae-eval's preprocessing (data.Preprocess), image by image."""
    from itae_export.data import Preprocess
    from itae_export.runtime import OrtRunner
    from itae_export.safe_io import open_image_rgb

    pre = Preprocess(img_size=56)
    runner = OrtRunner(str(model))
    return np.concatenate([runner.run(pre(open_image_rgb(p))[None]) for p in paths])


def read_rows(out: Path) -> tuple[list[str], np.ndarray, pa.Table]:
    t = pa.concat_tables([pq.read_table(p) for p in sorted((out / "shards").glob("shard-?????.parquet"))])
    emb = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(), np.float32).reshape(t.num_rows, -1)
    return t.column("path").to_pylist(), emb, t


def tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("workers", [1, 2])
def test_distributed_embeddings_equal_single_process_ort(ray_local, collection_models, tmp_path, workers):
    paths = make_images(tmp_path / "src", 7)
    import itae_export

    res = itae_export.embed(tmp_path / "src", collection_models[0], tmp_path / "out", workers=workers, batch_size=4,
                            shard_size=8, progress=False)
    got_paths, emb, table = read_rows(tmp_path / "out")
    assert got_paths == [str(p) for p in paths]  # sorted listing, every row once
    assert table.column("index").to_pylist() == list(range(len(paths)))
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    assert set(table.column("model_digest").to_pylist()) == {res.model.digest}
    ref = reference(collection_models[0], paths)
    assert emb.shape == ref.shape and float(np.abs(emb - ref).max()) <= 1e-5
    assert res.embedded == len(paths) and res.failed == 0 and res.shards == 2
    assert pq.read_table(tmp_path / "out" / "failed.parquet").num_rows == 0
    if workers == 2:  # the folder goes on to itae-cluster, through the package-level API
        import itae_export

        cl = itae_export.cluster(tmp_path / "out", tmp_path / "clusters", 2, labels="folders", progress=False)
        assert cl.metrics["labelled"] == len(paths) and cl.metrics["classes"] == 2 and sum(cl.sizes) == len(paths)
        assert (tmp_path / "clusters" / "index.html").is_file()


def test_openvino_ir_embeds_on_ray_like_its_single_process_runner(ray_local, tmp_path):
    """An itae-export OpenVINO IR (fp32) as itae-embed's model: the actors' rows equal OpenVinoRunner
    on the same preprocessing, one process, image by image."""
    import itae_export
    from itae_export.data import Preprocess
    from itae_export.ov_runner import OpenVinoRunner
    from itae_export.safe_io import open_image_rgb

    xml = tmp_path / "m.xml"
    itae_export.export("dinov2_vits14", xml, random_weights=True, seed=2, depth=1, img_size=56,
                       exporter="torchscript", precision="fp32", validate_batch=2, fast_path_eval_images=20)
    paths = make_images(tmp_path / "src", 3)
    res = itae_export.embed(tmp_path / "src", xml, tmp_path / "out", workers=1, batch_size=4, progress=False)
    got_paths, emb, _ = read_rows(tmp_path / "out")
    runner, pre = OpenVinoRunner(xml), Preprocess(img_size=56)
    ref = np.concatenate([runner.run(pre(open_image_rgb(p))[None]) for p in paths])
    assert got_paths == [str(p) for p in paths] and res.embedded == len(paths)
    assert float(np.abs(emb - ref).max()) <= 1e-5


def test_bad_images_are_listed_in_failed_parquet(ray_local, collection_models, tmp_path):
    good = make_images(tmp_path / "src", 3)
    src = tmp_path / "src" / "cats"
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    png = (good[0]).read_bytes()
    (src / "truncated.png").write_bytes(png[: len(png) // 2])
    (src / "zero.png").write_bytes(b"")
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(src / "huge.png")  # over --max-pixels below
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(src / "heavy.bmp")
    (tmp_path / "elsewhere.png").write_bytes(png)
    (src / "link.png").symlink_to(tmp_path / "elsewhere.png")  # a readable image, but outside SOURCE
    res = embed(EmbedRequest(tmp_path / "src", collection_models[0], tmp_path / "out", batch_size=4, shard_size=4,
                             max_pixels=200 * 200, max_image_bytes=40_000, progress=False))
    failed = pq.read_table(tmp_path / "out" / "failed.parquet").to_pylist()
    reasons = {Path(r["path"]).name: r["reason"] for r in failed}
    assert set(reasons) == {"corrupt.jpg", "truncated.png", "zero.png", "huge.png", "heavy.bmp", "link.png"}
    assert "outside the SOURCE folder" in reasons["link.png"]
    assert "not a readable" in reasons["corrupt.jpg"]
    assert "truncated" in reasons["truncated.png"]
    assert "empty (0 bytes)" in reasons["zero.png"]
    assert "300x300 pixels, over the 40000-pixel limit" in reasons["huge.png"]
    assert "over the 40000-byte limit" in reasons["heavy.bmp"]
    got, emb, _ = read_rows(tmp_path / "out")
    assert got == [str(p) for p in good] and res.failed == 6 and res.embedded == len(good)
    assert float(np.abs(emb - reference(collection_models[0], good)).max()) <= 1e-5


def test_text_and_parquet_sources(ray_local, collection_models, tmp_path):
    paths = make_images(tmp_path / "src", 3)
    ref = reference(collection_models[0], paths)
    lst = tmp_path / "list.txt"
    lst.write_text("# images\n" + "\n".join(os.path.relpath(p, tmp_path) for p in reversed(paths)) + "\n\n")
    pq.write_table(pa.table({"path": [str(p) for p in paths]}), tmp_path / "paths.parquet")
    blobs = [p.read_bytes() for p in paths] + [b"not an image"]
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary())}), tmp_path / "bytes.parquet", row_group_size=2)
    for name, src in (("txt", lst), ("pq", tmp_path / "paths.parquet"), ("bytes", tmp_path / "bytes.parquet")):
        res = embed(EmbedRequest(src, collection_models[0], tmp_path / name, batch_size=2, shard_size=4,
                                 workers=1, progress=False))
        got, emb, _ = read_rows(tmp_path / name)
        assert float(np.abs(emb - ref).max()) <= 1e-5, name
        if name == "bytes":
            assert got == [f"{src}#{i}" for i in range(len(paths))] and res.failed == 1
        else:
            assert got == [str(p) for p in paths] and res.failed == 0


# ------------------------------------------------------------------------------------------ faults


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "itae_export.cli.embed_cmd", *args, "--no-progress",
                             "--num-cpus", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def test_driver_killed_mid_run_then_rerun_gives_the_uninterrupted_result(ray_local, collection_models, tmp_path):
    make_images(tmp_path / "src", 12)
    args = [str(tmp_path / "src"), "--model", str(collection_models[0]), "--batch-size", "2", "--shard-size", "2",
            "--workers", "1"]
    proc = _cli([*args, "--out", str(tmp_path / "killed")])
    first = tmp_path / "killed" / "shards" / "shard-00000.parquet"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    done = len(list((tmp_path / "killed" / "shards").glob("shard-?????.parquet")))
    assert 1 <= done < 12, f"the kill should land mid-run ({done} of 12 shards were done)"
    assert not (tmp_path / "killed" / "summary.json").exists()
    res = embed(EmbedRequest(tmp_path / "src", collection_models[0], tmp_path / "killed", batch_size=2,
                             shard_size=2, workers=1, progress=False))
    assert res.resumed_shards == done
    embed(EmbedRequest(tmp_path / "src", collection_models[0], tmp_path / "clean", batch_size=2, shard_size=2,
                       workers=1, progress=False))
    p1, e1, _ = read_rows(tmp_path / "killed")
    p2, e2, _ = read_rows(tmp_path / "clean")
    assert p1 == p2 and len(set(p1)) == 24 and np.array_equal(e1, e2)
    assert not [n for n in tree(tmp_path / "killed") if ".itae-" in n]  # the dead run's staging is swept


def _embed_workers() -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "EmbedWorker" in cmd and "MapWorker" in cmd:
            out.append(p)
    return out


def test_actor_killed_mid_run_loses_and_duplicates_nothing(ray_local, collection_models, tmp_path):
    pytest.importorskip("psutil")
    paths = make_images(tmp_path / "src", 20)
    out = tmp_path / "out"
    killed: list[int] = []  # shards done when an actor was killed

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            workers = _embed_workers()
            if workers and (out / "shards" / "shard-00001.parquet").exists():
                workers[0].kill()
                killed.append(len(list((out / "shards").glob("shard-?????.parquet"))))
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = embed(EmbedRequest(tmp_path / "src", collection_models[0], out, batch_size=2, shard_size=2, workers=2,
                             progress=False))
    t.join(5)
    assert killed, "no EmbedWorker actor was found to kill"
    assert killed[0] < 20, f"the kill should land mid-run ({killed[0]} of 20 shards were done)"
    got, emb, _ = read_rows(out)
    assert got == [str(p) for p in paths] and res.embedded == 40 and res.failed == 0
    assert float(np.abs(emb - reference(collection_models[0], paths)).max()) <= 1e-5


# ------------------------------------------------------------------------------------------ refusals


def test_refusals_leave_nothing_behind(ray_local, collection_models, exported, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="lists no images"):
        embed(EmbedRequest(tmp_path / "empty", collection_models[0], out))
    make_images(tmp_path / "src", 2)
    plain = exported("plain", "torchscript")  # a bare torch.onnx export: no itae-export metadata
    with pytest.raises(UsageError, match="is not an itae-export artifact"):
        embed(EmbedRequest(tmp_path / "src", plain, out))
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 16)
    with pytest.raises(UsageError, match="is not an itae-export artifact.*no sidecar m.engine.json"):
        embed(EmbedRequest(tmp_path / "src", engine, out))
    assert not out.exists()
    embed(EmbedRequest(tmp_path / "src", collection_models[0], out, batch_size=2, shard_size=2, progress=False))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match="holds shards of another model"):
        embed(EmbedRequest(tmp_path / "src", collection_models[1], out, batch_size=2, shard_size=2))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(UsageError, match="another --shard-size"):
        embed(EmbedRequest(tmp_path / "src", collection_models[0], out, batch_size=2, shard_size=4))
    from itae_export.errors import OutputBusyError
    from itae_export.outputs import OutputTransaction

    with OutputTransaction(out / "summary.json", force=True), pytest.raises(OutputBusyError):  # another run's claim
        embed(EmbedRequest(tmp_path / "src", collection_models[0], out, batch_size=2, shard_size=2))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_refusal_is_one_line(collection_models, tmp_path):
    from itae_export.cli.embed_cmd import embed_main

    r = subprocess.run([sys.executable, "-c", f"from itae_export.cli.embed_cmd import embed_main; "
                        f"raise SystemExit(embed_main([{str(tmp_path / 'nothing')!r}, '--model', "
                        f"{str(collection_models[0])!r}, '--out', {str(tmp_path / 'o')!r}]))"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists() and callable(embed_main)


def test_without_the_scale_extra_the_commands_say_what_to_install(monkeypatch, tmp_path):
    from itae_export.collection_cluster import ClusterRequest, cluster

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"needs ray, which is not installed; run pip install 'itae-export\[scale\]'"):
        embed(EmbedRequest(tmp_path, tmp_path / "m.onnx", tmp_path / "o"))
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MissingDependencyError, match="itae-cluster needs ray, faiss"):
        cluster(ClusterRequest(tmp_path, tmp_path / "o", 2))
    assert not (tmp_path / "o").exists()


def test_model_suffixes_map_to_their_backends(tmp_path):
    from itae_export.collection_model import backend_for, resolve_model

    assert backend_for("a/m.onnx") == "onnxruntime"
    assert backend_for("m.engine") == backend_for("m.PLAN") == "tensorrt"
    assert backend_for("ir/model.xml") == "openvino"
    with pytest.raises(UsageError, match="unknown model type '.pt'"):
        backend_for("m.pt")
    xml = tmp_path / "model.xml"
    xml.write_text("<net/>")
    (tmp_path / "model.xml.json").write_text('{"model": "dinov2_vits14", "img_size": 112, "itae": null}')
    m = resolve_model(xml)
    assert (m.backend, m.img_size, m.name) == ("openvino", 112, "dinov2_vits14")
    with pytest.raises(UsageError, match="--img-size 56 differs from the 112 px"):
        resolve_model(xml, img_size=56)
    from itae_export.collection_model import _image_size

    bounds = {"min": 56, "max": 224, "multiple": 14}  # a dynamic-size artifact admits sizes within its bounds
    assert _image_size(xml, 112, 168, bounds) == 168 and _image_size(xml, 112, None, bounds) == 112
    with pytest.raises(UsageError, match="--img-size 170 differs"):
        _image_size(xml, 112, 170, bounds)


def test_package_names_embed_and_cluster_are_the_api_functions():
    import itae_export
    from itae_export.embed import file_digest  # the module is still importable by name

    assert callable(itae_export.embed) and callable(itae_export.cluster) and callable(file_digest)
    assert itae_export.embed.__module__ == "itae_export.api"


# ------------------------------------------------------------------------------- itae-eval on Ray


def test_itae_eval_runs_exported_backends_on_the_ray_pipeline(ray_local, exported, tmp_path, capsys, monkeypatch):
    """--ray-workers: the ONNX backend's embeddings come from the Ray pipeline, equal to in-process ORT
    (the in-memory digits go through the object store; an ImageFolder through its paths)."""
    import json

    import itae_export.collection_dataset as cd
    from itae_export.cli.eval_cmd import eval_main
    from itae_export.collection_dataset import dataset_model, ray_embed_dataset
    from itae_export.collection_ray import RaySettings
    from itae_export.data import Preprocess, load_dataset
    from itae_export.embed import compute_embeddings, onnx_backend

    base = exported("plain", "torchscript")
    pre = Preprocess(img_size=56)
    make_images(tmp_path / "folder", 3)
    for ds in (load_dataset("digits").subset(24), load_dataset("imagefolder", tmp_path / "folder")):
        ref, _ = compute_embeddings(onnx_backend(base), ds, pre, batch_size=8, progress=False)
        got, _ = ray_embed_dataset(dataset_model(base, "onnxruntime", 56), ds, pre, RaySettings(workers=2, batch_size=8),
                                   progress=False)
        assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= 1e-5, ds.name
    argv = ["dinov2_vits14", "--random-weights", "--depth", "2", "--img-size", "56", "--dataset", "digits", "--limit",
            "40", "--no-progress", "--n-init", "2", "--onnx-baseline", str(base), "--ray-workers", "2", "--viz",
            "0", "--report-dir", str(tmp_path / "report")]
    calls = []
    monkeypatch.setattr(cd, "ray_embed_dataset", lambda *a, **k: calls.append(a[0].path) or ray_embed_dataset(*a, **k))
    assert eval_main(argv) == 0, capsys.readouterr().err
    assert calls == [str(base)]  # the exported backend ran on Ray; the PyTorch ones in this process
    r = json.loads((tmp_path / "report" / "report.json").read_text())
    ag = r["agreement"]["onnxruntime-baseline vs torch-baseline"]
    assert ag["cos_mean"] >= 0.99999 and ag["assignment_ari"] >= 0.99, ag


def test_image_parquet_with_huge_row_groups_is_refused(tmp_path, monkeypatch):
    import itae_export.collection as col

    paths = make_images(tmp_path / "src", 2)
    pq.write_table(pa.table({"image": pa.array([p.read_bytes() for p in paths], pa.binary())}),
                   tmp_path / "one-group.parquet")
    assert len(col.list_source(tmp_path / "one-group.parquet")) == 4
    monkeypatch.setattr(col, "MAX_ROW_GROUP_BYTES", 1000)
    with pytest.raises(DataError, match=r"row group 0 holds \d+ bytes of images, over the 1000-byte limit"):
        col.list_source(tmp_path / "one-group.parquet")
