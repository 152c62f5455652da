"""The bad-input matrix: for every CLI, a table of malformed flags, files and combinations. Each row
must fail with the documented exit code (2: bad input), print exactly one line "PROG: error: ..."
(no traceback), leave the output folder as it was and every input byte-identical. Rows marked early
must be refused before any model is built (well under a second, no output transaction opened where
noted)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("timm")

from itae_export import models, outputs, pipeline  # noqa: E402
from itae_export.cli import export_main, inspect_main, patch_main, triton_main  # noqa: E402
from itae_export.cli.eval_cmd import calibrate_main, eval_main  # noqa: E402

TINY = ["dinov2_vits14", "--random-weights", "--depth", "2", "--img-size", "56"]
MAINS = {"itae-export": export_main, "itae-patch": patch_main, "itae-inspect": inspect_main,
         "itae-triton": triton_main, "itae-eval": eval_main, "itae-calibrate": calibrate_main}



@dataclass
class Row:
    id: str
    prog: str
    argv: list[str]  # "{I}": this row's input folder, "{O}": its output folder
    code: int = 2
    early: bool = True  # refused before any model is built (and in well under a second)
    no_tx: bool = False  # refused before any output transaction is opened (no staging, no lock)
    setup: list[str] = field(default_factory=list)  # names made in {O} beforehand ("x/" a folder, else a file)
    xfail: str | None = None


E = "itae-export"
OUT = ["--out", "{O}/m.onnx"]
ROWS = [
    # ---------------------------------------------------------------- itae-export: model and sizes
    Row("unknown-model", E, ["dinov2_vitx99", "--random-weights", *OUT], no_tx=True),
    Row("img-size-0", E, [*TINY, "--img-size", "0", *OUT], no_tx=True),
    Row("img-size-15", E, [*TINY, "--img-size", "15", *OUT], no_tx=True),
    Row("img-size-100000", E, [*TINY, "--img-size", "100000", *OUT], no_tx=True),
    Row("img-size-abc", E, [*TINY, "--img-size", "abc", *OUT], no_tx=True),
    Row("validate-batch-0", E, [*TINY, "--validate-batch", "0", *OUT], no_tx=True),
    Row("seed-negative", E, [*TINY, "--seed", "-1", *OUT], no_tx=True),
    Row("depth-0", E, [*TINY, "--depth", "0", *OUT], no_tx=True),
    Row("opset-12-dynamo", E, [*TINY, "--opset", "12", *OUT], no_tx=True),
    Row("opset-30", E, [*TINY, "--opset", "30", *OUT], no_tx=True),
    Row("opset-30-torchscript", E, [*TINY, "--exporter", "torchscript", "--opset", "30", *OUT], no_tx=True),
    Row("fast-path-eval-images-0", E, [*TINY, "--fast-path", "int8", "--fast-path-eval-images", "0", *OUT],
        no_tx=True),
    # ---------------------------------------------------------------- itae-export: weights
    Row("weights-and-random-weights", E, [*TINY, "--weights", "{I}/garbage.pth", *OUT], no_tx=True),
    Row("weights-missing", E, ["dinov2_vits14", "--img-size", "56", "--weights", "{I}/missing.pth", *OUT],
        early=False),
    Row("weights-directory", E, ["dinov2_vits14", "--img-size", "56", "--weights", "{I}/folder", *OUT],
        early=False),
    Row("weights-garbage", E, ["dinov2_vits14", "--img-size", "56", "--weights", "{I}/garbage.pth", *OUT],
        early=False),
    Row("weights-garbage-safetensors", E,
        ["dinov2_vits14", "--img-size", "56", "--weights", "{I}/garbage.safetensors", *OUT], early=False),
    # ---------------------------------------------------------------- itae-export: outputs
    Row("out-bad-suffix", E, [*TINY, "--out", "{O}/m.txt"], no_tx=True),
    Row("out-no-suffix", E, [*TINY, "--out", "{O}/m"], no_tx=True),
    Row("out-directory", E, [*TINY, "--out", "{O}/d.onnx"], setup=["d.onnx/"], no_tx=True),
    Row("out-exists", E, [*TINY, *OUT], setup=["m.onnx"], no_tx=True),
    Row("out-is-the-settings-input", E, [*TINY, "--settings", "{I}/settings.onnx", "--out", "{I}/settings.onnx"]),
    Row("out-is-the-settings-input-force", E,
        [*TINY, "--settings", "{I}/settings.onnx", "--out", "{I}/settings.onnx", "--force"], early=False,
        ),
    Row("out-in-a-file", E, [*TINY, "--out", "{O}/file/m.onnx"], setup=["file"], no_tx=True),
    Row("out-reserved-name", E, [*TINY, "--out", "{O}/.itae-staging.m.onnx"], no_tx=True),
    # ---------------------------------------------------------------- itae-export: engines
    Row("engine-flag-with-onnx-out", E, [*TINY, "--precision", "fp16", *OUT], no_tx=True),
    Row("min-batch-over-max-batch", E, [*TINY, "--min-batch", "9", "--max-batch", "4", "--out", "{O}/m.engine"],
        no_tx=True),
    Row("opt-batch-0", E, [*TINY, "--opt-batch", "0", "--out", "{O}/m.engine"], no_tx=True),
    Row("workspace-0", E, [*TINY, "--workspace", "0", "--out", "{O}/m.engine"], no_tx=True),
    Row("strongly-typed-fp16", E, [*TINY, "--strongly-typed", "--precision", "fp16", "--out", "{O}/m.engine"],
        no_tx=True),
    Row("timing-cache-directory", E, [*TINY, "--timing-cache", "{I}/folder", "--out", "{O}/m.engine"], no_tx=True),
    Row("fast-path-with-engine", E, [*TINY, "--fast-path", "int8", "--out", "{O}/m.engine"], no_tx=True),
    # ---------------------------------------------------------------- itae-export: Triton
    Row("model-name-slash", E, [*TINY, *OUT, "--triton-repo", "{O}/repo", "--model-name", "a/b"], no_tx=True),
    Row("model-name-newline", E, [*TINY, *OUT, "--triton-repo", "{O}/repo", "--model-name", "x\ny"], no_tx=True),
    Row("model-name-dotdot", E, [*TINY, *OUT, "--triton-repo", "{O}/repo", "--model-name", ".."], no_tx=True),
    Row("triton-repo-is-a-file", E, [*TINY, *OUT, "--triton-repo", "{I}/settings.json"], no_tx=True),
    Row("instances-0", E, [*TINY, *OUT, "--triton-repo", "{O}/repo", "--instances", "0"], no_tx=True),
    # ---------------------------------------------------------------- itae-export: settings and ITAE
    Row("settings-wrong-type", E, [*TINY, "--settings", "{I}/wrong_type.json", *OUT], no_tx=True),
    Row("settings-not-json", E, [*TINY, "--settings", "{I}/not_json.json", *OUT], no_tx=True),
    Row("settings-not-utf8", E, [*TINY, "--settings", "{I}/not_utf8.json", *OUT], no_tx=True),
    Row("settings-missing", E, [*TINY, "--settings", "{I}/missing.json", *OUT], no_tx=True),
    Row("settings-directory", E, [*TINY, "--settings", "{I}/folder", *OUT], no_tx=True),
    Row("alpha-out-of-range", E, [*TINY, "--attenuation", "scale", "--alpha", "2", *OUT], no_tx=True),
    Row("threshold-nan", E, [*TINY, "--threshold", "nan", *OUT], no_tx=True),
    Row("no-itae-with-itae-flags", E, [*TINY, "--no-itae", "--threshold", "3", *OUT], no_tx=True),
    Row("fast-path-int8-no-itae", E, [*TINY, "--fast-path", "int8", "--no-itae", *OUT], no_tx=True),
    Row("fast-path-skip-validation", E, [*TINY, "--fast-path", "fused", "--skip-validation", *OUT], no_tx=True),
    Row("int8-weights-without-int8", E, [*TINY, "--int8-weights", "per-tensor", *OUT], no_tx=True),
    Row("fast-path-with-graph-options", E, [*TINY, "--fast-path", "int8", "--l2-normalize", *OUT], no_tx=True),
    # ---------------------------------------------------------------- itae-patch
    Row("patch-not-onnx", "itae-patch", ["{I}/not_onnx.onnx", "--out", "{O}/p.onnx"]),
    Row("patch-empty-file", "itae-patch", ["{I}/empty.onnx", "--out", "{O}/p.onnx"]),
    Row("patch-missing-input", "itae-patch", ["{I}/missing.onnx", "--out", "{O}/p.onnx"]),
    Row("patch-input-directory", "itae-patch", ["{I}/folder", "--out", "{O}/p.onnx"]),
    Row("patch-already-patched", "itae-patch", ["{I}/patched.onnx", "--out", "{O}/p.onnx"]),
    Row("patch-missing-data", "itae-patch", ["{I}/no_data.onnx", "--out", "{O}/p.onnx"]),
    Row("patch-out-bad-suffix", "itae-patch", ["{I}/base.onnx", "--out", "{O}/p.txt"]),
    Row("patch-out-directory", "itae-patch", ["{I}/base.onnx", "--out", "{O}/d.onnx"], setup=["d.onnx/"]),
    Row("patch-out-exists", "itae-patch", ["{I}/base.onnx", "--out", "{O}/p.onnx"], setup=["p.onnx"]),
    Row("patch-out-is-input", "itae-patch", ["{I}/base.onnx", "--out", "{I}/base.onnx", "--force"]),
    Row("patch-out-is-input-data", "itae-patch", ["{I}/base.onnx", "--out", "{I}/base.onnx.data", "--force"]),
    Row("patch-num-prefix-0", "itae-patch", ["{I}/base.onnx", "--out", "{O}/p.onnx", "--num-prefix-tokens", "0"]),
    Row("patch-num-prefix-huge", "itae-patch",
        ["{I}/base.onnx", "--out", "{O}/p.onnx", "--num-prefix-tokens", "100000"], early=False),
    Row("patch-settings-not-json", "itae-patch", ["{I}/base.onnx", "--out", "{O}/p.onnx", "--settings",
                                                  "{I}/not_json.json"]),
    Row("patch-bad-check", "itae-patch", ["{I}/base.onnx", "--out", "{O}/p.onnx", "--check", "maybe"],
        ),
    # ---------------------------------------------------------------- itae-inspect
    Row("inspect-not-onnx", "itae-inspect", ["{I}/not_onnx.onnx"]),
    Row("inspect-missing", "itae-inspect", ["{I}/missing.onnx"]),
    Row("inspect-directory", "itae-inspect", ["{I}/folder"]),
    Row("inspect-num-prefix-0", "itae-inspect", ["{I}/base.onnx", "--num-prefix-tokens", "0"]),
    Row("inspect-settings-wrong-type", "itae-inspect", ["{I}/base.onnx", "--settings", "{I}/wrong_type.json"]),
    # ---------------------------------------------------------------- itae-triton
    Row("triton-no-repo", "itae-triton", ["{I}/base.onnx"]),
    Row("triton-model-name-slash", "itae-triton", ["{I}/base.onnx", "--triton-repo", "{O}/repo", "--model-name",
                                                   "a/b"]),
    Row("triton-model-name-newline", "itae-triton", ["{I}/base.onnx", "--triton-repo", "{O}/repo",
                                                     "--model-name", "x\ny"]),
    Row("triton-missing-model", "itae-triton", ["{I}/missing.onnx", "--triton-repo", "{O}/repo"]),
    Row("triton-not-onnx", "itae-triton", ["{I}/not_onnx.onnx", "--triton-repo", "{O}/repo"]),
    Row("triton-unknown-suffix", "itae-triton", ["{I}/settings.json", "--triton-repo", "{O}/repo"]),
    Row("triton-engine-without-sidecar", "itae-triton", ["{I}/garbage.engine", "--triton-repo", "{O}/repo"]),
    Row("triton-repo-is-a-file", "itae-triton", ["{I}/base.onnx", "--triton-repo", "{I}/settings.json"]),
    Row("triton-max-batch-negative", "itae-triton", ["{I}/base.onnx", "--triton-repo", "{O}/repo",
                                                     "--max-batch", "-1"]),
    Row("triton-instances-0", "itae-triton", ["{I}/base.onnx", "--triton-repo", "{O}/repo", "--instances", "0"]),
    Row("triton-cpu-plan", "itae-triton", ["{I}/garbage.engine", "--triton-repo", "{O}/repo", "--instance-kind",
                                           "KIND_CPU"]),
]

EV = ["--dataset", "digits", "--limit", "20", "--no-progress", "--viz", "0", "--report-dir", "{O}/rep"]
CAL = ["--dataset", "digits", "--limit", "20", "--no-progress"]
ROWS += [
    # ---------------------------------------------------------------- itae-eval
    Row("eval-settings-not-json", "itae-eval", [*TINY, *EV, "--settings", "{I}/not_json.json"]),
    Row("eval-settings-not-utf8", "itae-eval", [*TINY, *EV, "--settings", "{I}/not_utf8.json"]),
    Row("eval-settings-missing", "itae-eval", [*TINY, *EV, "--settings", "{I}/missing.json"]),
    Row("eval-onnx-not-onnx", "itae-eval", [*TINY, *EV, "--onnx", "{I}/not_onnx.onnx"]),
    Row("eval-onnx-missing", "itae-eval", [*TINY, *EV, "--onnx", "{I}/missing.onnx"]),
    Row("eval-onnx-is-a-baseline", "itae-eval", [*TINY, *EV, "--onnx", "{I}/base.onnx"]),
    Row("eval-onnx-baseline-is-patched", "itae-eval", [*TINY, *EV, "--onnx-baseline", "{I}/patched.onnx"]),
    Row("eval-engine-bad-sidecar", "itae-eval", [*TINY, *EV, "--engine", "{I}/garbage.engine"],
        setup=[]),
    Row("eval-report-exists", "itae-eval", [*TINY, *EV], setup=["rep/", "rep/report.json"]),
    Row("eval-report-dir-is-a-file", "itae-eval", [*TINY, *EV[:-1], "{I}/settings.json"]),
    Row("eval-weights-and-random", "itae-eval", [*TINY, *EV, "--weights", "{I}/garbage.pth"]),
    Row("eval-unknown-dataset", "itae-eval", [*TINY, *EV[:1], "nope", *EV[2:]]),
    Row("eval-unknown-model", "itae-eval", ["dinov2_vitx99", "--random-weights", *EV], early=False),
    Row("eval-img-size-15", "itae-eval", [*TINY, "--img-size", "15", *EV], early=False),
    Row("eval-weights-garbage", "itae-eval", ["dinov2_vits14", "--img-size", "56", "--weights",
                                              "{I}/garbage.pth", *EV], early=False),
    Row("eval-missing-data-root", "itae-eval", [*TINY, "--dataset", "cifar10", "--data-root", "{I}/missing",
                                                *EV[2:]], early=False),
    # ---------------------------------------------------------------- itae-calibrate
    Row("calibrate-out-is-settings", "itae-calibrate", [*TINY, *CAL, "--settings", "{I}/settings.json", "--out",
                                                        "{I}/settings.json", "--force"]),
    Row("calibrate-out-directory", "itae-calibrate", [*TINY, *CAL, "--out", "{O}/d.json"], setup=["d.json/"]),
    Row("calibrate-out-exists", "itae-calibrate", [*TINY, *CAL, "--out", "{O}/s.json"], setup=["s.json"]),
    Row("calibrate-plot-exists", "itae-calibrate", [*TINY, *CAL, "--out", "{O}/s.json"], setup=["s.png"]),
    Row("calibrate-plot-is-out", "itae-calibrate", [*TINY, *CAL, "--out", "{O}/s.png"]),
    Row("calibrate-plot-in-a-file", "itae-calibrate", [*TINY, *CAL, "--out", "{O}/s.json", "--plot",
                                                       "{O}/file/h.png"], setup=["file"]),
    Row("calibrate-settings-wrong-type", "itae-calibrate", [*TINY, *CAL, "--out", "{O}/s.json", "--settings",
                                                            "{I}/wrong_type.json"]),
    Row("calibrate-settings-not-utf8", "itae-calibrate", [*TINY, *CAL, "--out", "{O}/s.json", "--settings",
                                                          "{I}/not_utf8.json"]),
    Row("calibrate-settings-missing", "itae-calibrate", [*TINY, *CAL, "--out", "{O}/s.json", "--settings",
                                                         "{I}/missing.json"]),
    Row("calibrate-img-abc", "itae-calibrate", [*TINY, "--img-size", "abc", *CAL, "--out", "{O}/s.json"],
        ),
]


# ------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The files the rows read: an unpatched tiny export with external data, its patched copy, garbage."""
    import onnx

    d = tmp_path_factory.mktemp("inputs")
    inline = d / "inline.onnx"
    assert export_main([*TINY, "--no-itae", "--out", str(inline)]) == 0
    onnx.save_model(onnx.load(str(inline)), str(d / "base.onnx"), save_as_external_data=True,
                    location="base.onnx.data")
    inline.unlink()
    assert patch_main([str(d / "base.onnx"), "--out", str(d / "patched.onnx"), "--copy-weights"]) == 0
    m = onnx.load(str(d / "base.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "gone.data"
    onnx.save_model(m, str(d / "no_data.onnx"))
    (d / "not_onnx.onnx").write_bytes(b"this is not a protobuf \xff\xfe" * 40)
    (d / "empty.onnx").write_bytes(b"")
    (d / "garbage.pth").write_bytes(os.urandom(4096))
    (d / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + os.urandom(64))
    (d / "garbage.engine").write_bytes(os.urandom(256))
    (d / "garbage.engine.json").write_text("{broken")
    (d / "settings.json").write_text(json.dumps({"itae": {"relative_threshold": 2.0}}) + "\n")
    (d / "settings.onnx").write_text(json.dumps({"itae": {"relative_threshold": 2.0}}) + "\n")
    (d / "wrong_type.json").write_text(json.dumps({"itae": {"threshold": "high", "alpha": [1]}}) + "\n")
    (d / "not_json.json").write_text("{'itae': threshold = 3\n")
    (d / "not_utf8.json").write_bytes(b'{"itae": {"norm_source": "\xff\xfe\xfa"}}')
    (d / "folder").mkdir()
    return d


@pytest.fixture(scope="module")
def warm(inputs) -> None:
    """Import everything the early rows touch, so their timing measures the refusal, not imports."""
    import sklearn.cluster  # noqa: F401
    import torch  # noqa: F401

    import itae_export.cluster  # noqa: F401
    import itae_export.data  # noqa: F401
    import itae_export.embed  # noqa: F401
    import itae_export.engine  # noqa: F401
    import itae_export.viz  # noqa: F401


def _tree(d: Path) -> dict[str, str]:
    """Every path under d (hidden ones too) -> sha256 of files, 'dir' for folders."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs:
            out[os.path.relpath(os.path.join(root, n), d)] = "dir"
        for n in files:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _params():
    for r in ROWS:
        marks = [pytest.mark.xfail(strict=True, reason=r.xfail)] if r.xfail else []
        yield pytest.param(r, id=f"{r.prog}:{r.id}", marks=marks)


@pytest.mark.parametrize("row", list(_params()))
def test_bad_input(row: Row, inputs: Path, warm, tmp_path: Path, capsys, monkeypatch) -> None:
    ind, outd = tmp_path / "in", tmp_path / "out"
    ind.mkdir()
    outd.mkdir()
    for p in inputs.iterdir():  # hard links: cheap, and an input written in place shows in the digests
        if p.is_dir():
            (ind / p.name).mkdir()
        else:
            os.link(p, ind / p.name)
    for name in row.setup:
        if name.endswith("/"):
            (outd / name).mkdir()
        else:
            (outd / name).write_text("existing\n")
    argv = [a.replace("{I}", str(ind)).replace("{O}", str(outd)) for a in row.argv]
    before_in, before_out = _tree(ind), _tree(outd)

    built, locked = [], []
    real_build, real_locked = models.build_model, outputs._make_locked_dir
    monkeypatch.setattr(models, "build_model", lambda *a, **k: built.append(a) or real_build(*a, **k))
    monkeypatch.setattr(pipeline, "build_torch_model", _spy(pipeline.build_torch_model, built))
    monkeypatch.setattr(outputs, "_make_locked_dir", lambda *a, **k: locked.append(a) or real_locked(*a, **k))

    capsys.readouterr()
    t0 = time.perf_counter()
    try:
        rc = MAINS[row.prog](argv)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err

    assert _tree(ind) == before_in, "an input was changed"
    assert _tree(outd) == before_out, "the output folder changed"
    assert rc != 0 and rc == row.code, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{row.prog}: error: ") and "Traceback" not in err, err
    if row.early:
        assert not built, "a model was built before the refusal"
        assert seconds < 1.0, f"refused after {seconds:.2f} s"
    if row.no_tx:
        assert not locked, "an output transaction was opened (staging or lock folder made) before the refusal"


def _spy(fn, calls: list):
    def wrapper(*a, **k):
        calls.append(a)
        return fn(*a, **k)

    return wrapper


def test_the_matrix_covers_every_cli() -> None:
    assert {r.prog for r in ROWS} == set(MAINS)
    assert len({(r.prog, r.id) for r in ROWS}) == len(ROWS)


def test_rows_leave_no_shared_state(inputs: Path) -> None:
    """The module's inputs stay as the fixture made them (rows work on hard links of them)."""
    assert not [p for p in inputs.iterdir() if p.name.startswith(".itae-")]
