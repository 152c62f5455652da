"""Hugging Face transformers DINOv2 checkpoints (hf_weights): a random transformers model saved
with save_pretrained loads into our embedder, which then gives transformers' own final-norm CLS
token at 518 px (37x37 patches: no interpolation anywhere).

At other sizes the reference is the official facebookresearch rule, not transformers:
- `_reg` models: transformers' Dinov2WithRegistersModel interpolates by size with antialias, as the
  official hub configs of the _reg models do, so transformers itself is the reference at 224 px;
- plain models: transformers' Dinov2Model (5.x; the rule has changed between releases) interpolates
  by size without the official 0.1 offset, so at 224 px the reference is transformers' model fed
  position embeddings interpolated here by the official rule (by scale factor (g + 0.1) / 37,
  antialias off), which transformers then adds without interpolating.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from itae_export.catalogue import CATALOGUE  # noqa: E402
from itae_export.errors import ModelError  # noqa: E402
from itae_export.hf_weights import (  # noqa: E402
    check_hf_config,
    hf_checkpoint_files,
    hf_to_official,
    is_hf_checkpoint,
    load_hf_checkpoint,
)
from itae_export.models import build_model, default_weight_locations, find_weights  # noqa: E402

M = 37
SMALL = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "image_size": 518, "patch_size": 14}
NAMES = {"plain": "dinov2_vits14", "reg": "dinov2_vits14_reg"}


def _randomize_hf_(model, seed: int) -> None:
    """Seeded weights; every 1-D parameter distinct, layer scales large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(0.1 + 0.05 * torch.rand(p.shape, generator=g))
            elif "embeddings." in name and not name.startswith("embeddings.patch"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))  # cls, mask, register tokens, positions
            elif p.ndim == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))


