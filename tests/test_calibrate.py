"""Threshold calibration: the valley finder on planted samples, the settings file, the figure, and
itae-calibrate end to end."""

from __future__ import annotations

import json
import re
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


def test_no_valley_messages_count_in_the_singular_and_plural() -> None:
    assert "only 1 positive length collected" in find_valley_threshold(np.array([5.0, -1.0])).message
    assert "only 2 positive lengths collected" in find_valley_threshold(np.array([5.0, 6.0])).message


def test_collect_patch_lengths_bar_counts_the_images_processed(monkeypatch) -> None:
    import tqdm
    from conftest import planted_artifact_model

    import itae_export.reference as reference
    from itae_export.calibrate import collect_patch_lengths

    model, imgs, _ = planted_artifact_model(n_images=10)
    processed: list[int] = []
    seen: list[tuple[int, int]] = []
    real = reference.last_block_stats

    def counting(embedder, x, cfg):
        out = real(embedder, x, cfg)
        processed.append(len(x))
        return out

    class Recorder(tqdm.tqdm):
        def update(self, n=1):
            if not self.disable:
                seen.append((self.n + n, sum(processed)))
            return super().update(n)

    monkeypatch.setattr(reference, "last_block_stats", counting)
    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    batches = [imgs[:4].numpy(), imgs[4:8].numpy(), imgs[8:].numpy()]
    lengths, info = collect_patch_lengths(model, iter(batches), ITAEConfig(), progress=True, total=10)
    assert info["num_images"] == 10 and lengths.shape == (10 * 16,)
    assert seen == [(4, 4), (8, 8), (10, 10)]


def test_calibrate_cli_progress_runs_to_the_end_and_outputs_are_0644(tmp_path: Path, monkeypatch, capsys,
                                                                    marked_progress_bars) -> None:
    """With progress on: the bar counts processed images to the end, then status lines cover the fit and
    the figure; the outputs are 0o644 whatever the umask."""
    import os
    import stat

    from conftest import planted_artifact_model

    import itae_export.models
    from itae_export.cli.eval_cmd import calibrate_main

    model, _, _ = planted_artifact_model()
    monkeypatch.setattr(itae_export.models, "build_model", lambda *a, **k: model)
    _planted_imagefolder(tmp_path / "data", n=20)
    argv = ["dinov2_vits14", "--random-weights", "--img-size", "56", "--dataset", "imagefolder", "--data-root",
            str(tmp_path / "data"), "--resize-size", "56", "--batch-size", "8", "--out", str(tmp_path / "s.json")]
    old = os.umask(0o077)
    try:
        rc = calibrate_main(argv)
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert rc == 0, err
    bar, after = err.split("fitting the valley of 320 lengths from 20 images...", 1)
    assert bar.rstrip().endswith("[bar calibration closed at 20/20]"), bar
    assert after.index("drawing the histogram...") < after.index("histogram: ") < after.index("valley at length")
    for f in ("s.json", "s.png"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o644, f


def test_calibrate_help_offers_only_the_options_that_apply(capsys) -> None:
    from itae_export.cli.eval_cmd import build_calibrate_parser, calibrate_main

    p = build_calibrate_parser()
    text = p.format_help()
    usage, options = text.split("\n\n", 1)
    for gone in ("--attenuation", "--alpha", "--rows", "--threshold", "--relative-threshold"):
        assert gone not in p._option_string_actions and f"[{gone} " not in usage, gone
        assert not re.search(rf"^\s+{gone}\b", options, re.M), gone
    for kept in ("--norm-source", "--norm-scope", "--direction", "--relative-stat", "--settings", "--out"):
        assert kept in text
    assert all(a.help for a in p._actions), [a.dest for a in p._actions if not a.help]
    assert "(2) (default" not in text and "(0.1) (default" not in text  # no default said twice
    for flag in (["--alpha", "0.5"], ["--threshold", "3"]):
        with pytest.raises(SystemExit) as e:
            calibrate_main(["dinov2_vits14", "--dataset", "digits", "--out", "x.json", *flag])
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_attention_figure_titles_count_tokens_in_the_singular_and_plural(tmp_path: Path, monkeypatch) -> None:
    import itae_export.viz as viz

    titles: list[str] = []
    monkeypatch.setattr(viz, "plot_attention_overlay", lambda *a, title="", **k: titles.append(title))
    flagged = np.zeros((3, 5), bool)  # 1 prefix token + a 2x2 grid
    flagged[1, 1] = True
    flagged[2, 1:3] = True
    stats = {"num_prefix_tokens": 1, "grid": (2, 2), "flagged": flagged,
             "cls_attn_before": np.ones((3, 2, 5)), "cls_attn_after": np.ones((3, 2, 5))}
    viz.attention_figures(stats, np.zeros((3, 28, 28, 3), np.uint8), tmp_path, names=["a", "b", "c"])
    assert titles == ["a: 0 tokens attenuated", "b: 1 token attenuated", "c: 2 tokens attenuated"]
