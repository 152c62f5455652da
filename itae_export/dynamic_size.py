"""Dynamic image size: the bounds a dynamic-size export takes, and the sizes its parity is checked at.

One graph takes any height and width that are multiples of 14 within [min_size, max_size], square
or not; the position embedding is computed in the graph by the official rule (pos_embed.py). The
fixed-size export (`--img-size`) stays the default.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError
from .settings import PATCH_SIZE, check_img_size, check_int

DEFAULT_MIN_SIZE = 112
DEFAULT_MAX_SIZE = 518  # 37 patches a side: the official checkpoints' own grid


def _round(size: float) -> int:
    return max(PATCH_SIZE, int(round(size / PATCH_SIZE)) * PATCH_SIZE)


@dataclass(frozen=True)
class SizeBounds:
    """H and W in [min_size, max_size], multiples of `multiple`; validated on construction."""

    min_size: int = DEFAULT_MIN_SIZE
    max_size: int = DEFAULT_MAX_SIZE
    multiple: int = PATCH_SIZE

    def __post_init__(self) -> None:
        check_int(self.min_size, "--min-size", lo=PATCH_SIZE)
        check_int(self.max_size, "--max-size", lo=PATCH_SIZE)
        for flag, v in (("--min-size", self.min_size), ("--max-size", self.max_size)):
            if v % self.multiple:
                raise UsageError(f"{flag} {v} is not a multiple of the patch size {self.multiple}; "
                                 f"use {_round(v)}")
        if self.min_size > self.max_size:
            raise UsageError(f"--min-size {self.min_size} is above --max-size {self.max_size}; swap them")

    def check_memory(self, *, heads: int, batch: int) -> None:
        """The largest size must be one we can validate (settings.check_img_size)."""
        check_img_size(self.max_size, heads=heads, batch=batch, flag="--max-size")

    def contains(self, height: int, width: int) -> bool:
        return all(self.min_size <= s <= self.max_size and s % self.multiple == 0 for s in (height, width))

    def check_opt(self, img_size: int) -> None:
        if not self.contains(img_size, img_size):
            raise UsageError(f"--img-size {img_size} (the size the graph is tuned and checked at first) must lie "
                             f"within --min-size {self.min_size} and --max-size {self.max_size}")

    def validation_sizes(self, img_size: int) -> list[tuple[int, int]]:
        """(H, W) pairs parity is checked at: the min, img_size, a non-square size (H:W = 2:3, both
        inside the bounds) and the max, without repeats."""
        lo, hi = self.min_size, self.max_size
        h = min(max(lo, _round(img_size * 0.75)), hi)
        w = min(max(lo, _round(h * 1.5)), hi)
        out: list[tuple[int, int]] = []
        for s in [(lo, lo), (img_size, img_size), (h, w), (hi, hi)]:
            if s not in out:
                out.append(s)
        return out

    def to_metadata(self) -> dict:
        return {"min": self.min_size, "max": self.max_size, "multiple": self.multiple}

    @classmethod
    def from_metadata(cls, value: dict) -> SizeBounds:
        try:
            return cls(int(value["min"]), int(value["max"]), int(value.get("multiple", PATCH_SIZE)))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"the model's dynamic-size metadata {value!r} is malformed ({e}); re-export it") from e


def parse_size(text: str, flag: str) -> tuple[int, int]:
    """"224" -> (224, 224); "168x252" -> (168, 252) (H x W)."""
    parts = text.lower().split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give a size as N or HxW, e.g. 224 or 168x252") from None
    if len(nums) == 1:
        return nums[0], nums[0]
    if len(nums) == 2:
        return nums[0], nums[1]
    raise UsageError(f"{flag} {text!r}: give a size as N or HxW, e.g. 224 or 168x252")
