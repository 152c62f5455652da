"""The DINOv2 model catalogue (names, sizes, heads, registers): torch-free, so that option
validation and `--help` work without the [torch] extra."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelError

SOURCE_GRID = 37  # official checkpoints hold position embeddings for 518 px / 14 = 37 patches a side


@dataclass(frozen=True)
class ModelSpec:
    name: str
    timm_name: str
    embed_dim: int
    depth: int
    num_heads: int
    num_registers: int
    patch_size: int = 14

    @property
    def official_filename(self) -> str:
        base = self.name.replace("_reg", "")
        return f"{base}_reg4_pretrain.pth" if self.num_registers else f"{base}_pretrain.pth"


def _specs() -> dict[str, ModelSpec]:
    sizes = {
        "s": ("small", 384, 12, 6),
        "b": ("base", 768, 12, 12),
        "l": ("large", 1024, 24, 16),
        "g": ("giant", 1536, 40, 24),
    }
    out: dict[str, ModelSpec] = {}
    for letter, (word, dim, depth, heads) in sizes.items():
        for reg in (0, 4):
            name = f"dinov2_vit{letter}14" + ("_reg" if reg else "")
            timm_name = f"vit_{word}_patch14_" + ("reg4_dinov2" if reg else "dinov2")
            out[name] = ModelSpec(name, timm_name, dim, depth, heads, reg)
    return out


CATALOGUE: dict[str, ModelSpec] = _specs()


def get_spec(name: str) -> ModelSpec:
    if name not in CATALOGUE:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(CATALOGUE)}")
    return CATALOGUE[name]
