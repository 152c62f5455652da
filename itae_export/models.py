"""DINOv2 model catalogue: timm backbones that compute what the official facebookresearch model
computes at the chosen image size.

timm resamples the position embedding once at load time (bicubic, antialias on, by size); the
official code interpolates on the fly (plain models: by scale factor with a 0.1 offset, antialias
off; `_reg` models: by size, antialias on). We keep the 37x37 source grid. A fixed-size model runs
the official interpolation once at build time and bakes the result as a constant buffer; a
dynamic-size export computes the same rule in the graph as matrix products (pos_embed.py,
docs/dynamic-size.md). Neither holds a bicubic Resize (which also sidesteps exporter failures on
antialiased upsampling and TensorRT's missing antialias).

Weights: the official `.pth`, timm's `model.safetensors`, or a Hugging Face transformers checkpoint
(`facebook/dinov2[-with-registers]-<size>` folder, read into the official layout by hf_weights).
Without --weights, `find_weights` searches the caches in the order `default_weight_locations` gives.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from .catalogue import CATALOGUE, SOURCE_GRID, ModelSpec, get_spec  # noqa: F401 - re-exported
from .errors import ModelError
from .hf_weights import INDEX, WEIGHTS, hf_repo_name, is_hf_checkpoint, load_hf_checkpoint
from .pos_embed import interpolate_in_graph, interpolate_official
from .safe_io import check_tensor_dict, load_tensor_file


def interpolate_pos_embed_official(
    patch_pos: torch.Tensor, grid: tuple[int, int], *, registers: bool
) -> torch.Tensor:
    """Official DINOv2 interpolation of the patch position embeddings [1, M*M, D] -> [1, gh*gw, D]
    (pos_embed.interpolate_official: plain models by scale factor with the 0.1 offset, antialias
    off; `_reg` models by size, antialias on)."""
    return interpolate_official(patch_pos, grid, registers=registers)


POS_MODES = ("fixed", "official", "graph")


class DinoV2Embedder(nn.Module):
    """forward(pixel_values [B,3,H,W], ImageNet-normalised) -> final-norm CLS token [B, D].

    Tokens are [CLS, registers..., patches...]; the CLS token carries its own position embedding
    (added at build time) and registers carry none, as in the official code.

    `pos_mode` says where the patch position embedding comes from:
    - "fixed" (default): interpolated once, at build time, for `img_size` (a constant in the graph);
    - "official": interpolated for each input's size by the official call (the eager reference of a
      dynamic-size model);
    - "graph": the same rule as matrix products of the input's size (pos_embed.interpolate_in_graph),
      which is what a dynamic-size export traces.
    """

    def __init__(self, spec: ModelSpec, vit: nn.Module, cls_pos: torch.Tensor, patch_pos_src: torch.Tensor, img_size: int):
        super().__init__()
        self.spec = spec
        self.vit = vit
        self.img_size = img_size
        self.grid = (img_size // spec.patch_size, img_size // spec.patch_size)
        self.num_prefix_tokens = 1 + spec.num_registers
        self.pos_mode = "fixed"
        pos = interpolate_pos_embed_official(patch_pos_src, self.grid, registers=spec.num_registers > 0)
        self.register_buffer("pos_embed_patches", pos.detach().clone(), persistent=False)
        self.register_buffer("pos_embed_source", patch_pos_src.detach().clone(), persistent=False)
        self.register_buffer("cls_token_pos", (vit.cls_token + cls_pos).detach().clone(), persistent=False)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    def patch_positions(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[1, gh*gw, D] position embeddings of the patches of this input, by `pos_mode`."""
        if self.pos_mode == "fixed":
            return self.pos_embed_patches
        registers = self.spec.num_registers > 0
        p = self.spec.patch_size
        if self.pos_mode == "official":
            grid = (pixel_values.shape[2] // p, pixel_values.shape[3] // p)
            return interpolate_official(self.pos_embed_source, grid, registers=registers)
        if torch.jit.is_tracing():  # the TorchScript exporter: sizes as traced tensors, not constants
            hw = torch._shape_as_tensor(pixel_values)[2:]
            gh, gw = hw[0] // p, hw[1] // p
        else:  # eager, or torch.export's symbolic sizes
            gh, gw = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        return interpolate_in_graph(self.pos_embed_source, gh, gw, registers=registers)

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Input tokens of the first block, [B, T, D]."""
        b = pixel_values.shape[0]
        x = self.vit.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
        x = x + self.patch_positions(pixel_values)
        parts = [self.cls_token_pos.expand(b, -1, -1)]
        if self.spec.num_registers:
            parts.append(self.vit.reg_token.expand(b, -1, -1))
        return torch.cat(parts + [x], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.tokens(pixel_values)
        for blk in self.vit.blocks:
            x = blk(x)
        return self.vit.norm(x)[:, 0]


def _create_timm(spec: ModelSpec, img_size: int, depth: int | None) -> nn.Module:
    import timm

    kwargs = {"pretrained": False, "img_size": img_size, "num_classes": 0}
    if depth is not None:
        kwargs["depth"] = depth
    vit = timm.create_model(spec.timm_name, **kwargs)
    return vit.eval()


def randomize_(module: nn.Module, seed: int) -> None:
    """Seeded random weights where every 1-D parameter is distinct (exporters merge identical
    initializers, which would change the graph the pass sees)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim <= 1:
                base = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight" else 0.0
                if ".ls" in name or name.startswith("ls"):
                    # LayerScale: large enough that every block changes the tokens
                    p.copy_(0.1 + 0.05 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(fan_in, 1)))


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (safe_io.load_tensor_file), unwrapped from a model/state_dict/teacher container;
    non-tensor entries and NaN/Inf values are refused naming the key."""
    sd = load_tensor_file(path, "--weights")
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return check_tensor_dict(sd, path)


def _load_weights(path: Path, spec: ModelSpec) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, whether its pos_embed includes the CLS position) of an official .pth, a timm
    .safetensors or a Hugging Face transformers checkpoint (hf_weights: folder or file + config.json)."""
    if is_hf_checkpoint(path):
        return load_hf_checkpoint(path, spec), True
    if path.is_dir():
        lacks = [n for n, alt in (("config.json", None), (WEIGHTS, INDEX))
                 if not (path / n).is_file() and not (alt and (path / alt).is_file())]
        raise ModelError(
            f"--weights {path} is a folder without {' or '.join(lacks) or 'a transformers config.json'}; pass "
            f"a Hugging Face {hf_repo_name(spec)} folder (config.json + {WEIGHTS}), or a .pth / .safetensors file"
        )
    return _load_state_dict(path), False


