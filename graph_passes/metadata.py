"""Every metadata_props key that itae_export and graph_passes write into an ONNX model, in one place.

One canonical spelling per key. Older artifacts spelled two keys differently (the ITAE pass wrote
``itae.num_prefix_tokens`` / ``itae.img_size`` while the readers looked for ``itae_export.*``); those
legacy spellings are still accepted when reading and are replaced by the canonical key on writing.

Values are strings in ONNX; each key has a type here and is checked both ways: reading an img_size
that is not an integer string, or writing one, raises MetadataError (a PassError) naming the key.

    read_metadata(model)            -> ArtifactMetadata (typed, legacy keys folded in, unknown keys in .extra)
    write_metadata(model, meta)     writes the fields that are set (None = leave as is)
    set_metadata_props(model, {k: v})  raw string entries: replaced in place, never duplicated
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx

from .errors import MetadataError

# ---------------------------------------------------------------------------------------- keys
MODEL = "itae_export.model"  # model name (dinov2_vits14, ...)
IMG_SIZE = "itae_export.img_size"  # int: the static input side in pixels
NUM_PREFIX_TOKENS = "itae_export.num_prefix_tokens"  # int: CLS + register tokens
EXPORTER = "itae_export.exporter"  # torchscript | dynamo
WEIGHTS = "itae_export.weights"  # where the weights came from
WEIGHTS_SHA256 = "itae_export.weights_sha256"  # sha256 of the --weights file (or folder listing)
ITAE_SETTINGS = "itae.settings"  # JSON object: ITAEConfig.to_dict() of the applied pass
ITAE_PASS_VERSION = "itae.pass_version"
FAST_PATH = "itae_export.fast_path"  # int8-dynamic | fused-attention ...
FAST_PATH_WEIGHTS = "itae_export.fast_path_weights"  # qint8[-per-channel] ...
FAST_PATH_ACCURACY = "itae_export.fast_path_accuracy"  # JSON object
FUSED_ATTENTION = "itae_export.fused_attention"  # JSON object: FusionResult.to_dict()
UINT8_NHWC_INPUT = "itae_export.uint8_nhwc_input"  # JSON object: Uint8InputResult (+ layout, dtype)
L2_NORMALIZE = "itae_export.l2_normalize"  # JSON object: L2NormalizeResult
DYNAMIC_SIZE = "itae_export.dynamic_size"  # JSON object {"min", "max", "multiple"}: H/W bounds in pixels
OUTPUT_ROWS = "itae_export.output_rows"  # JSON object: OutputRowsResult (the tail computes the output row only)
K_TRANSPOSE = "itae_export.k_transpose"  # JSON object: KTransposeResult (k^T as one Transpose, the scale on q)

# legacy spelling -> canonical key (accepted when reading, replaced when writing)
LEGACY_KEYS = {
    "itae.num_prefix_tokens": NUM_PREFIX_TOKENS,
    "itae.img_size": IMG_SIZE,
}

# the value type of each key: "str", "int" (a positive integer written in decimal), "json" (an object)
KEY_TYPES = {
    MODEL: "str",
    IMG_SIZE: "int",
    NUM_PREFIX_TOKENS: "int",
    EXPORTER: "str",
    WEIGHTS: "str",
    ITAE_SETTINGS: "json",
    ITAE_PASS_VERSION: "str",
    FAST_PATH: "str",
    FAST_PATH_WEIGHTS: "str",
    FAST_PATH_ACCURACY: "json",
    FUSED_ATTENTION: "json",
    UINT8_NHWC_INPUT: "json",
    L2_NORMALIZE: "json",
    DYNAMIC_SIZE: "json",
    OUTPUT_ROWS: "json",
    K_TRANSPOSE: "json",
}

# ArtifactMetadata field -> key
FIELD_KEYS = {
    "model": MODEL,
    "img_size": IMG_SIZE,
    "num_prefix_tokens": NUM_PREFIX_TOKENS,
    "exporter": EXPORTER,
    "weights": WEIGHTS,
    "itae": ITAE_SETTINGS,
    "itae_pass_version": ITAE_PASS_VERSION,
    "fast_path": FAST_PATH,
    "fast_path_weights": FAST_PATH_WEIGHTS,
    "fast_path_accuracy": FAST_PATH_ACCURACY,
    "fused_attention": FUSED_ATTENTION,
    "uint8_nhwc_input": UINT8_NHWC_INPUT,
    "l2_normalize": L2_NORMALIZE,
    "dynamic_size": DYNAMIC_SIZE,
    "output_rows": OUTPUT_ROWS,
    "k_transpose": K_TRANSPOSE,
}


def canonical_key(key: str) -> str:
    """The canonical spelling of `key` (itself unless it is a legacy spelling)."""
    return LEGACY_KEYS.get(key, key)


# ---------------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class ArtifactMetadata:
    """The typed metadata of an artifact; None where the model does not record it."""

    model: str | None = None
    img_size: int | None = None
    num_prefix_tokens: int | None = None
    exporter: str | None = None
    weights: str | None = None
    itae: dict | None = None  # the ITAE settings the pass applied (None: not patched, per metadata)
    itae_pass_version: str | None = None
    fast_path: str | None = None
    fast_path_weights: str | None = None
    fast_path_accuracy: dict | None = None
    fused_attention: dict | None = None
    uint8_nhwc_input: dict | None = None  # what add_uint8_nhwc_input recorded
    l2_normalize: dict | None = None  # what add_l2_normalize recorded
    dynamic_size: dict | None = None  # {"min", "max", "multiple"}: the H/W the graph takes (img_size: the optimum)
    output_rows: dict | None = None  # what prune_output_rows recorded (the tail runs on the output row only)
    k_transpose: dict | None = None  # what canonical_k_transpose recorded
    extra: dict[str, str] = field(default_factory=dict)  # every other key, verbatim

    def __post_init__(self) -> None:
        for name, key in FIELD_KEYS.items():
            value = getattr(self, name)
            if value is not None:
                _check_typed(key, value)
        if not isinstance(self.extra, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.extra.items()):
            raise MetadataError("ArtifactMetadata.extra must map metadata keys (str) to values (str)")
        ours = sorted(set(self.extra) & (set(KEY_TYPES) | set(LEGACY_KEYS)))
        if ours:
            raise MetadataError(f"metadata key(s) {ours} have a typed field in ArtifactMetadata; set that field "
                                "instead of putting them in extra")

    @property
    def input_format(self) -> str | None:
        """"uint8-nhwc" when the raw-pixel input pass was applied; None: the input is as exported."""
        return "uint8-nhwc" if self.uint8_nhwc_input is not None else None

    @property
    def patched(self) -> bool:
        """The metadata records an applied ITAE pass (structure is what already_patched checks)."""
        return self.itae is not None

    def to_props(self) -> dict[str, str]:
        """The metadata_props entries of the fields that are set, canonical keys."""
        out = {key: _encode(key, getattr(self, name)) for name, key in FIELD_KEYS.items()
               if getattr(self, name) is not None}
        out.update(self.extra)
        return out


# ------------------------------------------------------------------------------ (de)serialising
def _check_typed(key: str, value: object) -> None:
    kind = KEY_TYPES[key]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MetadataError(f"metadata key {key!r} must be a positive integer, got {value!r}")
    elif kind == "json":
        if not isinstance(value, Mapping):
            raise MetadataError(f"metadata key {key!r} must be a JSON object (a dict), got {type(value).__name__}")
    elif not isinstance(value, str):
        raise MetadataError(f"metadata key {key!r} must be a string, got {type(value).__name__} {value!r}")


def _encode(key: str, value: object) -> str:
    _check_typed(key, value)
    kind = KEY_TYPES[key]
    if kind == "int":
        return str(value)
    if kind == "json":
        return json.dumps(dict(value), sort_keys=True)  # type: ignore[call-overload]
    return value  # type: ignore[return-value]


def _decode(key: str, raw: str) -> object:
    kind = KEY_TYPES[key]
    if kind == "int":
        text = raw.strip()
        if not text.isdecimal() or not text.isascii() or int(text) < 1:
            raise MetadataError(f"metadata key {key!r} must hold a positive integer written in decimal, "
                                f"got {raw!r}; re-export the model or fix the entry")
        return int(text)
    if kind == "json":
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as e:
            raise MetadataError(f"metadata key {key!r} does not hold valid JSON ({e}); got {raw[:80]!r}") from e
        if not isinstance(value, dict):
            raise MetadataError(f"metadata key {key!r} must hold a JSON object, got {type(value).__name__}")
        return value
    return raw


def metadata_dict(model: onnx.ModelProto) -> dict[str, str]:
    """metadata_props as a dict of raw strings, keys as written (no typing, no legacy folding).
    A key written twice with different values is refused (which one is meant?)."""
    out: dict[str, str] = {}
    for p in model.metadata_props:
        if p.key in out and out[p.key] != p.value:
            raise MetadataError(f"metadata key {p.key!r} is written twice with different values "
                                f"({out[p.key]!r} and {p.value!r})")
        out[p.key] = p.value
    return out


def _canonical_props(props: Mapping[str, str]) -> dict[str, str]:
    """Fold legacy spellings into canonical keys; a legacy and a canonical entry must agree."""
    out: dict[str, str] = {}
    for key, value in props.items():
        canon = canonical_key(key)
        if canon in out and out[canon] != value:
            if canon in KEY_TYPES and _decode(canon, out[canon]) == _decode(canon, value):
                continue
            raise MetadataError(f"metadata keys {key!r} and {canon!r} (the same entry, legacy and current "
                                f"spelling) disagree: {value!r} vs {out[canon]!r}")
        out[canon] = value
    return out


def read_metadata(model: onnx.ModelProto) -> ArtifactMetadata:
    """The typed metadata of `model`. Legacy key spellings are accepted; a value of the wrong type
    raises MetadataError (a PassError) naming the key."""
    props = _canonical_props(metadata_dict(model))
    values = {name: _decode(key, props[key]) for name, key in FIELD_KEYS.items() if key in props}
    extra = {k: v for k, v in props.items() if k not in KEY_TYPES}
    return ArtifactMetadata(**values, extra=extra)  # type: ignore[arg-type]


def metadata_field(model: onnx.ModelProto, name: str) -> object | None:
    """One typed ArtifactMetadata field (e.g. "num_prefix_tokens") of `model`, legacy spelling
    accepted, None when absent. Only that entry is decoded (and refused when malformed), so a reader
    that needs one value does not fail on an unrelated entry."""
    key = FIELD_KEYS[name]
    entries = {p.key: p.value for p in model.metadata_props if canonical_key(p.key) == key}
    props = _canonical_props(entries)
    return _decode(key, props[key]) if key in props else None


def set_metadata_props(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Add or replace metadata entries in place. Keys of ours are type-checked (an img_size that is
    not an integer string is refused) and written in their canonical spelling; a legacy spelling of
    the same key is removed; an existing key is replaced, never duplicated. Other entries are kept."""
    new: dict[str, str] = {}
    for key, value in props.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MetadataError(f"metadata entries are strings; got {key!r}: {type(value).__name__} {value!r}")
        canon = canonical_key(key)
        if canon in KEY_TYPES:
            _decode(canon, value)  # refuse what read_metadata would refuse
        if canon in new and new[canon] != value:
            raise MetadataError(f"metadata keys {key!r} and {canon!r} are the same entry but are given different "
                                f"values ({value!r} vs {new[canon]!r})")
        new[canon] = value
    entries = [(p.key, p.value) for p in model.metadata_props]
    del model.metadata_props[:]
    written: set[str] = set()
    for key, value in entries:  # a replaced entry keeps its position; its duplicates and legacy twins go
        canon = canonical_key(key)
        if canon in new:
            if canon not in written:
                model.metadata_props.append(onnx.StringStringEntryProto(key=canon, value=new[canon]))
                written.add(canon)
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    for key, value in new.items():
        if key not in written:
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def write_metadata(model: onnx.ModelProto, meta: ArtifactMetadata) -> None:
    """Write the fields of `meta` that are set (and its extra entries) into `model`, in place;
    fields that are None leave the model's entry as it is."""
    set_metadata_props(model, meta.to_props())


def export_metadata(*, model: str | None = None, img_size: int | None = None, num_prefix_tokens: int | None = None,
                    exporter: str | None = None, weights: str | None = None,
                    dynamic_size: dict | None = None) -> dict[str, str]:
    """The export provenance entries (canonical keys, type-checked) as metadata_props strings, for
    set_metadata_props or apply_itae(metadata=...)."""
    return ArtifactMetadata(model=model, img_size=img_size, num_prefix_tokens=num_prefix_tokens,
                            exporter=exporter, weights=weights, dynamic_size=dynamic_size).to_props()