def _hf_model(variant: str, seed: int = 0, **overrides):
    if variant == "reg":
        cfg = transformers.Dinov2WithRegistersConfig(**{**SMALL, "num_register_tokens": 4, **overrides})
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**{**SMALL, **overrides}))
    _randomize_hf_(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{variant: (transformers model, save_pretrained folder)} for the two ViT-S/14 variants."""
    out = {}
    for i, variant in enumerate(NAMES):
        model = _hf_model(variant, seed=10 + i)
        folder = tmp_path_factory.mktemp(f"hf-{variant}")
        model.save_pretrained(folder)
        out[variant] = (model, folder)
    return out


def _images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _hf_cls(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state[:, 0]  # after the final layernorm


def _ours(name: str, weights, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return build_model(name, weights=weights, img_size=x.shape[-1])(x)


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("variant", list(NAMES))
def test_matches_transformers_at_518(hf, variant):
    model, folder = hf[variant]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert is_hf_checkpoint(folder) and is_hf_checkpoint(folder / "model.safetensors")
    x = _images(518, n=1)
    want = _hf_cls(model, x)
    assert _max_diff(_ours(NAMES[variant], folder, x), want) <= 1e-4
    assert _max_diff(_ours(NAMES[variant], folder / "model.safetensors", x), want) <= 1e-4


def test_reg_matches_transformers_at_224(hf):
    """Dinov2WithRegistersModel interpolates like the official _reg models (by size, antialias)."""
    model, folder = hf["reg"]
    x = _images(224)
    assert _max_diff(_ours("dinov2_vits14_reg", folder, x), _hf_cls(model, x)) <= 1e-4


def test_plain_follows_official_interpolation_at_224(hf):
    model, folder = hf["plain"]
    x = _images(224)
    pos = model.embeddings.position_embeddings.detach()
    grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(16.1 / M, 16.1 / M), mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (16, 16)
    official_pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    ref = transformers.Dinov2Model(transformers.Dinov2Config(**{**SMALL, "image_size": 224})).eval()
    sd = dict(model.state_dict(), **{"embeddings.position_embeddings": official_pos})
    ref.load_state_dict(sd)
    assert _max_diff(_ours("dinov2_vits14", folder, x), _hf_cls(ref, x)) <= 1e-4


@pytest.mark.parametrize("variant", list(NAMES))
def test_same_model_as_the_official_layout(hf, variant, tmp_path):
    """The HF folder and the official-layout .pth made from it build the same embedder."""
    name = NAMES[variant]
    _, folder = hf[variant]
    sd = load_hf_checkpoint(folder, CATALOGUE[name])
    assert sd["pos_embed"].shape == (1, 1 + M * M, 384) and sd["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert ("register_tokens" in sd) == (variant == "reg")
    torch.save(sd, tmp_path / "official.pth")
    x = _images(56)
    assert _max_diff(_ours(name, folder, x), _ours(name, tmp_path / "official.pth", x)) == 0.0


def test_transformers5_state_dict_names(hf, tmp_path):
    """`model.state_dict()` in transformers 5.x uses q_proj/k_proj/v_proj/o_proj, unlike the files
    save_pretrained writes (attention.attention.query...); both load to the same model."""
    from safetensors.torch import save_file

    model, folder = hf["plain"]
    live = model.state_dict()
    assert any(".attention.q_proj." in k for k in live)
    saved = tmp_path / "live"
    saved.mkdir()
    save_file({k: v.contiguous() for k, v in live.items()}, str(saved / "model.safetensors"))
    shutil.copy(folder / "config.json", saved / "config.json")
    x = _images(56)
    assert _max_diff(_ours("dinov2_vits14", saved, x), _ours("dinov2_vits14", folder, x)) == 0.0


@pytest.mark.parametrize("layout", ["saved", "live"])
def test_swiglu_mapping(layout, tmp_path):
    """Giant's SwiGLU (weights_in/weights_out in files, gate/up/down_proj in transformers 5.x) becomes
    the official w12/w3, which models.py hands to timm's packed SwiGLU: same MLP output."""
    from safetensors.torch import load_file
    from timm.layers import SwiGLUPacked

    model = _hf_model("plain", seed=3, num_hidden_layers=1, hidden_size=48, num_attention_heads=2,
                      use_swiglu_ffn=True)
    if layout == "saved":
        model.save_pretrained(tmp_path)
        sd = load_file(str(tmp_path / "model.safetensors"))
        assert "encoder.layer.0.mlp.weights_in.weight" in sd
    else:
        sd = model.state_dict()
        assert "encoder.layer.0.mlp.gate_proj.weight" in sd
    off = hf_to_official(sd, 1, "test", swiglu=True)
    hidden = off["blocks.0.mlp.w3.weight"].shape[1]
    mlp = SwiGLUPacked(in_features=48, hidden_features=2 * hidden)
    mlp.load_state_dict({"fc1.weight": off["blocks.0.mlp.w12.weight"], "fc1.bias": off["blocks.0.mlp.w12.bias"],
                         "fc2.weight": off["blocks.0.mlp.w3.weight"], "fc2.bias": off["blocks.0.mlp.w3.bias"]})
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _max_diff(mlp(x), model.encoder.layer[0].mlp(x)) <= 1e-6


def test_sharded_checkpoint(hf, tmp_path):
    model, folder = hf["reg"]
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="4MB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    x = _images(56)
    want = _ours("dinov2_vits14_reg", folder, x)
    assert _max_diff(_ours("dinov2_vits14_reg", sharded, x), want) == 0.0
    assert _max_diff(_ours("dinov2_vits14_reg", sharded / "model.safetensors.index.json", x), want) == 0.0
    assert [p.name for p in hf_checkpoint_files(sharded)][2:] == shards
    # a missing shard, and an index pointing outside its folder, are refused
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    (sharded / shards[-1]).rename(tmp_path / shards[-1])
    with pytest.raises(ModelError, match=f"shard .*{shards[-1]}.* is missing"):
        build_model("dinov2_vits14_reg", weights=sharded)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../" + shards[-1]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="not a plain .safetensors file name"):
        build_model("dinov2_vits14_reg", weights=sharded)


def test_config_must_match_the_model_name(hf):
    _, folder = hf["plain"]
    with pytest.raises(ModelError) as e:
        build_model("dinov2_vitb14", weights=folder)
    msg = str(e.value)
    assert str(folder / "config.json") in msg and "facebook/dinov2-small" in msg and "dinov2_vitb14" in msg
    assert "pass model dinov2_vits14" in msg and "\n" not in msg
    with pytest.raises(ModelError, match="facebook/dinov2-small .*not dinov2_vits14_reg"):
        build_model("dinov2_vits14_reg", weights=folder)
    _, reg_folder = hf["reg"]
    with pytest.raises(ModelError, match="dinov2-with-registers-small .*not dinov2_vits14 "):
        build_model("dinov2_vits14", weights=reg_folder)


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "vit", "'vit' model, not DINOv2"),
    ("patch_size", 16, "patch_size 16"),
    ("use_swiglu_ffn", True, "use_swiglu_ffn True"),
    ("hidden_act", "gelu_new", "hidden_act gelu_new"),
    ("layer_norm_eps", 1e-5, "layer_norm_eps"),
    ("qkv_bias", False, "qkv_bias False"),
])
def test_config_fields_are_checked(field, value, match, tmp_path):
    cfg = {"model_type": "dinov2", **SMALL, field: value}
    with pytest.raises(ModelError, match=match):
        check_hf_config(cfg, CATALOGUE["dinov2_vits14"], tmp_path / "config.json")
    giant = {"model_type": "dinov2", "hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24,
             "patch_size": 14}
    with pytest.raises(ModelError, match="use_swiglu_ffn False"):
        check_hf_config(giant, CATALOGUE["dinov2_vitg14"], tmp_path / "config.json")
    assert check_hf_config({**giant, "use_swiglu_ffn": True}, CATALOGUE["dinov2_vitg14"], tmp_path)["mlp_ratio"] == 4


