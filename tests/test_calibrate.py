"""Threshold calibration: the valley finder on planted samples, the settings file, the figure, and
itae-calibrate end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from graph_passes.config import ITAEConfig
from itae_export.calibrate import (
    calibrated_config,
    find_valley_threshold,
    length_summary,
    otsu_threshold,
    write_settings,
)
from itae_export.viz import plot_norm_histogram

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _planted(n_main: int, n_art: int, seed: int = 0) -> tuple[np.ndarray, float, float]:
    """Normal tokens strictly below 20, artifacts strictly above 40: any threshold in the gap is right."""
    rng = np.random.default_rng(seed)
    main = np.exp(rng.normal(np.log(8.0), 0.25, 4 * n_main))
    main = main[main < 20][:n_main]
    art = np.exp(rng.normal(np.log(80.0), 0.2, 4 * n_art))
    art = art[art > 40][:n_art]
    return rng.permutation(np.concatenate([main, art])), 20.0, 40.0


@pytest.mark.parametrize("n_art", [100, 1_000, 15_000])  # 0.3% .. 30% artifacts
def test_valley_separates_the_planted_modes(n_art: int) -> None:
    x, lo, hi = _planted(30_000, n_art)
    r = find_valley_threshold(x)
    assert r.found, r.message
    assert lo < r.threshold < hi
    assert (x > r.threshold).sum() == n_art
    assert len(r.peaks) >= 2 and "valley at length" in r.message
    assert r.valley_height < min(p["height"] for p in r.peaks[:2])


def test_valley_in_the_low_direction_uses_the_same_valley() -> None:
    # A short mode below the main one (direction "low").
    x, lo, hi = _planted(1_000, 30_000, seed=2)
    r = find_valley_threshold(x)
    assert r.found and lo < r.threshold < hi
    assert length_summary(x, r.threshold, "low")["fraction_flagged"] == pytest.approx(1_000 / 31_000)


@pytest.mark.parametrize(
    "sample",
    [
        lambda rng: np.exp(rng.normal(2.0, 0.3, 50_000)),  # log-normal
        lambda rng: rng.gamma(3.0, 2.0, 50_000),  # skewed
        lambda rng: rng.uniform(5, 10, 20_000),  # flat
        lambda rng: np.exp(rng.normal(0.0, 1.0, 300)),  # few samples
    ],
)
def test_unimodal_data_has_no_valley(sample) -> None:
    r = find_valley_threshold(sample(np.random.default_rng(0)))
    assert not r.found and r.threshold is None
    assert r.message.startswith("no valley") and "unimodal" in r.message


def test_degenerate_samples_report_no_valley() -> None:
    assert "same length" in find_valley_threshold(np.full(100, 3.0)).message
    assert "only 3" in find_valley_threshold(np.array([1.0, 2.0, 3.0, -1.0, np.nan])).message


def test_otsu_is_reported_but_misses_a_rare_mode() -> None:
    # Why the valley and not Otsu: with 0.3% artifacts Otsu splits the main mode.
    x, lo, hi = _planted(30_000, 100)
    r = find_valley_threshold(x)
    assert r.otsu_threshold == pytest.approx(np.exp(otsu_threshold(np.log(x), r.bins)))
    assert r.otsu_threshold < lo < r.threshold


def test_settings_file_round_trips_through_itae_config(tmp_path: Path) -> None:
    cfg = ITAEConfig(norm_source="k", relative_threshold=3.0)
    new = calibrated_config(cfg, 27.5)
    assert new.threshold == 27.5 and new.relative_threshold is None and new.norm_source == "k"
    out = write_settings(tmp_path / "settings.json", new, {"method": "valley", "threshold": 27.5})
    doc = json.loads(out.read_text())
    assert doc["itae"]["threshold"] == 27.5 and doc["calibration"]["method"] == "valley"
    assert ITAEConfig.from_file(out) == new


def test_histogram_png(tmp_path: Path) -> None:
    x, _, _ = _planted(5_000, 200)
    p = plot_norm_histogram(x, tmp_path / "h.png", threshold=30.0)
    assert p.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".h.png*"))  # no temporary left behind


def test_calibrate_cli_reports_no_valley_on_a_random_model(tmp_path: Path, capsys) -> None:
    pytest.importorskip("timm")
    from itae_export.cli.eval_cmd import calibrate_main

    out = tmp_path / "settings.json"
    argv = ["dinov2_vits14", "--random-weights", "--depth", "2", "--img-size", "56", "--dataset", "digits"]
    argv += ["--limit", "64", "--out", str(out), "--no-progress"]
    rc = calibrate_main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error: no valley" in err and "no settings written" in err
    assert not out.exists()
    assert (tmp_path / "settings.png").read_bytes()[:8] == PNG_MAGIC  # the histogram is drawn anyway
    # The figure is an output like any other: not overwritten without --force.
    assert calibrate_main(argv) == 2
    assert "already exists" in capsys.readouterr().err


def test_calibration_on_the_planted_artifact_model_finds_the_artifacts(tmp_path: Path) -> None:
    from conftest import planted_artifact_model

    from itae_export.calibrate import collect_patch_lengths
    from itae_export.reference import last_block_stats

    model, imgs, mask = planted_artifact_model(n_images=48)
    cfg = ITAEConfig()  # norm source v, token scope, high
    lengths, info = collect_patch_lengths(model, [imgs[:20].numpy(), imgs[20:].numpy()], cfg)
    assert info["num_images"] == 48 and info["num_prefix_tokens"] == 1 and lengths.shape == (48 * 16,)
    r = find_valley_threshold(lengths)
    assert r.found, r.message
    planted = mask.numpy().ravel()
    assert lengths[~planted].max() < r.threshold < lengths[planted].min()

    settings = write_settings(
        tmp_path / "s.json", calibrated_config(cfg, r.threshold), {"threshold": r.threshold}
    )
    calibrated = ITAEConfig.from_file(settings)
    st = last_block_stats(model, imgs, calibrated)
    np.testing.assert_array_equal(st["flagged"][:, 1:], mask.numpy())
    # The CLS token attended the planted artifacts strongly; after ITAE it hardly does.
    before = st["cls_attn_before"][:, :, 1:].mean(1)[mask.numpy()]
    after = st["cls_attn_after"][:, :, 1:].mean(1)[mask.numpy()]
    assert after.mean() < 0.5 * before.mean()


def _planted_imagefolder(root: Path, n: int = 48, seed: int = 0) -> np.ndarray:
    """56x56 PNGs: grey texture near the ImageNet mean (normalises to about 0) with 1..3 white 14x14
    patches, the planted model's artifacts. Returns the [n, 16] mask of white patches."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406]) * 255
    masks = np.zeros((n, 16), bool)
    for i in range(n):
        img = np.clip(mean + rng.normal(0, 15, (56, 56, 3)), 0, 255)
        for p in rng.choice(16, size=1 + i % 3, replace=False):
            r, c = divmod(int(p), 4)
            img[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] = 255
            masks[i, p] = True
        (root / "all").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(root / "all" / f"{i:03d}.png")
    return masks


