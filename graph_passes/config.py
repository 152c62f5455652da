"""ITAE settings shared by the graph pass, the PyTorch reference and the CLIs.

Pure Python: no torch, no itae_export import (graph_passes must stay standalone).

Every value is type-checked before any work starts, whether it comes from the constructor (CLI
flags), from a dict or from a settings file: a JSON bool is not a number, a string is not a float,
null only where a field is optional, unknown keys are refused, thresholds are finite, > 0 and
representable in float32 (the graph computes in float32), alpha lies in [0, 1] and every enum field
takes one of its listed values. Entry points:

    ITAEConfig(...)                      CLI flags / API (messages name the flag, e.g. --threshold)
    ITAEConfig.from_dict(data, source=)  a parsed settings object (messages name the key)
    ITAEConfig.from_file(path)           a settings file; file problems name the file
    load_settings_file(path) -> dict     the file's ITAE settings object, checked but not validated
    check_num_prefix_tokens(n, tokens)   --num-prefix-tokens against the graph's token count
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
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

ENUMS = {
    "norm_source": NORM_SOURCES,
    "norm_scope": NORM_SCOPES,
    "direction": DIRECTIONS,
    "attenuation": ATTENUATIONS,
    "rows": ROWS,
    "relative_stat": RELATIVE_STATS,
}
POSITIVE_OR_NULL = ("threshold", "relative_threshold")  # float32-representable, > 0, or null
UNIT_INTERVAL = ("alpha",)

MAX_SETTINGS_BYTES = 1 << 20  # a settings file is a few hundred bytes; anything this big is not one
SETTINGS_DOCUMENT_KEYS = ("calibration", "itae")  # the document itae-calibrate writes


class _Invalid(Exception):
    """A field value is refused; the message says why (the caller names the field)."""


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _as_number(value: object) -> float:
    """A real number that is not a bool (JSON true is not 1.0) and not a string ("2.0" is text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_numpy_real(value):
        raise _Invalid(f"must be a number, got {_type_name(value)} {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError as e:  # an int too large for a float
        raise _Invalid(f"is too large ({value!r})") from e


def _is_numpy_real(value: object) -> bool:
    # numpy scalars (np.float32 is no float subclass) without importing numpy
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    return kind in ("f", "i", "u") and getattr(value, "shape", None) == ()


def _float32(x: float) -> float:
    """x rounded to float32 (inf, or OverflowError on older Pythons, when it does not fit)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _check_positive_float32(value: object) -> float:
    x = _as_number(value)
    if not math.isfinite(x):
        raise _Invalid(f"must be a finite number, got {x}")
    if x <= 0:
        raise _Invalid(f"must be > 0, got {x}")
    try:
        x32 = _float32(x)
    except OverflowError:  # Python < 3.12 refuses to pack it; newer versions round to inf
        x32 = math.inf
    if math.isinf(x32):
        raise _Invalid(f"{x} does not fit in float32 (max 3.4e38), which the graph computes in")
    if x32 <= 0:
        raise _Invalid(f"{x} rounds to 0 in float32, which the graph computes in")
    return x


def _check_unit(value: object) -> float:
    x = _as_number(value)
    if not 0.0 <= x <= 1.0:  # NaN fails too
        raise _Invalid(f"must lie in [0, 1], got {x}")
    return x


def _check_field(name: str, value: object) -> object:
    """The normalised value of one ITAE field, or _Invalid."""
    if name in ENUMS:
        allowed = ENUMS[name]
        if not isinstance(value, str):
            raise _Invalid(f"must be one of {', '.join(allowed)}, got {_type_name(value)} {value!r}")
        if value not in allowed:
            raise _Invalid(f"{value!r} is not valid; choose one of {', '.join(allowed)}")
        return value
    if name in POSITIVE_OR_NULL:
        return None if value is None else _check_positive_float32(value)
    if name in UNIT_INTERVAL:
        if value is None:
            raise _Invalid("must be a number in [0, 1], not null")
        return _check_unit(value)
    raise _Invalid("is not an ITAE setting")  # unreachable: keys are checked first


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
        for f in fields(self):
            try:
                value = _check_field(f.name, getattr(self, f.name))
            except _Invalid as e:
                raise ConfigError(f"{_flag(f.name)} {e}") from None
            object.__setattr__(self, f.name, value)  # ints and numpy scalars become float
        if self.threshold is not None and self.relative_threshold is not None:
            raise ConfigError("give either --threshold (absolute) or --relative-threshold (gamma), not both")

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
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping, *, source: str | None = None) -> ITAEConfig:
        """Validate and build from a settings object. `source` (e.g. "settings file x.json") prefixes
        every message; keys are named as written ("threshold"), with their flag."""
        where = f"{source}: " if source else ""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}ITAE settings must be an object of settings, got {_type_name(data)}")
        known = cls.field_names()
        bad_keys = [k for k in data if not isinstance(k, str)]
        unknown = sorted(str(k) for k in data if k not in known)
        if bad_keys or unknown:
            raise ConfigError(f"{where}unknown ITAE setting(s) {unknown}; valid settings: {', '.join(known)}")
        values = {}
        for key, value in data.items():
            try:
                values[key] = _check_field(key, value)
            except _Invalid as e:
                raise ConfigError(f"{where}setting {key!r} ({_flag(key)}) {e}") from None
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ITAEConfig:
        """Read a settings file (JSON, as written by itae-calibrate) with an ITAE config under "itae"
        or at top level. Every problem is a ConfigError naming the file (and the key)."""
        data, where = load_settings_file(path)
        return cls.from_dict(data, source=where)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def _read_settings_text(p: Path) -> str:
    where = f"settings file {p}"
    hint = "pass the JSON written by itae-calibrate"
    if not p.exists():
        raise ConfigError(f"{where} does not exist; {hint}")
    if p.is_dir():
        raise ConfigError(f"{where} is a directory, not a file; {hint}")
    if not p.is_file():
        raise ConfigError(f"{where} is not a regular file; {hint}")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_SETTINGS_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{where} cannot be read ({e.strerror or e})") from e
    if len(raw) > MAX_SETTINGS_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_SETTINGS_BYTES >> 20} MiB; a settings file is a small "
                          f"JSON object; {hint}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); {hint}") from e


def load_settings_file(path: str | Path) -> tuple[dict, str]:
    """(the ITAE settings object, "settings file <path>" for messages) of a settings file. The file is
    checked (exists, a file, <= 1 MiB, UTF-8, JSON, an object; a document with "itae" may also hold
    "calibration"); the settings themselves are validated by ITAEConfig.from_dict."""
    p = Path(path)
    where = f"settings file {p}"
    text = _read_settings_text(p)
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
                          "pass the JSON written by itae-calibrate") from e
    except RecursionError as e:
        raise ConfigError(f"{where} nests JSON arrays/objects too deeply to be a settings file") from e
    except ConfigError as e:
        raise ConfigError(f"{where} is not a valid settings file: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a JSON object of ITAE settings, got {_type_name(data)} at top level")
    if "itae" in data:
        unknown = sorted(k for k in data if k not in SETTINGS_DOCUMENT_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown top-level key(s) {unknown} next to \"itae\"; valid top-level keys: "
                              f"{', '.join(SETTINGS_DOCUMENT_KEYS)}")
        data = data["itae"]
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: \"itae\" must be an object of ITAE settings, got {_type_name(data)}")
        where += ' ("itae")'
    return data, where


def check_num_prefix_tokens(value: object, num_tokens: int | None = None, *,
                            flag: str = "--num-prefix-tokens") -> int:
    """The number of prefix tokens (CLS + registers): an int >= 1, and below the graph's token count
    when that is static (at least one patch token must remain). Raises ConfigError naming `flag`."""
    if isinstance(value, bool) or not isinstance(value, int) and not (_is_numpy_real(value)
                                                                      and getattr(value.dtype, "kind", "") in "iu"):
        raise ConfigError(f"{flag} must be an integer (CLS + registers), got {_type_name(value)} {value!r}")
    n = int(value)  # type: ignore[call-overload]
    if n < 1:
        raise ConfigError(f"{flag} must be >= 1 (the CLS token), got {n}")
    if num_tokens is not None and num_tokens > 0 and n >= num_tokens:
        raise ConfigError(f"{flag} {n} leaves no patch token: the final attention has {num_tokens} tokens; "
                          "pass the CLS + register count (1 for DINOv2, 5 with 4 registers)")
    return n
