"""The synthetic demo model (--demo-artifacts): the planted tokens are exactly what ITAE flags, the
CLS attention leaves them, and the clean twin has none."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graph_passes.config import ITAEConfig
from itae_export.demo import artifact_positions, demo_model
from itae_export.errors import UsageError
from itae_export.reference import last_block_stats

IMG = 56


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_itae_flags_exactly_the_planted_tokens(name):
    model = demo_model(name, img_size=IMG, depth=3)
    grid = IMG // 14
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((4, 3, IMG, IMG)).astype(np.float32))
    st = last_block_stats(model, x, ITAEConfig())
    npre = st["num_prefix_tokens"]
    flagged = st["flagged"][:, npre:].astype(bool)
    want = np.zeros(grid * grid, bool)
    want[artifact_positions(grid)] = True
    assert (flagged == want).all(), np.argwhere(flagged)
    before = (st["cls_attn_before"].mean(1)[:, npre:] * want).sum(-1)
    after = (st["cls_attn_after"].mean(1)[:, npre:] * want).sum(-1)
    assert before.min() > 0.5 and (after < before / 10).all()  # the CLS attention leaves the artifacts


def test_clean_twin_has_no_artifacts():
    clean = demo_model("dinov2_vits14", img_size=IMG, depth=3, artifacts=False)
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((4, 3, IMG, IMG)).astype(np.float32))
    st = last_block_stats(clean, x, ITAEConfig())
    assert not st["flagged"].any() and clean.demo_positions == []


def test_artifact_positions_scale_with_the_grid():
    assert artifact_positions(4) == [0, 3, 12, 15]
    assert len(artifact_positions(16)) == 16 and 0 in artifact_positions(16) and 255 in artifact_positions(16)


def test_demo_artifacts_refuses_real_weights(tmp_path):
    import itae_export

    with pytest.raises(UsageError, match="--demo-artifacts"):
        itae_export.export("dinov2_vits14", tmp_path / "m.onnx", weights=tmp_path / "w.pth", demo_artifacts=True)
    assert not list(tmp_path.iterdir())