def test_bad_folders_and_configs(hf, tmp_path):
    _, folder = hf["plain"]
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(folder / "model.safetensors", no_config)
    assert not is_hf_checkpoint(no_config)
    with pytest.raises(ModelError, match=r"no-config is a folder without config.json; pass a Hugging Face "
                                         r"facebook/dinov2-small folder \(config.json \+ model.safetensors\)"):
        build_model("dinov2_vits14", weights=no_config)
    with pytest.raises(ModelError, match="folder without config.json or model.safetensors;"):
        build_model("dinov2_vits14", weights=no_config.parent)  # a folder of folders
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(folder / "model.safetensors", bad)
    text = (folder / "config.json").read_text()
    for content, match in [
        (text.replace('"layer_norm_eps": 1e-06', '"layer_norm_eps": NaN'), "not valid JSON .*NaN"),
        (text.replace("{", '{"hidden_size": 384,', 1), "not valid JSON .*duplicate key 'hidden_size'"),
        ("[1, 2]", "JSON list, not an object"),
        (" " * (2 << 20), "over the 1048576-byte limit"),
    ]:
        (bad / "config.json").write_text(content)
        with pytest.raises(ModelError, match=match):
            build_model("dinov2_vits14", weights=bad)


def test_depth_truncated_checkpoints(hf, tmp_path):
    """A 6-layer model (config and tensors agree) is not dinov2_vits14; a config saying 12 layers over
    tensors of 6 is a truncated file; tensors of 12 layers under a 6-layer config do not belong."""
    short = tmp_path / "short"
    _hf_model("plain", seed=5, num_hidden_layers=6).save_pretrained(short)
    with pytest.raises(ModelError, match="a DINOv2 variant with hidden 384, 6 layers.*not dinov2_vits14 "
                                         r"\(hidden 384, 12 layers"):
        build_model("dinov2_vits14", weights=short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 12}))
    with pytest.raises(ModelError, match="lacks tensor 'encoder.layer.6.norm1.weight'; the checkpoint is truncated"):
        build_model("dinov2_vits14", weights=short)
    _, folder = hf["plain"]
    sd = hf_to_official(load_file_dict(folder), 12, folder)
    assert sum(k.endswith("attn.qkv.weight") for k in sd) == 12
    with pytest.raises(ModelError, match=r"layers 6\.\.11 beyond config.json's 6"):
        hf_to_official(load_file_dict(folder), 6, folder)