def test_calibrate_cli_writes_settings_that_itae_eval_accepts(tmp_path: Path, monkeypatch, capsys) -> None:
    from conftest import planted_artifact_model

    import itae_export.models
    from itae_export.cli.eval_cmd import calibrate_main, eval_main

    model, _, _ = planted_artifact_model()
    monkeypatch.setattr(itae_export.models, "build_model", lambda *a, **k: model)
    masks = _planted_imagefolder(tmp_path / "data")
    data = [
        "--dataset",
        "imagefolder",
        "--data-root",
        str(tmp_path / "data"),
        "--resize-size",
        "56",
        "--no-progress",
    ]
    argv = ["dinov2_vits14", "--random-weights", "--img-size", "56", *data]
    out = tmp_path / "settings.json"
    assert calibrate_main(argv + ["--out", str(out)]) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    thr = doc["itae"]["threshold"]
    assert doc["itae"]["relative_threshold"] is None and doc["itae"]["norm_source"] == "v"
    cal = doc["calibration"]
    assert cal["threshold"] == thr and cal["dataset"]["count"] == 48 and cal["result"]["found"]
    assert cal["lengths"]["fraction_flagged"] == pytest.approx(masks.mean())
    assert (tmp_path / "settings.png").read_bytes()[:8] == PNG_MAGIC
    assert "valley at length" in capsys.readouterr().err

    rep = tmp_path / "rep"
    assert (
        eval_main(argv + ["--settings", str(out), "--report-dir", str(rep), "--viz", "1", "--n-init", "2"])
        == 0
    )
    r = json.loads((rep / "report.json").read_text())
    assert r["itae"]["threshold"] == thr and r["runs"]["torch-itae"]["itae"]["threshold"] == thr
    assert r["dataset"]["num_classes"] == 1 and r["preprocessing"]["resize_size"] == 56
