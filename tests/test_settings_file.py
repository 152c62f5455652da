"""ITAE settings files (ITAEConfig.from_file) and values: types checked strictly before any work,
every refusal a ConfigError naming the file and the key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from graph_passes.config import MAX_SETTINGS_BYTES, ConfigError, ITAEConfig, check_num_prefix_tokens
from graph_passes.errors import PassError


def _write(tmp_path: Path, content: str | bytes, name: str = "settings.json") -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(ConfigError) as e:
        ITAEConfig.from_file(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, msg
    assert isinstance(e.value, PassError)
    return msg


@pytest.mark.parametrize(("text", "key", "why"), [
    ('{"threshold": true}', "threshold", "must be a number, got a bool"),
    ('{"relative_threshold": "2.0"}', "relative_threshold", "must be a number, got a string"),
    ('{"threshold": 1e39}', "threshold", "does not fit in float32"),
    ('{"threshold": NaN}', "threshold", "finite"),
    ('{"relative_threshold": Infinity}', "relative_threshold", "finite"),
    ('{"threshold": -1.5}', "threshold", "must be > 0"),
    ('{"threshold": 0}', "threshold", "must be > 0"),
    ('{"relative_threshold": 1e-50}', "relative_threshold", "rounds to 0 in float32"),
    ('{"alpha": 1.5}', "alpha", "[0, 1]"),
    ('{"alpha": null}', "alpha", "not null"),
    ('{"alpha": false}', "alpha", "got a bool"),
    ('{"norm_source": "x"}', "norm_source", "choose one of q, k, v"),
    ('{"norm_source": null}', "norm_source", "must be one of q, k, v, got null"),
    ('{"attenuation": ["mask"]}', "attenuation", "got a list"),
    ('{"rows": 1}', "rows", "must be one of cls, all"),
    ('{"itae": {"direction": "up"}, "calibration": {}}', "direction", "choose one of high, low"),
])
def test_wrong_typed_values(tmp_path, text, key, why):
    msg = _refused(_write(tmp_path, text), repr(key), why)
    assert "--" + key.replace("_", "-") in msg  # and the flag it maps to


def test_unknown_keys_named_with_the_valid_ones(tmp_path):
    msg = _refused(_write(tmp_path, '{"treshold": 2.0, "norm_source": "v"}'), "treshold", "valid settings:")
    for name in ITAEConfig.field_names():
        assert name in msg
    _refused(_write(tmp_path, '{"itae": {}, "notes": "x"}', "doc.json"), "notes", "calibration, itae")


@pytest.mark.parametrize(("text", "needle"), [
    ("[1, 2]", "got a list at top level"),
    ('"v"', "got a string at top level"),
    ("null", "got null at top level"),
    ('{"itae": [1]}', '"itae" must be an object'),
    ('{"threshold": 2.0,}', "not valid JSON: "),
    ('{"threshold": 2.0, "threshold": 3.0}', "appears twice"),
    ("", "not valid JSON"),
])
def test_file_shape_refused(tmp_path, text, needle):
    _refused(_write(tmp_path, text), needle)


def test_invalid_json_names_line_and_column(tmp_path):
    _refused(_write(tmp_path, '{\n  "threshold": 2.0\n  "alpha": 0\n}'), "line 3 column 3")


def test_not_utf8(tmp_path):
    _refused(_write(tmp_path, b'{"norm_source": "\xff\xfe"}'), "is not UTF-8", "offset 17")


def test_utf8_bom_accepted(tmp_path):
    assert ITAEConfig.from_file(_write(tmp_path, b'\xef\xbb\xbf{"norm_source": "k"}')).norm_source == "k"


def test_deep_nesting(tmp_path):
    _refused(_write(tmp_path, "[" * 10000 + "]" * 10000), "too deeply")
    _refused(_write(tmp_path, '{"itae": ' + '{"a": ' * 10000 + "1" + "}" * 10001, "obj.json"), "too deeply")


def test_missing_directory_and_too_large(tmp_path):
    _refused(tmp_path / "nope.json", "does not exist")
    _refused(tmp_path, "is a directory")
    big = _write(tmp_path, '{"norm_source": "v", "pad": "' + "x" * MAX_SETTINGS_BYTES + '"}', "big.json")
    _refused(big, "larger than 1 MiB")


def test_valid_files(tmp_path):
    cfg = ITAEConfig(norm_source="k", threshold=3.25, attenuation="scale", alpha=0.5)
    doc = {"itae": cfg.to_dict(), "calibration": {"n_images": 10}}
    assert ITAEConfig.from_file(_write(tmp_path, json.dumps(doc))) == cfg
    assert ITAEConfig.from_file(_write(tmp_path, json.dumps(cfg.to_dict()), "flat.json")) == cfg
    relative = ITAEConfig(relative_threshold=1.5)
    assert ITAEConfig.from_file(_write(tmp_path, relative.to_json(), "rel.json")) == relative
    # ints are numbers: 2 -> 2.0
    assert ITAEConfig.from_file(_write(tmp_path, '{"relative_threshold": 2}', "int.json")).relative_threshold == 2.0
    assert isinstance(ITAEConfig(alpha=1).alpha, float)


def test_both_thresholds_refused_naming_the_file(tmp_path):
    _refused(_write(tmp_path, '{"threshold": 1.0, "relative_threshold": 2.0}'), "not both")


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"threshold": True}, "--threshold must be a number, got a bool"),
    ({"relative_threshold": "2.0"}, "--relative-threshold must be a number, got a string"),
    ({"threshold": math.nan}, "--threshold must be a finite number"),
    ({"threshold": 1e39}, "does not fit in float32"),
    ({"alpha": -0.1}, "--alpha must lie in [0, 1]"),
    ({"direction": "sideways"}, "--direction 'sideways' is not valid"),
])
def test_constructor_validates_the_same_way(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        ITAEConfig(**kwargs)
    assert needle in str(e.value)


def test_num_prefix_tokens_helper():
    assert check_num_prefix_tokens(5, 261) == 5
    assert check_num_prefix_tokens(1) == 1
    for bad, needle in ((0, ">= 1"), (True, "integer"), ("1", "integer"), (2.0, "integer"), (261, "no patch token")):
        with pytest.raises(ConfigError, match="--num-prefix-tokens") as e:
            check_num_prefix_tokens(bad, 261)
        assert needle in str(e.value)
