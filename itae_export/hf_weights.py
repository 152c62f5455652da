"""Hugging Face transformers DINOv2 checkpoints (`facebook/dinov2-{small,base,large,giant}`,
`facebook/dinov2-with-registers-{small,base,large,giant}`), read into the official
facebookresearch layout so that `models.py` finishes the job as for an official `.pth`.

A checkpoint is a folder with `config.json` and `model.safetensors`, or sharded
`model.safetensors.index.json` + `model-0000x-of-0000y.safetensors` (or one of those two files, with
`config.json` beside it). Two key layouts exist; both are read:

| transformers (hub files, what `save_pretrained` writes) | transformers 5.x `state_dict()` | official |
|---|---|---|
| `embeddings.cls_token` / `.mask_token` / `.register_tokens` | same | `cls_token` / `mask_token` / `register_tokens` |
| `embeddings.position_embeddings` [1, 1+37*37, D] | same | `pos_embed` (CLS position included in both) |
| `embeddings.patch_embeddings.projection.*` | same | `patch_embed.proj.*` |
| `encoder.layer.N.norm1.*`, `.norm2.*` | same | `blocks.N.norm1.*`, `.norm2.*` |
| `...attention.attention.{query,key,value}.*` | `...attention.{q,k,v}_proj.*` | `blocks.N.attn.qkv.*` (q, k, v stacked) |
| `...attention.output.dense.*` | `...attention.o_proj.*` | `blocks.N.attn.proj.*` |
| `...layer_scale1.lambda1`, `layer_scale2.lambda1` | same | `blocks.N.ls1.gamma`, `ls2.gamma` |
| `...mlp.fc1.*`, `mlp.fc2.*` | same | `blocks.N.mlp.fc1.*`, `fc2.*` |
| `...mlp.weights_in.*` (SwiGLU, giant) | `...mlp.gate_proj.*` + `up_proj.*` | `blocks.N.mlp.w12.*` ([gate; up]) |
| `...mlp.weights_out.*` | `...mlp.down_proj.*` | `blocks.N.mlp.w3.*` |
| `layernorm.*` | same | `norm.*` |

A `dinov2.` / `dinov2_with_registers.` prefix (image-classification checkpoints) is stripped and
their `classifier.*` head is ignored. `config.json` must describe the model named on the command
line (size, depth, heads, registers, 14 px patches, SwiGLU only for giant, GELU, eps 1e-6, qkv
bias); anything else is refused with one sentence naming the file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .catalogue import CATALOGUE, ModelSpec
from .errors import ModelError
from .safe_io import _regular_file, _short, check_tensor_dict, load_tensor_file

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_CONFIG_BYTES = 1 << 20  # real DINOv2 configs are under 1 kB
MAX_INDEX_BYTES = 16 << 20
MAX_SHARDS = 1000
HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_SIZE_WORDS = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
# transformers' Dinov2Config / Dinov2WithRegistersConfig defaults, used where config.json omits a field
_DEFAULTS = {
    "dinov2": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
               "hidden_act": "gelu", "layer_norm_eps": 1e-6, "patch_size": 14, "num_channels": 3,
               "qkv_bias": True, "use_swiglu_ffn": False, "num_register_tokens": 0},
    "dinov2_with_registers": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                              "mlp_ratio": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "patch_size": 16,
                              "num_channels": 3, "qkv_bias": True, "use_swiglu_ffn": False,
                              "num_register_tokens": 4},
}
if TYPE_CHECKING:  # torch is imported where tensors are handled, so config checks work without it
    import torch

_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")


def hf_repo_name(spec: ModelSpec) -> str:
    """The Hugging Face repository of a catalogue model: facebook/dinov2[-with-registers]-<size>."""
    word = _SIZE_WORDS[spec.embed_dim]
    return f"facebook/dinov2-with-registers-{word}" if spec.num_registers else f"facebook/dinov2-{word}"


def _layout(path: Path) -> tuple[Path, Path] | None:
    """(config.json, weights file) when `path` has the shape of an HF checkpoint, else None. The
    weights file is model.safetensors.index.json (sharded) when present, else model.safetensors."""
    if path.is_dir():
        config = path / CONFIG
        weights = path / INDEX if (path / INDEX).is_file() else path / WEIGHTS
    elif path.is_file() and path.name.endswith((".safetensors", ".safetensors.index.json")):
        config, weights = path.parent / CONFIG, path
    else:
        return None
    return (config, weights) if config.is_file() and weights.is_file() else None


def _strict_json(path: Path, what: str, max_bytes: int):
    """A JSON file read with a size limit; NaN/Infinity, duplicate keys and bad UTF-8 are refused."""
    _regular_file(path, what, max_bytes, ModelError)

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    def no_duplicates(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        text = path.read_bytes().decode("utf-8")
        obj = json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelError(
            f"{what} {path} is not valid JSON ({_short(e)}); replace it with an intact copy"
        ) from None
    if not isinstance(obj, dict):
        raise ModelError(f"{what} {path} holds a JSON {type(obj).__name__}, not an object; replace it")
    return obj


def is_hf_checkpoint(path: str | Path) -> bool:
    """True for a transformers checkpoint: a folder with config.json + model.safetensors[.index.json],
    or such a weights file with config.json beside it. timm's Hugging Face snapshots also hold a
    config.json, but without `model_type`; those stay timm files. An unreadable config.json counts
    as transformers' (the loader then says what is wrong with it)."""
    found = _layout(Path(path))
    if found is None:
        return False
    try:
        cfg = _strict_json(found[0], "config", MAX_CONFIG_BYTES)
    except ModelError:
        return True
    return "model_type" in cfg or "architecture" not in cfg


