"""itae-eval end to end on scikit-learn's digits with a small random model: PyTorch baseline and ITAE,
ONNX Runtime on the exported (and ITAE-patched) models, backend agreement, the embeddings cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from graph_passes.config import ITAEConfig  # noqa: E402
from itae_export.cli.eval_cmd import eval_main  # noqa: E402

MODEL = ["dinov2_vits14", "--random-weights", "--depth", "2", "--img-size", "56"]
# gamma 1.1 flags a good share of a random model's patches, so ITAE visibly changes the embedding.
ITAE_FLAGS = ["--relative-threshold", "1.1"]
CFG = ITAEConfig(relative_threshold=1.1)
DATA = ["--dataset", "digits", "--limit", "200", "--no-progress", "--n-init", "4"]


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory) -> tuple[Path, Path]:
    """(baseline ONNX, ITAE ONNX) of the same random model, as itae-export / itae-patch make them."""
    import onnx

    from graph_passes.itae import apply_itae
    from itae_export.models import build_model
    from itae_export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("onnx")
    embedder = build_model("dinov2_vits14", random_weights=True, depth=2, img_size=56)
    base = export_onnx(embedder, d / "base.onnx", img_size=56)
    patched, _ = apply_itae(onnx.load(str(base)), CFG, num_prefix_tokens=embedder.num_prefix_tokens)
    itae = d / "itae.onnx"
    onnx.save(patched, str(itae))
    return base, itae


def _report(d: Path) -> dict:
    return json.loads((d / "report.json").read_text())


def test_eval_digits_baseline_itae_and_onnx_runtime(tmp_path: Path, onnx_models, capsys) -> None:
    base, itae = onnx_models
    out = tmp_path / "report"
    argv = (
        MODEL
        + DATA
        + ITAE_FLAGS
        + ["--onnx", str(itae), "--onnx-baseline", str(base), "--report-dir", str(out), "--viz", "2"]
    )
    assert eval_main(argv) == 0, capsys.readouterr().err
    r = _report(out)
    assert set(r["runs"]) == {"torch-baseline", "torch-itae", "onnxruntime-baseline", "onnxruntime-itae"}
    for run in r["runs"].values():
        m = run["metrics"]
        # Hungarian ACC can never fall below the largest class share when k = number of classes.
        assert (
            max(np.bincount(_labels(r))) / 200 <= m["acc"] <= 1 and 0 <= m["nmi"] <= 1 and -1 <= m["ari"] <= 1
        )
        assert run["embedding"]["cached"] is False and run["kmeans"]["k"] == 10
    assert r["dataset"]["count"] == 200 and r["dataset"]["subset"]["of"] == 1797
    assert r["itae"] == CFG.to_dict() and r["runs"]["onnxruntime-itae"]["itae"] == CFG.to_dict()
    assert r["preprocessing"]["resize_size"] == 64 and r["kmeans"]["n_init"] == 4

    # Each exported model reproduces its PyTorch counterpart.
    for name in ("onnxruntime-itae vs torch-itae", "onnxruntime-baseline vs torch-baseline"):
        ag = r["agreement"][name]
        assert ag["assignment_ari"] >= 0.99 and ag["cos_mean"] >= 0.99999, (name, ag)

    # ITAE really acted: its embeddings differ from the baseline's, and the ONNX ITAE follows PyTorch ITAE.
    emb = {k: np.load(v["embedding"]["cache_file"]) for k, v in r["runs"].items()}
    cos = _cos(emb["torch-baseline"], emb["torch-itae"])
    assert cos.min() < 0.9999
    assert _cos(emb["onnxruntime-itae"], emb["torch-itae"]).min() > 0.9999

    md = (out / "report.md").read_text()
    assert "| torch-itae | torch |" in md and "Backend agreement" in md and "centre crop 56x56" in md
    pngs = sorted(p.name for p in out.rglob("*.png"))
    assert "norm_histogram.png" in pngs and len(pngs) == 3
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in out.rglob("*.png"))


def _labels(r: dict) -> np.ndarray:
    from itae_export.data import load_dataset

    return (
        load_dataset("digits").subset(r["dataset"]["subset"]["limit"], r["dataset"]["subset"]["seed"]).labels
    )


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_embeddings_cache_hits_only_on_an_identical_description(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    argv = MODEL + DATA + ITAE_FLAGS + ["--report-dir", str(out), "--viz", "0"]
    assert eval_main(argv) == 0
    first = _report(out)
    assert eval_main(argv) == 2  # the report exists
    assert "already exists" in capsys.readouterr().err
    assert eval_main(argv + ["--force"]) == 0
    second = _report(out)
    assert all(run["embedding"]["cached"] for run in second["runs"].values())
    for name in first["runs"]:
        assert second["runs"][name]["metrics"] == first["runs"][name]["metrics"]
    # Another ITAE setting: the baseline is reused, ITAE is recomputed.
    assert (
        eval_main(
            MODEL + DATA + ["--relative-threshold", "1.2", "--report-dir", str(out), "--viz", "0", "--force"]
        )
        == 0
    )
    third = _report(out)
    assert third["runs"]["torch-baseline"]["embedding"]["cached"] is True
    assert third["runs"]["torch-itae"]["embedding"]["cached"] is False
    assert len(list((out / "embeddings").glob("*.json"))) == 3
    meta = json.loads(
        Path(third["runs"]["torch-itae"]["embedding"]["cache_file"]).with_suffix(".json").read_text()
    )
    assert meta["itae"]["relative_threshold"] == 1.2 and meta["data"]["count"] == 200
    assert meta["model"]["weights"] == {"random": True, "seed": 0} and meta["preprocessing"]["img_size"] == 56


def test_mismatched_onnx_is_refused(tmp_path: Path, onnx_models, capsys) -> None:
    base, itae = onnx_models
    common = MODEL + DATA + ["--report-dir", str(tmp_path / "r")]
    assert eval_main(common + ["--relative-threshold", "1.5", "--onnx", str(itae)]) == 2
    assert "was patched with ITAE settings" in capsys.readouterr().err
    assert eval_main(common + ITAE_FLAGS + ["--onnx", str(base)]) == 2
    assert "carries no ITAE settings" in capsys.readouterr().err
    assert eval_main(common + ["--onnx-baseline", str(itae)]) == 2
    assert "is an ITAE model" in capsys.readouterr().err
    assert eval_main(MODEL + ["--dataset", "cifar10", "--report-dir", str(tmp_path / "r")]) == 2
    assert "needs --data-root" in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.json").exists()


def test_engine_sidecar_settings_are_checked(tmp_path: Path, capsys) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    side = tmp_path / "m.engine.json"
    common = MODEL + DATA + ["--report-dir", str(tmp_path / "r"), "--engine", str(engine)]
    side.write_text(json.dumps({"itae": ITAEConfig().to_dict(), "precision": "fp16"}))
    assert eval_main(common + ITAE_FLAGS) == 2
    assert "was built with ITAE settings" in capsys.readouterr().err
    side.write_text(json.dumps({"itae": None}))
    assert eval_main(common + ITAE_FLAGS) == 2
    assert "without ITAE" in capsys.readouterr().err
    # Matching settings get as far as loading the engine: no TensorRT here, and no valid engine anyway.
    side.write_text(json.dumps({"itae": CFG.to_dict(), "precision": "fp16"}))
    rc = eval_main(common + ITAE_FLAGS)
    err = capsys.readouterr().err
    assert rc == 4 and "itae-eval: error:" in err, err  # EngineError


SMALL = ["--dataset", "digits", "--limit", "20", "--no-progress", "--n-init", "2"]


def test_report_title_states_the_evaluated_subset(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    assert eval_main(MODEL + SMALL + ["--report-dir", str(out), "--viz", "0"]) == 0, capsys.readouterr().err
    md = (out / "report.md").read_text().splitlines()
    assert md[0] == "# itae-eval: dinov2_vits14 on digits (20 of 1797 images, seed 0)"
    data = next(line for line in md if line.startswith("- data: "))
    assert "20 images, 10 classes" in data and "(seed 0) of 1797 images" in data


def test_dataset_title_words() -> None:
    from itae_export.cli.eval_cmd import dataset_title

    d = {"dataset": "cifar10", "split": "test", "count": 10000}
    assert dataset_title(d) == "cifar10 (test, all 10000 images)"
    assert dataset_title({**d, "count": 1}) == "cifar10 (test, 1 image)"
    sub = {**d, "count": 5, "subset": {"limit": 5, "seed": 3, "of": 10000}}
    assert dataset_title(sub) == "cifar10 (test, 5 of 10000 images, seed 3)"
    assert dataset_title({"dataset": "digits", "split": "all", "count": 1797}) == "digits (all 1797 images)"


@pytest.mark.parametrize("scope", ["token", "head"])
def test_norm_histogram_holds_every_evaluated_image(tmp_path: Path, monkeypatch, scope: str, capsys) -> None:
    import itae_export.viz as viz

    drawn: list[np.ndarray] = []
    real = viz.plot_norm_histogram

    def recording(lengths, out, **kw):
        drawn.append(np.asarray(lengths))
        return real(lengths, out, **kw)

    monkeypatch.setattr(viz, "plot_norm_histogram", recording)
    out = tmp_path / "r"
    argv = MODEL + SMALL + ["--norm-scope", scope, "--report-dir", str(out), "--viz", "2"]
    assert eval_main(argv) == 0, capsys.readouterr().err
    per_image = 16 * (6 if scope == "head" else 1)  # 56 px: 4x4 patches; ViT-S/14: 6 heads
    assert len(drawn) == 1 and drawn[0].size == 20 * per_image
    h = _report(out)["norm_histogram"]
    assert h["images"] == 20 and h["lengths"] == 20 * per_image and h["norm_scope"] == scope
    assert f"{20 * per_image} patch-token lengths" in (out / "report.md").read_text()


def test_report_files_are_0644_whatever_the_umask(tmp_path: Path, capsys) -> None:
    import os
    import stat

    out = tmp_path / "r"
    old = os.umask(0o077)
    try:
        rc = eval_main(MODEL + SMALL + ["--report-dir", str(out), "--viz", "1"])
    finally:
        os.umask(old)
    assert rc == 0, capsys.readouterr().err
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in files}
    assert {"report.md", "report.json", "norm_histogram.png"} <= names
    assert any(n.startswith("attention/") for n in names) and any(n.startswith("embeddings/") for n in names)
    assert {p.relative_to(out).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        n: oct(0o644) for n in names
    }


def test_eval_progress_bars_and_status_lines(tmp_path: Path, capsys, marked_progress_bars) -> None:
    """Progress on: each bar closes at its total (images embedded, images measured) and the steps
    without a bar (data, model, k-means, figures) print a status line."""

    data = [a for a in SMALL if a != "--no-progress"]
    assert eval_main(MODEL + data + ["--report-dir", str(tmp_path / "r"), "--viz", "1"]) == 0
    err = capsys.readouterr().err
    marks = re.findall(r"\[bar [^\]]*\]", err)
    assert marks == ["[bar torch-baseline closed at 20/20]", "[bar torch-itae closed at 20/20]",
                     "[bar norm histogram closed at 20/20]"]
    for line in ("reading digits...", "building dinov2_vits14 (random weights, 56 px)...",
                 "torch-baseline: k-means (k = 10, n_init 2) on 20 embeddings of dimension 384...",
                 "attention figure of the first image..."):
        assert line in err, line


def test_eval_help_names_the_weights_formats() -> None:
    from itae_export.cli.eval_cmd import build_eval_parser

    text = " ".join(build_eval_parser().format_help().split())
    assert "official .pth, timm .safetensors, or a Hugging Face transformers folder (config.json + " \
           "model.safetensors)" in text
    assert "(224) (default" not in text and "(10) (default" not in text


def test_eval_with_weights_from_a_transformers_folder(tmp_path: Path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                    image_size=518, patch_size=14)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    folder = tmp_path / "dinov2-small"
    transformers.Dinov2Model(cfg).eval().save_pretrained(folder)
    out = tmp_path / "r"
    argv = ["dinov2_vits14", "--weights", str(folder), "--img-size", "56"] + SMALL
    assert eval_main(argv + ["--report-dir", str(out), "--viz", "0"]) == 0, capsys.readouterr().err
    w = _report(out)["model"]["weights"]
    assert w["format"] == "transformers" and w["path"] == str(folder.resolve())
    assert [Path(f["path"]).name for f in w["files"]] == ["config.json", "model.safetensors"]
    assert "transformers checkpoint, 2 files" in (out / "report.md").read_text()
    # the cache key covers config.json: the same weights under another config are not reused
    assert eval_main(argv + ["--report-dir", str(out), "--viz", "0", "--force"]) == 0
    assert all(r["embedding"]["cached"] for r in _report(out)["runs"].values())
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**conf, "layer_norm_eps": 1e-6, "note": "edited"}))
    assert eval_main(argv + ["--report-dir", str(out), "--viz", "0", "--force"]) == 0
    assert not any(r["embedding"]["cached"] for r in _report(out)["runs"].values())