def _split_official_or_timm(
    sd: dict[str, torch.Tensor], spec: ModelSpec, *, cls_in_pos: bool = False
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Return (timm state dict without pos_embed, cls position [1,1,D], patch positions [1,M*M,D]).
    `cls_in_pos`: the position embedding is known to start with the CLS position (HF checkpoints)."""
    sd = dict(sd)
    sd.pop("mask_token", None)
    pos = sd.pop("pos_embed", None)
    if pos is None:
        raise ModelError("weights have no 'pos_embed'; is this a DINOv2 checkpoint?")
    dim = spec.embed_dim
    if pos.shape[-1] != dim:
        raise ModelError(
            f"weights have embedding size {pos.shape[-1]} but {spec.name} has {dim}; pick the model that matches the file"
        )
    official = cls_in_pos or "register_tokens" in sd or any(".mlp.w12." in k for k in sd) \
        or pos.shape[1] == SOURCE_GRID**2 + 1
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
    for k in list(sd):
        if ".mlp.w12." in k:
            sd[k.replace(".mlp.w12.", ".mlp.fc1.")] = sd.pop(k)
        elif ".mlp.w3." in k:
            sd[k.replace(".mlp.w3.", ".mlp.fc2.")] = sd.pop(k)
    n = pos.shape[1]
    if official and math.isqrt(n - 1) ** 2 == n - 1:
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    elif math.isqrt(n) ** 2 == n:
        # timm `no_embed_class` layout (reg4 models): the CLS position is folded into cls_token
        cls_pos, patch_pos = torch.zeros(1, 1, dim, dtype=pos.dtype), pos
    else:
        raise ModelError(f"position embedding with {n} entries matches no square grid")
    has_reg = "reg_token" in sd
    if has_reg != (spec.num_registers > 0):
        hint = f"{spec.name}_reg" if has_reg else spec.name.replace("_reg", "")
        raise ModelError(f"weights {'have' if has_reg else 'lack'} register tokens; use model {hint}")
    return sd, cls_pos, patch_pos


def _hf_hub_cache() -> Path:
    """huggingface_hub's cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))


def _hf_cache_repo(spec: ModelSpec) -> Path:
    """The cache folder of the model's transformers repository, models--facebook--dinov2-<...>."""
    return _hf_hub_cache() / ("models--" + hf_repo_name(spec).replace("/", "--"))


def _hf_snapshots(repo: Path) -> list[Path]:
    """Snapshot folders of one cached HF repository, the one refs/main names first, then the others."""
    snaps = repo / "snapshots"
    found = sorted(p for p in snaps.glob("*") if p.is_dir()) if snaps.is_dir() else []
    ref, main = repo / "refs" / "main", ""
    try:
        if ref.is_file() and ref.stat().st_size <= 256:  # a commit hash
            main = ref.read_text(encoding="ascii", errors="strict").strip()
    except (OSError, UnicodeDecodeError):
        pass
    first = [p for p in found if p.name == main]
    return first + [p for p in found if p.name != main]


def default_weight_locations(spec: ModelSpec) -> list[Path]:
    """Where we look when no --weights is given, in this order (the first usable one wins):

    1. $TORCH_HOME/hub/checkpoints/<official file> (torch.hub's facebookresearch checkpoint);
    2. $HF_HUB_CACHE/models--timm--<timm name>.lvd142m/snapshots/*/model.safetensors (timm);
    3. $HF_HUB_CACHE/models--facebook--dinov2[-with-registers]-<size>/snapshots/*/ (transformers):
       the snapshot's model.safetensors.index.json, else model.safetensors, used only with the
       snapshot's config.json; the snapshot named by refs/main first.
    """
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    hub = _hf_hub_cache()
    locs = [torch_home / "hub" / "checkpoints" / spec.official_filename]
    repo = hub / f"models--timm--{spec.timm_name}.lvd142m" / "snapshots"
    if repo.is_dir():
        locs.extend(sorted(repo.glob("*/model.safetensors")))
    else:
        locs.append(repo / "<revision>" / "model.safetensors")
    hf_repo = _hf_cache_repo(spec)
    snaps = _hf_snapshots(hf_repo)
    if snaps:
        locs.extend(s / INDEX if (s / INDEX).is_file() else s / WEIGHTS for s in snaps)
    else:
        locs.append(hf_repo / "snapshots" / "<revision>" / WEIGHTS)
    return locs


def find_weights(spec: ModelSpec) -> Path:
    """The first usable default location (default_weight_locations); a transformers snapshot counts
    only with its config.json. Returns the weights file (for an HF snapshot: its model.safetensors or
    index, which load through the config.json beside them)."""
    hf_repo = _hf_cache_repo(spec)
    locs = default_weight_locations(spec)
    for p in locs:
        if p.is_file() and (hf_repo not in p.parents or is_hf_checkpoint(p)):
            return p
    looked = "\n  ".join(str(p) for p in locs)
    raise ModelError(
        f"no weights for {spec.name} found; looked in:\n  {looked}\n"
        f"pass --weights PATH (official {spec.official_filename}, timm model.safetensors, or a Hugging Face "
        f"{hf_repo_name(spec)} folder), or --random-weights for a smoke test"
    )


def build_model(
    name: str,
    *,
    weights: str | Path | None = None,
    random_weights: bool = False,
    seed: int = 0,
    img_size: int = 224,
    depth: int | None = None,
) -> DinoV2Embedder:
    spec = get_spec(name)
    if img_size <= 0 or img_size % spec.patch_size:
        raise ModelError(f"--img-size {img_size} must be a positive multiple of {spec.patch_size}")
    if depth is not None and not random_weights:
        raise ModelError("--depth (a reduced-depth model) is only for --random-weights test models")
    if depth is not None and depth < 1:
        raise ModelError(f"--depth must be >= 1, got {depth}")
    if random_weights and weights is not None:
        raise ModelError("give either --weights or --random-weights, not both")
    vit = _create_timm(spec, img_size, depth)
    dim = spec.embed_dim
    if random_weights:
        randomize_(vit, seed)
        g = torch.Generator().manual_seed(seed + 1)
        pos = 0.5 * torch.randn(1, 1 + SOURCE_GRID**2, dim, generator=g)
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    else:
        path = Path(weights) if weights is not None else find_weights(spec)
        loaded, cls_in_pos = _load_weights(path, spec)
        sd, cls_pos, patch_pos = _split_official_or_timm(loaded, spec, cls_in_pos=cls_in_pos)
        model_sd = vit.state_dict()
        model_sd.pop("pos_embed", None)
        missing = sorted(set(model_sd) - set(sd))
        unexpected = sorted(set(sd) - set(model_sd))
        if missing or unexpected:
            raise ModelError(
                f"weights {path} do not fit {spec.name}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                "check the model name (size, _reg) matches the file"
            )
        bad = [k for k in sd if sd[k].shape != model_sd[k].shape]
        if bad:
            raise ModelError(f"weights {path} have other shapes than {spec.name} for {bad[:3]}; check the model size")
        bad = [k for k in sd if model_sd[k].is_floating_point() and not sd[k].is_floating_point()]
        if bad:
            raise ModelError(f"weights {path}: {bad[:3]} are not floating-point tensors; the checkpoint is damaged")
        vit.load_state_dict(sd, strict=False)
    vit.pos_embed = None  # the embedder adds its baked position embedding itself
    return DinoV2Embedder(spec, vit, cls_pos, patch_pos, img_size).eval()
