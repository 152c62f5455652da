"""A synthetic demo model on which ITAE visibly acts (`--demo-artifacts`).

Random weights have no high-norm artifact tokens, so on them ITAE flags nothing and changes nothing.
The demo model is a seeded random DINOv2 whose ordinary weights are edited so that a few background
patch tokens (the image corners) behave like the artifacts Darcet et al. describe in large DINOv2:

- one embedding channel (DEMO_CHANNEL) is zero everywhere except at the corner positions, where
  the position embedding sets it to BETA; no block writes into it (its LayerScale entries are 0),
  so it passes through the network unchanged and the earlier blocks barely notice it;
- the final block's LayerNorm amplifies that channel (GAIN), its value weights on it are scaled up
  (VALUE_GAIN: long v vectors) and its key weights on it point along the CLS query (KEY_GAIN: the
  CLS token attends to those tokens strongly);
- the final block's attention LayerScale is raised to about 1 in the clean model and the demo model
  alike, so the final attention shapes the CLS feature, as it does in trained models.

`demo_model(..., artifacts=False)` is the same model without the planted tokens: the "clean"
reference that `itae-eval --demo-artifacts` compares against. Everything here is synthetic and
labelled so wherever it is used; real weights are one flag away (`--weights`).
"""

from __future__ import annotations

import torch

DEMO_CHANNEL = 7
BETA = 3.0
GAIN = 30.0
VALUE_GAIN = 10.0
KEY_GAIN = 3.0
FINAL_LAYERSCALE = 1.0
LABEL = "synthetic demo model: seeded random weights with planted artifact tokens (--demo-artifacts)"


def artifact_positions(grid: int) -> list[int]:
    """Patch indices of the planted artifacts: a corner block of max(1, grid // 8) patches a side in
    each of the four corners (background in centred photos and in every digit)."""
    c = max(1, grid // 8)
    rows = list(range(c)) + list(range(grid - c, grid))
    return sorted({r * grid + col for r in rows for col in rows})


def _raise_final_layerscale(model) -> None:
    ls = model.vit.blocks[-1].ls1.gamma
    ls.mul_(FINAL_LAYERSCALE / ls.abs().mean())


@torch.no_grad()
def _plant(model, seed: int) -> list[int]:
    vit, d, dim = model.vit, DEMO_CHANNEL, model.spec.embed_dim
    grid = model.grid[0] if isinstance(model.grid, tuple) else int(model.grid)
    positions = artifact_positions(grid)
    vit.patch_embed.proj.weight[d] = 0.0
    vit.patch_embed.proj.bias[d] = 0.0
    model.pos_embed_patches[..., d] = 0.0
    model.cls_token_pos[..., d] = 0.0
    model.pos_embed_patches[0, positions, d] = BETA
    # the same corners on the 37x37 source grid, which a dynamic-size model interpolates per input
    source = model.pos_embed_source
    side = int(round(source.shape[1] ** 0.5))
    source[..., d] = 0.0
    source[0, artifact_positions(side), d] = BETA
    for blk in vit.blocks:
        blk.ls1.gamma[d] = 0.0
        blk.ls2.gamma[d] = 0.0
    last = vit.blocks[-1]
    last.norm1.weight[d] *= GAIN
    # the key weights on the planted channel point along the mean CLS query of a fixed random batch
    size = model.img_size
    g = torch.Generator().manual_seed(seed + 1)
    x = model.tokens(torch.randn(8, 3, size, size, generator=g))
    for blk in vit.blocks[:-1]:
        x = blk(x)
    q_cls = (last.norm1(x)[:, 0] @ last.attn.qkv.weight[:dim].T + last.attn.qkv.bias[:dim]).mean(0)
    last.attn.qkv.weight[dim:2 * dim, d] = KEY_GAIN * q_cls / q_cls.norm() / GAIN
    last.attn.qkv.weight[2 * dim:, d] *= VALUE_GAIN
    return positions


def demo_model(name: str, *, img_size: int, seed: int = 0, depth: int | None = None, artifacts: bool = True):
    """The demo embedder (seeded random weights, final LayerScale raised), with the planted
    artifact tokens unless `artifacts=False`. The positions are in `model.demo_positions`."""
    from .models import build_model

    model = build_model(name, random_weights=True, seed=seed, img_size=img_size, depth=depth)
    with torch.no_grad():
        _raise_final_layerscale(model)
    model.demo_positions = _plant(model, seed) if artifacts else []
    return model.eval()
