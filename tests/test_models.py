"""Model catalogue: official-format checkpoints load, and the model computes what the official
DINOv2 code computes at 224 px (our own re-implementation of its token preparation and
on-the-fly position-embedding interpolation, written from the official code's description)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from itae_export.errors import ModelError
from itae_export.models import CATALOGUE, build_model, find_weights

M = 37  # official grid: 518 / 14


def _official_state_dict(name: str, seed: int = 0) -> dict:
    """A random state dict in the facebookresearch layout: pos_embed [1, 1+37*37, D] including the
    CLS position, cls_token, mask_token, register_tokens for _reg models."""
    donor = build_model(name, random_weights=True, seed=seed, img_size=224)
    g = torch.Generator().manual_seed(seed + 100)
    sd = {k: v.clone() for k, v in donor.vit.state_dict().items()}
    dim = donor.spec.embed_dim
    sd["pos_embed"] = 0.5 * torch.randn(1, 1 + M * M, dim, generator=g)
    sd["mask_token"] = torch.zeros(1, dim)
    if "reg_token" in sd:
        sd["register_tokens"] = sd.pop("reg_token")
    return sd


def _official_forward(sd: dict, donor_vit, x: torch.Tensor, registers: bool) -> torch.Tensor:
    """DINOv2's prepare_tokens_with_masks + interpolate_pos_encoding, then the blocks."""
    b, _, w, h = x.shape
    patch = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    tokens = patch.flatten(2).transpose(1, 2)
    tokens = torch.cat([sd["cls_token"].expand(b, -1, -1), tokens], dim=1)
    pos = sd["pos_embed"].float()
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    dim = pos.shape[-1]
    w0, h0 = w // 14, h // 14
    grid = patch_pos.reshape(1, M, M, dim).permute(0, 3, 1, 2)
    if registers:  # hub config of the _reg models: interpolate_offset 0, antialias True
        grid = F.interpolate(grid, size=(w0, h0), mode="bicubic", antialias=True)
    else:  # plain models: offset 0.1, antialias False
        sx, sy = (w0 + 0.1) / M, (h0 + 0.1) / M
        grid = F.interpolate(grid, scale_factor=(sx, sy), mode="bicubic", antialias=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    tokens = tokens + torch.cat([cls_pos, patch_pos], dim=1)
    if registers:
        tokens = torch.cat([tokens[:, :1], sd["register_tokens"].expand(b, -1, -1), tokens[:, 1:]], dim=1)
    for blk in donor_vit.blocks:
        tokens = blk(tokens)
    return donor_vit.norm(tokens)[:, 0]


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_official_checkpoint_matches_official_computation(name, tmp_path):
    sd = _official_state_dict(name)
    path = tmp_path / CATALOGUE[name].official_filename
    torch.save(sd, path)
    model = build_model(name, weights=path, img_size=224)
    x = torch.from_numpy(__import__("numpy").random.default_rng(0).standard_normal((2, 3, 224, 224)).astype("float32"))
    with torch.no_grad():
        got = model(x)
        want = _official_forward(sd, model.vit, x, registers=name.endswith("_reg"))
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # and timm's own load-time resampling (antialiased bicubic by size) is a different computation
    if not name.endswith("_reg"):
        timm_pos = F.interpolate(sd["pos_embed"][:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2), size=(16, 16),
                                 mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 256, -1)
        assert not torch.allclose(timm_pos, model.pos_embed_patches, atol=1e-3)


def test_timm_safetensors_layout_loads(tmp_path):
    """timm's reg4 layout (CLS position folded into cls_token, pos_embed without CLS) gives the same
    model as the official file it was converted from."""
    from safetensors.torch import save_file

    sd = _official_state_dict("dinov2_vits14_reg", seed=3)
    timm_sd = {k: v for k, v in sd.items() if k not in ("mask_token", "register_tokens", "pos_embed", "cls_token")}
    timm_sd["reg_token"] = sd["register_tokens"]
    timm_sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
    timm_sd["pos_embed"] = sd["pos_embed"][:, 1:].contiguous()
    save_file({k: v.contiguous() for k, v in timm_sd.items()}, str(tmp_path / "model.safetensors"))
    torch.save(sd, tmp_path / "official.pth")
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        a = build_model("dinov2_vits14_reg", weights=tmp_path / "model.safetensors", img_size=56)(x)
        b = build_model("dinov2_vits14_reg", weights=tmp_path / "official.pth", img_size=56)(x)
    assert torch.allclose(a, b, atol=1e-5)


def test_weight_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="does not exist"):
        build_model("dinov2_vits14", weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="could not read"):
        build_model("dinov2_vits14", weights=tmp_path / "junk.pth")
    sd = _official_state_dict("dinov2_vits14_reg")
    torch.save(sd, tmp_path / "reg.pth")
    with pytest.raises(ModelError, match="use model dinov2_vits14_reg"):
        build_model("dinov2_vits14", weights=tmp_path / "reg.pth")
    with pytest.raises(ModelError, match="embedding size 384"):
        build_model("dinov2_vitb14_reg", weights=tmp_path / "reg.pth")
    with pytest.raises(ModelError, match="multiple of 14"):
        build_model("dinov2_vits14", random_weights=True, img_size=100)
    with pytest.raises(ModelError, match="unknown model"):
        build_model("dinov3_vits16", random_weights=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelError) as e:
        find_weights(CATALOGUE["dinov2_vitl14"])
    assert "dinov2_vitl14_pretrain.pth" in str(e.value) and "--weights" in str(e.value)


def test_cache_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    sd = _official_state_dict("dinov2_vits14")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(sd, tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth")
    assert find_weights(CATALOGUE["dinov2_vits14"]).name == "dinov2_vits14_pretrain.pth"
    assert build_model("dinov2_vits14", img_size=28)(torch.randn(1, 3, 28, 28)).shape == (1, 384)


def test_random_weights_are_seeded_and_distinct():
    a = build_model("dinov2_vits14", random_weights=True, seed=1, depth=2, img_size=28)
    b = build_model("dinov2_vits14", random_weights=True, seed=1, depth=2, img_size=28)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    one_d = [p for p in a.parameters() if p.ndim == 1]
    keys = {tuple(p[:4].tolist()) for p in one_d}
    assert len(keys) == len(one_d), "1-D parameters must differ or exporters merge them"


def test_catalogue():
    assert set(CATALOGUE) == {f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")}
    g = CATALOGUE["dinov2_vitg14_reg"]
    assert (g.embed_dim, g.depth, g.num_heads, g.num_registers) == (1536, 40, 24, 4)
    assert g.official_filename == "dinov2_vitg14_reg4_pretrain.pth"
    assert math.isclose(CATALOGUE["dinov2_vitl14"].embed_dim / CATALOGUE["dinov2_vitl14"].num_heads, 64)