def load_file_dict(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_timm_snapshot_is_not_transformers(tmp_path):
    """timm's HF snapshots hold config.json too (no model_type): they stay timm files."""
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch14_dinov2", "num_classes": 0}))
    assert not is_hf_checkpoint(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    assert is_hf_checkpoint(tmp_path / "model.safetensors") and is_hf_checkpoint(tmp_path)


def _cache_env(monkeypatch, tmp_path, *, via_home: bool = False):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    if via_home:
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        return tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _snapshot(hub, repo: str, revision: str, src, main: bool = True):
    snap = hub / f"models--facebook--{repo}" / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    if main:
        (hub / f"models--facebook--{repo}" / "refs").mkdir(exist_ok=True)
        (hub / f"models--facebook--{repo}" / "refs" / "main").write_text(revision)
    return snap


@pytest.mark.parametrize("variant,repo", [("plain", "dinov2-small"), ("reg", "dinov2-with-registers-small")])
def test_default_search_finds_the_hf_cache(hf, variant, repo, tmp_path, monkeypatch):
    name = NAMES[variant]
    hub = _cache_env(monkeypatch, tmp_path, via_home=variant == "reg")
    spec = CATALOGUE[name]
    with pytest.raises(ModelError, match=f"models--facebook--{repo}"):
        find_weights(spec)
    model, folder = hf[variant]
    older = _snapshot(hub, repo, "0" * 40, folder, main=False)
    (older / "config.json").unlink()  # an incomplete download is skipped
    snap = _snapshot(hub, repo, "f" * 40, folder)
    assert find_weights(spec) == snap / "model.safetensors"
    x = _images(518, n=1)
    with torch.no_grad():
        got = build_model(name, img_size=518)(x)
    assert _max_diff(got, _hf_cls(model, x)) <= 1e-4


def test_search_order(hf, tmp_path, monkeypatch):
    """torch hub .pth first, then timm's snapshot, then transformers' snapshot (refs/main first)."""
    hub = _cache_env(monkeypatch, tmp_path)
    spec = CATALOGUE["dinov2_vits14"]
    _, folder = hf["plain"]
    a = _snapshot(hub, "dinov2-small", "a" * 40, folder, main=False)
    b = _snapshot(hub, "dinov2-small", "b" * 40, folder)
    assert find_weights(spec) == b / "model.safetensors"
    timm_snap = hub / "models--timm--vit_small_patch14_dinov2.lvd142m" / "snapshots" / ("c" * 40)
    timm_snap.mkdir(parents=True)
    (timm_snap / "model.safetensors").write_bytes(b"x")
    assert find_weights(spec) == timm_snap / "model.safetensors"
    pth = tmp_path / "torch" / "hub" / "checkpoints" / spec.official_filename
    pth.parent.mkdir(parents=True)
    pth.write_bytes(b"x")
    assert find_weights(spec) == pth
    assert default_weight_locations(spec) == [pth, timm_snap / "model.safetensors", b / "model.safetensors",
                                              a / "model.safetensors"]


@pytest.mark.parametrize("variant", list(NAMES))
def test_export_through_weights_folder_matches_the_official_layout(hf, variant, tmp_path):
    """itae-export --weights FOLDER (transformers' save_pretrained output): the export validates
    against PyTorch built from the folder, which computes what the same weights in the official
    layout compute (so one export stands for both)."""
    from itae_export.cli import export_main

    name = NAMES[variant]
    _, folder = hf[variant]
    torch.save(load_hf_checkpoint(folder, CATALOGUE[name]), tmp_path / "official.pth")
    x = _images(56, n=3)
    assert _max_diff(_ours(name, folder, x), _ours(name, tmp_path / "official.pth", x)) <= 1e-6
    outs = {"hf": tmp_path / "hf.onnx"}
    assert export_main([name, "--weights", str(folder), "--img-size", "56", "--out", str(outs["hf"])]) == 0
    # the export records the weights' digest, so validation can tell other weights of the same name
    import onnx

    from itae_export.embed import weights_digest

    meta = {q.key: q.value for q in onnx.load(str(outs["hf"]), load_external_data=False).metadata_props}
    assert meta["itae_export.weights_sha256"] == weights_digest(folder)["sha256"]
    import json

    import itae_export
    from itae_export.errors import ItaeError

    other = tmp_path / "other" / folder.name  # same folder name, different bytes
    shutil.copytree(folder, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["_name_or_path"] = "someone-else/dinov2-small"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ItaeError, match="sha256") as ei:
        itae_export.validate(outs["hf"], weights=other, n_random=2)
    assert ei.value.exit_code == 2
    assert itae_export.validate(outs["hf"], weights=folder, n_random=2)