def _describe(hidden, layers, heads, regs) -> str:
    return f"hidden {hidden}, {layers} layers, {heads} heads, {regs or 'no'} registers"


def check_hf_config(cfg: dict, spec: ModelSpec, config_path: Path) -> dict:
    """Refuse a config.json that does not describe `spec`; return the config with defaults filled in."""
    mtype = cfg.get("model_type")
    if mtype not in HF_MODEL_TYPES:
        raise ModelError(
            f"--weights config {config_path} is a Hugging Face {str(mtype)[:40]!r} model, not DINOv2 "
            f"(model_type {' or '.join(HF_MODEL_TYPES)}); pass the {hf_repo_name(spec)} checkpoint"
        )
    c = {**_DEFAULTS[mtype], **cfg}
    if mtype == "dinov2":
        c["num_register_tokens"] = 0  # Dinov2Model has no registers whatever the file says
    want = (spec.embed_dim, spec.depth, spec.num_heads, spec.num_registers)
    got = (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_register_tokens"])
    if got != want:
        match = next((s for s in CATALOGUE.values()
                      if (s.embed_dim, s.depth, s.num_heads, s.num_registers) == got), None)
        what = (f"{hf_repo_name(match)} ({_describe(*got)})" if match
                else f"a DINOv2 variant with {_describe(*got)}")
        fix = f"pass model {match.name}" if match else "check the checkpoint"
        raise ModelError(
            f"--weights config {config_path} is {what}, not {spec.name} ({_describe(*want)}); "
            f"{fix} or give the {hf_repo_name(spec)} weights"
        )
    swiglu, eps = spec.name.startswith("dinov2_vitg14"), c["layer_norm_eps"]
    checks = [
        ("patch_size", c["patch_size"] == spec.patch_size, spec.patch_size),
        ("num_channels", c["num_channels"] == 3, 3),
        ("use_swiglu_ffn", c["use_swiglu_ffn"] is swiglu, swiglu),
        ("mlp_ratio", c["mlp_ratio"] == 4, 4),
        ("layer_norm_eps", isinstance(eps, (int, float)) and math.isclose(eps, 1e-6), 1e-6),
        ("qkv_bias", c["qkv_bias"] is True, True),
        ("hidden_act", swiglu or c["hidden_act"] == "gelu", "gelu"),
    ]
    for field, ok, expected in checks:
        if not ok:
            raise ModelError(
                f"--weights config {config_path} has {field} {str(c[field])[:40]}, but {spec.name} "
                f"({hf_repo_name(spec)}) has {expected}; pass an unmodified {hf_repo_name(spec)} checkpoint"
            )
    return c


def hf_checkpoint_files(path: str | Path) -> list[Path]:
    """config.json and every weights file of the HF checkpoint at `path` (for digests)."""
    found = _layout(Path(path))
    if found is None:
        raise ModelError(f"--weights {path} is not a Hugging Face checkpoint (config.json + {WEIGHTS})")
    config, weights = found
    if weights.name.endswith(".index.json"):
        return [config, weights] + [weights.parent / n for n in sorted(set(_weight_map(weights).values()))]
    return [config, weights]


def _weight_map(index: Path) -> dict[str, str]:
    idx = _strict_json(index, "--weights index", MAX_INDEX_BYTES)
    wm = idx.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise ModelError(f"--weights index {index} has no 'weight_map' object; replace it with an intact one")
    bad = next((f for k, f in wm.items() if not isinstance(f, str) or not _SHARD_NAME.match(f)), None)
    if bad is not None:
        raise ModelError(
            f"--weights index {index} names shard {str(bad)[:80]!r}, not a plain .safetensors file name in "
            "its folder; replace the index with an intact copy"
        )
    if len(set(wm.values())) > MAX_SHARDS:
        raise ModelError(f"--weights index {index} names over {MAX_SHARDS} shards; replace it with an intact one")
    return wm


def _read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of every shard the index names (each key in its shard)."""
    if not weights.name.endswith(".index.json"):
        return check_tensor_dict(load_tensor_file(weights, "--weights"), weights)
    wm = _weight_map(weights)
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(wm.values())):
        p = weights.parent / shard
        if not p.is_file():
            raise ModelError(f"--weights shard {p} named by {weights.name} is missing; download the whole model")
        part = check_tensor_dict(load_tensor_file(p, "--weights shard"), p)
        wrong = sorted(k for k in part if wm.get(k) != shard)
        absent = sorted(k for k, f in wm.items() if f == shard and k not in part)
        if wrong or absent:
            raise ModelError(
                f"--weights shard {p} does not hold what {weights.name} says (absent {absent[:3]}, "
                f"unlisted {wrong[:3]}); download the whole checkpoint again"
            )
        sd.update(part)
    return sd


def _take(sd: dict, path: Path, *names: str) -> torch.Tensor:
    """Pop the first of `names` present (alternative spellings of one tensor)."""
    for n in names:
        if n in sd:
            return sd.pop(n)
    raise ModelError(f"--weights {path} lacks tensor {names[0]!r}; the checkpoint is truncated or not DINOv2")


def hf_to_official(sd: dict[str, torch.Tensor], num_layers: int, path: Path, *, swiglu: bool = False
                   ) -> dict[str, torch.Tensor]:
    """transformers DINOv2 keys (either layout in the module docstring) -> official layout; `swiglu`
    is config.json's use_swiglu_ffn (giant)."""
    import torch

    sd = dict(sd)
    for prefix in ("dinov2.", "dinov2_with_registers."):
        if prefix + "embeddings.cls_token" in sd:
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    out: dict[str, torch.Tensor] = {}
    e = "embeddings."
    out["cls_token"] = _take(sd, path, e + "cls_token")
    out["pos_embed"] = _take(sd, path, e + "position_embeddings")
    out["patch_embed.proj.weight"] = _take(sd, path, e + "patch_embeddings.projection.weight")
    out["patch_embed.proj.bias"] = _take(sd, path, e + "patch_embeddings.projection.bias")
    if e + "mask_token" in sd:
        out["mask_token"] = sd.pop(e + "mask_token")
    if e + "register_tokens" in sd:
        out["register_tokens"] = sd.pop(e + "register_tokens")
    for i in range(num_layers):
        hf, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            out[b + f"norm1.{t}"] = _take(sd, path, hf + f"norm1.{t}")
            out[b + f"norm2.{t}"] = _take(sd, path, hf + f"norm2.{t}")
            qkv = [_take(sd, path, hf + f"attention.attention.{old}.{t}", hf + f"attention.{new}_proj.{t}")
                   for old, new in (("query", "q"), ("key", "k"), ("value", "v"))]
            out[b + f"attn.qkv.{t}"] = torch.cat(qkv, dim=0)
            out[b + f"attn.proj.{t}"] = _take(sd, path, hf + f"attention.output.dense.{t}",
                                              hf + f"attention.o_proj.{t}")
            if not swiglu:
                out[b + f"mlp.fc1.{t}"] = _take(sd, path, hf + f"mlp.fc1.{t}")
                out[b + f"mlp.fc2.{t}"] = _take(sd, path, hf + f"mlp.fc2.{t}")
            elif hf + f"mlp.weights_in.{t}" in sd:
                out[b + f"mlp.w12.{t}"] = sd.pop(hf + f"mlp.weights_in.{t}")
                out[b + f"mlp.w3.{t}"] = _take(sd, path, hf + f"mlp.weights_out.{t}")
            else:  # transformers 5.x split SwiGLU; official: silu(x12[:h]) * x12[h:]
                gate = _take(sd, path, hf + f"mlp.gate_proj.{t}", hf + f"mlp.weights_in.{t}")
                out[b + f"mlp.w12.{t}"] = torch.cat([gate, _take(sd, path, hf + f"mlp.up_proj.{t}")], dim=0)
                out[b + f"mlp.w3.{t}"] = _take(sd, path, hf + f"mlp.down_proj.{t}",
                                               hf + f"mlp.weights_out.{t}")
        out[b + "ls1.gamma"] = _take(sd, path, hf + "layer_scale1.lambda1")
        out[b + "ls2.gamma"] = _take(sd, path, hf + "layer_scale2.lambda1")
    out["norm.weight"] = _take(sd, path, "layernorm.weight")
    out["norm.bias"] = _take(sd, path, "layernorm.bias")
    left = sorted(k for k in sd if not k.startswith("classifier."))
    if left:
        extra = sorted({int(m.group(1)) for k in left if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
        more = f" (layers {extra[0]}..{extra[-1]} beyond config.json's {num_layers})" if extra else ""
        raise ModelError(
            f"--weights {path} holds tensors the model does not use{more}: {left[:3]}; "
            "config.json and the weights do not belong together"
        )
    return out


def load_hf_checkpoint(path: str | Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The tensors of the transformers checkpoint at `path` in the official layout (float32), after
    checking its config.json against `spec` and its position embedding against the config."""
    p = Path(path)
    found = _layout(p)
    if found is None:
        raise ModelError(
            f"--weights {p} is not a Hugging Face checkpoint; give a folder with {CONFIG} and {WEIGHTS} "
            f"(or {INDEX} and its shards)"
        )
    config_path, weights = found
    cfg = check_hf_config(_strict_json(config_path, "--weights config", MAX_CONFIG_BYTES), spec, config_path)
    sd = hf_to_official(_read_tensors(weights), spec.depth, weights, swiglu=cfg["use_swiglu_ffn"])
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    pos = sd["pos_embed"]
    n = pos.shape[1] - 1 if pos.ndim == 3 else -1
    if pos.ndim != 3 or pos.shape[0] != 1 or n < 1 or math.isqrt(n) ** 2 != n:
        raise ModelError(
            f"--weights {weights}: position_embeddings of shape {tuple(pos.shape)} are not [1, 1+G*G, D] "
            "(CLS position plus a square grid); the checkpoint is not DINOv2"
        )
    image_size = cfg.get("image_size")
    if isinstance(image_size, int) and image_size > 0 and (image_size // spec.patch_size) ** 2 != n:
        raise ModelError(
            f"--weights {weights}: position_embeddings hold {n} patch positions, but config.json's "
            f"image_size {image_size} means {(image_size // spec.patch_size) ** 2}; the files do not belong together"
        )
    if (spec.num_registers > 0) != ("register_tokens" in sd):
        raise ModelError(
            f"--weights {weights} {'lacks' if spec.num_registers else 'has'} embeddings.register_tokens, "
            f"against its config.json; the files do not belong together"
        )
    return sd
