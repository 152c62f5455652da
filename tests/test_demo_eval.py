"""`--demo-artifacts`: itae-eval and itae-calibrate on the synthetic demo model (itae_export.demo), whose
planted high-norm corner tokens draw the CLS attention and cost clustering accuracy, which ITAE wins
back. One eval run (ViT-S, 112 px, 200 digits, with the exported ITAE ONNX beside it) serves most tests."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from graph_passes.config import ITAEConfig  # noqa: E402
from itae_export import demo  # noqa: E402
from itae_export.cli.eval_cmd import calibrate_main, eval_main  # noqa: E402

IMG = 112
MODEL = ["dinov2_vits14", "--demo-artifacts", "--img-size", str(IMG)]
DATA = ["--dataset", "digits", "--limit", "200", "--no-progress"]


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory) -> Path:
    """The ITAE ONNX of the demo model with artifacts (default ITAE settings), as itae-export makes it."""
    import onnx

    from graph_passes.itae import apply_itae
    from itae_export.demo import demo_model
    from itae_export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("demo_onnx")
    model = demo_model("dinov2_vits14", img_size=IMG)
    base = export_onnx(model, d / "base.onnx", img_size=IMG)
    patched, _ = apply_itae(onnx.load(str(base)), ITAEConfig(), num_prefix_tokens=model.num_prefix_tokens)
    out = d / "itae.onnx"
    onnx.save(patched, str(out))
    return out


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_onnx) -> dict:
    """One itae-eval --demo-artifacts run: its report, report.md, stdout and folders."""
    root = tmp_path_factory.mktemp("demo_eval")
    out, cache = root / "report", root / "cache"
    argv = MODEL + DATA + ["--onnx", str(demo_onnx), "--viz", "1", "--report-dir", str(out),
                           "--cache-dir", str(cache)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = eval_main(argv)
    assert rc == 0, stderr.getvalue()
    return {"report": json.loads((out / "report.json").read_text()), "md": (out / "report.md").read_text(),
            "stdout": stdout.getvalue(), "out": out, "cache": cache, "argv": argv}


def test_report_holds_three_rows(demo_run) -> None:
    r = demo_run["report"]
    rows = r["demo"]["rows"]
    assert list(rows) == ["clean", "artifacts", "artifacts_itae"]
    assert [row["run"] for row in rows.values()] == ["torch-clean", "torch-baseline", "torch-itae"]
    for row in rows.values():
        assert 0.1 <= row["acc"] <= 1 and 0 <= row["nmi"] <= 1  # ACC >= the largest class share
        assert row["acc"] == r["runs"][row["run"]]["metrics"]["acc"]
    assert set(r["runs"]) == {"torch-clean", "torch-baseline", "torch-itae", "onnxruntime-itae"}


def test_artifacts_cost_accuracy_and_itae_wins_it_back(demo_run) -> None:
    rows = demo_run["report"]["demo"]["rows"]
    loss = rows["clean"]["acc"] - rows["artifacts"]["acc"]
    assert loss >= 0.05, rows
    assert rows["artifacts_itae"]["acc"] - rows["artifacts"]["acc"] >= 0.5 * loss, rows
    assert demo_run["report"]["demo"]["acc_loss_recovered"] >= 0.5


def test_flagged_tokens_and_cls_attention(demo_run) -> None:
    f = demo_run["report"]["demo"]["flags"]
    assert f["images"] == 200 and f["flagged_tokens"] > 0 and f["flagged_per_image"] > 0
    assert f["flagged_tokens"] == pytest.approx(200 * f["flagged_per_image"])
    grid = IMG // 14
    assert f["planted_positions"] == demo.artifact_positions(grid)
    assert f["flagged_at_planted"] > 0 and len(f["flagged_per_position"]) == grid * grid
    before, after = f["cls_attention_on_flagged_before"], f["cls_attention_on_flagged_after"]
    assert after < before and after < 0.5 * before, f


def test_report_and_stdout_say_synthetic(demo_run) -> None:
    r, md, stdout = demo_run["report"], demo_run["md"], demo_run["stdout"]
    assert "synthetic" in r["title"] and demo.LABEL in r["title"]
    assert md.splitlines()[0] == f"# {r['title']}" and "synthetic" in md.splitlines()[0]
    assert "## Summary: synthetic demo model" in md and demo.LABEL in md
    for row in r["demo"]["rows"].values():
        assert f"| {row['description']} (`{row['run']}`) | {100 * row['acc']:.2f} |" in md
    assert stdout.splitlines()[0] == demo.LABEL
    assert "with artifacts + ITAE" in stdout and "flagged tokens:" in stdout and "CLS attention" in stdout
    assert all(f"{100 * row['acc']:.2f}" in stdout for row in r["demo"]["rows"].values())


def test_onnx_backend_compares_with_the_artifacts_model(demo_run) -> None:
    ag = demo_run["report"]["agreement"]
    assert list(ag) == ["onnxruntime-itae vs torch-itae"]
    assert ag["onnxruntime-itae vs torch-itae"]["cos_mean"] >= 0.9999
    assert ag["onnxruntime-itae vs torch-itae"]["assignment_ari"] >= 0.99


def test_cache_keys_tell_the_demo_models_apart(demo_run, tmp_path) -> None:
    from itae_export.embed import model_identity

    r = demo_run["report"]
    metas = {name: json.loads(Path(run["embedding"]["cache_file"]).with_suffix(".json").read_text())
             for name, run in r["runs"].items()}
    assert metas["torch-clean"]["model"]["demo"]["artifacts"] is False
    assert metas["torch-clean"]["model"]["demo"]["positions"] == []
    assert metas["torch-baseline"]["model"]["demo"]["artifacts"] is True
    plain = model_identity("dinov2_vits14", weights=None, random_weights=True, seed=0, img_size=IMG)
    models = [metas["torch-clean"]["model"], metas["torch-baseline"]["model"], plain]
    assert len({json.dumps(m, sort_keys=True) for m in models}) == 3
    assert len({run["embedding"]["cache_file"] for run in r["runs"].values()}) == 4

    # A second run on the same cache (no figures): every embedding is reused, the flag statistics are
    # measured in their own pass and agree.
    out = tmp_path / "again"
    argv = MODEL + DATA + ["--viz", "0", "--report-dir", str(out), "--cache-dir", str(demo_run["cache"])]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert eval_main(argv) == 0
    again = json.loads((out / "report.json").read_text())
    assert all(run["embedding"]["cached"] for run in again["runs"].values())
    assert again["demo"]["rows"] == r["demo"]["rows"]
    f1, f2 = again["demo"]["flags"], r["demo"]["flags"]
    assert f1["flagged_tokens"] == f2["flagged_tokens"]
    assert f1["cls_attention_on_flagged_before"] == pytest.approx(f2["cls_attention_on_flagged_before"], rel=1e-4)


@pytest.mark.parametrize("main", [eval_main, calibrate_main], ids=["itae-eval", "itae-calibrate"])
def test_demo_artifacts_with_weights_is_refused(tmp_path: Path, capsys, main) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    out = tmp_path / "out"
    dest = ["--report-dir", str(out)] if main is eval_main else ["--out", str(out / "s.json")]
    assert main(MODEL + DATA + ["--weights", str(weights)] + dest) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--demo-artifacts" in err[0] and "--weights" in err[0], err
    assert not out.exists()


def test_calibrate_finds_the_planted_tokens(tmp_path: Path, capsys) -> None:
    import torch

    from itae_export.data import Preprocess, load_dataset
    from itae_export.demo import demo_model
    from itae_export.reference import last_block_stats

    out = tmp_path / "settings.json"
    n = 40
    argv = ["dinov2_vits14", "--demo-artifacts", "--img-size", str(IMG), "--dataset", "digits",
            "--limit", str(n), "--no-progress", "--out", str(out)]
    assert calibrate_main(argv) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    thr = doc["itae"]["threshold"]
    assert doc["calibration"]["result"]["found"] and doc["calibration"]["model"]["demo"]["artifacts"] is True
    assert (tmp_path / "settings.png").is_file()

    # On the calibration images, the threshold separates the planted tokens from all the others.
    ds = load_dataset("digits").subset(n, 0)
    x = torch.from_numpy(np.stack([Preprocess(img_size=IMG)(ds.load(i)) for i in range(len(ds))]))
    model = demo_model("dinov2_vits14", img_size=IMG)
    st = last_block_stats(model, x, ITAEConfig.from_file(out))
    lengths = st["norms"][:, st["num_prefix_tokens"]:]
    planted = np.zeros(lengths.shape[1], bool)
    planted[demo.artifact_positions(IMG // 14)] = True
    assert lengths[:, planted].min() > thr > lengths[:, ~planted].max()
    np.testing.assert_array_equal(st["flagged"][:, st["num_prefix_tokens"]:], np.broadcast_to(planted, lengths.shape))
