"""Shared fixtures: tiny random DINOv2 models (depth 2, 56 px: 16 patches) exported once per
exporter and variant, and the planted-artifact model."""

from __future__ import annotations

import contextlib
import os
import subprocess

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)

IMG = 56
DEPTH = 2
VARIANTS = {"plain": "dinov2_vits14", "reg": "dinov2_vits14_reg"}


def tiny_model(variant: str = "plain", seed: int = 0):
    from itae_export.models import build_model

    return build_model(VARIANTS[variant], random_weights=True, seed=seed, depth=DEPTH, img_size=IMG)


@pytest.fixture(scope="session")
def tiny_models():
    return {v: tiny_model(v) for v in VARIANTS}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_models):
    """{(variant, exporter): path} of baseline ONNX exports, made once per session."""
    from itae_export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("exports")
    cache: dict = {}

    def get(variant: str, exporter: str):
        key = (variant, exporter)
        if key not in cache:
            cache[key] = export_onnx(tiny_models[variant], root / f"{variant}-{exporter}.onnx", img_size=IMG, exporter=exporter)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def images():
    return torch.from_numpy(np.random.default_rng(1).standard_normal((3, 3, IMG, IMG)).astype(np.float32))


ARTIFACT_DIM = 7


def planted_artifact_model(seed: int = 0, img_size: int = IMG, n_images: int = 4):
    """Seeded random DINOv2-S (depth 2) with ordinary weights edited so that bright patches become
    high-norm artifact tokens in the last block, as Darcet et al. describe for large DINOv2.

    - patch embedding: one channel (ARTIFACT_DIM) sums the patch brightness, offset so that the
      mid-grey texture of the test images maps to about 0 and a bright (+3) patch to about 150;
    - last block: that channel dominates the LayerNorm output of bright tokens; V's weights on it
      are scaled up (long v vectors) and K's weights on it point along the CLS query (the CLS token
      attends to them strongly, as to real artifacts).

    Returns (model, images [B,3,H,W] float32 tensor, artifact mask [B, N patches] bool).
    """
    from itae_export.models import build_model

    model = build_model("dinov2_vits14", random_weights=True, seed=seed, depth=2, img_size=img_size)
    vit = model.vit
    d = ARTIFACT_DIM
    dim = model.spec.embed_dim
    with torch.no_grad():
        w = vit.patch_embed.proj.weight
        w[d] = 50.0 / w[d].numel()
        vit.patch_embed.proj.bias[d] = 0.0
        model.pos_embed_patches[..., d] = 0.0
        model.cls_token_pos[..., d] = 0.0
        for blk in vit.blocks:
            blk.ls1.gamma[d] = 0.0  # keep the planted channel as the patch embedding made it
            blk.ls2.gamma[d] = 0.0
    g = torch.Generator().manual_seed(seed + 7)
    gh = img_size // 14
    imgs = 0.3 * torch.randn(n_images, 3, img_size, img_size, generator=g)
    mask = torch.zeros(n_images, gh * gh, dtype=torch.bool)
    for b in range(n_images):
        picks = torch.randperm(gh * gh, generator=g)[: 1 + b % 3]  # 1..3 bright patches per image
        for p in picks.tolist():
            r, c = divmod(p, gh)
            imgs[b, :, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] = 3.0
            mask[b, p] = True
    last = vit.blocks[-1]
    with torch.no_grad():
        x = model.tokens(imgs)
        for blk in vit.blocks[:-1]:
            x = blk(x)
        ln_cls = last.norm1(x)[:, 0]
        wq, bq = last.attn.qkv.weight[:dim], last.attn.qkv.bias[:dim]
        q_cls = (ln_cls @ wq.T + bq).mean(0)
        last.attn.qkv.weight[dim : 2 * dim, d] = 0.5 * q_cls / q_cls.norm()
        last.attn.qkv.weight[2 * dim :, d] *= 10.0
    return model.eval(), imgs, mask


@pytest.fixture(scope="session")
def planted():
    return planted_artifact_model()


@contextlib.contextmanager
def mounted_tmpfs(folder, size: str):
    """A tmpfs of `size` mounted at `folder` (created); skips the test when not root or the mount
    fails; always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def marked_progress_bars(monkeypatch):
    """tqdm bars that write "[bar DESC closed at N/TOTAL]" to stderr when an enabled bar closes
    (renders are rate-limited, so the closing count is what a test can check)."""
    import sys

    import tqdm

    class Marked(tqdm.tqdm):
        def close(self):
            if not self.disable and not getattr(self, "_marked", False):
                self._marked = True
                sys.stderr.write(f"[bar {self.desc} closed at {self.n}/{self.total}]\n")
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Marked)
    return Marked


@pytest.fixture(scope="session")
def collection_models(tmp_path_factory):
    """Two itae-export artifacts (ITAE applied, metadata recorded) of tiny random DINOv2-S models (depth 1,
    56 px), seeds 0 and 1, for itae-embed / itae-cluster: {seed: path}."""
    import itae_export

    root = tmp_path_factory.mktemp("collection-models")
    out = {}
    for seed in (0, 1):
        out[seed] = root / f"s{seed}.onnx"
        itae_export.export("dinov2_vits14", out[seed], random_weights=True, seed=seed, depth=1, img_size=IMG,
                           exporter="torchscript", validate=False)
    return out
