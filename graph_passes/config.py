"""ITAE settings shared by the graph pass, the PyTorch reference and the CLIs.

Pure Python: no torch, no itae_export import (graph_passes must stay standalone).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import ConfigError  # noqa: F401 - re-exported

NORM_SOURCES = ("q", "k", "v")
NORM_SCOPES = ("token", "head")
DIRECTIONS = ("high", "low")
ATTENUATIONS = ("min-logit", "scale", "mask")
ROWS = ("cls", "all")
RELATIVE_STATS = ("mean", "median")

# Default relative rule when no absolute threshold is calibrated: a patch is an artifact when its
# length exceeds 2x the mean patch length of its image (high), or is under 0.5x of it (low).
# Darcet et al. report artifact norms several times the typical norm, so 2x keeps ordinary
# variation out; calibrate (itae-calibrate) for the paper's absolute threshold.
DEFAULT_GAMMA = {"high": 2.0, "low": 0.5}


@dataclass(frozen=True)
class ITAEConfig:
    norm_source: str = "v"
    norm_scope: str = "token"
    direction: str = "high"
    threshold: float | None = None  # absolute length; wins over the relative rule
    relative_threshold: float | None = None  # gamma; None -> DEFAULT_GAMMA[direction]
    relative_stat: str = "mean"
    attenuation: str = "min-logit"
    alpha: float = 0.0  # only for attenuation="scale"
    rows: str = "cls"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("norm_source", NORM_SOURCES),
            ("norm_scope", NORM_SCOPES),
            ("direction", DIRECTIONS),
            ("attenuation", ATTENUATIONS),
            ("rows", ROWS),
            ("relative_stat", RELATIVE_STATS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {value!r} is not valid; choose one of {', '.join(allowed)}"
                )
        if self.threshold is not None and self.relative_threshold is not None:
            raise ConfigError("give either --threshold (absolute) or --relative-threshold (gamma), not both")
        if self.threshold is not None and not (self.threshold > 0 and self.threshold < float("inf")):
            raise ConfigError(f"--threshold must be a positive finite length, got {self.threshold}")
        if self.relative_threshold is not None and not (
            self.relative_threshold > 0 and self.relative_threshold < float("inf")
        ):
            raise ConfigError(f"--relative-threshold must be a positive finite factor, got {self.relative_threshold}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must lie in [0, 1], got {self.alpha}")

    @property
    def gamma(self) -> float:
        if self.relative_threshold is not None:
            return self.relative_threshold
        return DEFAULT_GAMMA[self.direction]

    @property
    def uses_absolute_threshold(self) -> bool:
        return self.threshold is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.threshold is None:
            d["relative_threshold"] = self.gamma
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ITAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown ITAE setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> ITAEConfig:
        """Read a settings file (JSON, as written by itae-calibrate) with an ITAE config under "itae"
        or at top level."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"settings file {p} does not exist; pass the JSON written by itae-calibrate")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"settings file {p} is not valid JSON ({e}); pass the JSON written by itae-calibrate") from e
        if isinstance(data, dict) and "itae" in data:
            data = data["itae"]
        if not isinstance(data, dict):
            raise ConfigError(f"settings file {p} must hold a JSON object of ITAE settings")
        return cls.from_dict(data)
