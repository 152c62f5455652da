"""Deployment graph options: `--input-format uint8-nhwc` (the graph takes raw uint8 [B,H,W,3] pixels and
normalises them itself) and `--l2-normalize` (unit-length embeddings). They rewrite the validated ONNX
with graph_passes.preprocess, before a TensorRT engine is built from it or it is deployed to Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DeployError, UsageError

INPUT_FORMATS = ("float32-nchw", "uint8-nhwc")


@dataclass(frozen=True)
class GraphOptions:
    input_format: str | None = None  # None: as the model is; "uint8-nhwc" adds the uint8 input
    l2_normalize: bool = False
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.input_format not in (None, *INPUT_FORMATS):
            raise UsageError(
                f"--input-format {self.input_format!r}: choose one of {', '.join(INPUT_FORMATS)}"
            )

    @property
    def any(self) -> bool:
        return self.input_format == "uint8-nhwc" or self.l2_normalize


def apply_graph_options_proto(model, opts: GraphOptions):
    """Apply `opts` to an onnx.ModelProto (weights may be unloaded) -> (model, {pass: result dict}).

    Idempotent: a pass already recorded in the model's metadata is not applied again, and an explicit
    float32-nchw request on a model that already takes uint8 is refused.
    """
    from graph_passes.preprocess import (
        L2_NORMALIZE_KEY,
        UINT8_INPUT_KEY,
        PreprocessPassError,
        add_l2_normalize,
        add_uint8_nhwc_input,
        applied_passes,
    )

    done = applied_passes(model)
    record: dict[str, Any] = {}
    if opts.input_format == "uint8-nhwc":
        if UINT8_INPUT_KEY in done:
            record["uint8_nhwc_input"] = {**done[UINT8_INPUT_KEY], "already_applied": True}
        else:
            try:
                model, res = add_uint8_nhwc_input(model, opts.mean, opts.std)
            except PreprocessPassError as e:
                raise UsageError(f"--input-format uint8-nhwc: {e}") from e
            record["uint8_nhwc_input"] = res.to_dict()
    elif opts.input_format == "float32-nchw" and UINT8_INPUT_KEY in done:
        raise UsageError(
            "--input-format float32-nchw: this model already takes uint8 NHWC pixels "
            "(built with --input-format uint8-nhwc); drop the flag or deploy the float model"
        )
    if opts.l2_normalize:
        if L2_NORMALIZE_KEY in done:
            record["l2_normalize"] = {**done[L2_NORMALIZE_KEY], "already_applied": True}
        else:
            try:
                model, res = add_l2_normalize(model)
            except PreprocessPassError as e:
                raise UsageError(f"--l2-normalize: {e}") from e
            record["l2_normalize"] = res.to_dict()
    return model, record


def apply_graph_options(
    onnx_path_in: str | Path, onnx_path_out: str | Path, opts: GraphOptions
) -> Path:
    """Apply --input-format / --l2-normalize to an ONNX file; return the ONNX path to use from now on.

    Returns `onnx_path_in` (nothing written) when no option asks for a change or the graph already
    has them (recorded in its metadata). Otherwise
    writes `onnx_path_out` (weights are not loaded: if it sits in another directory the external
    .data files are copied beside it; put it beside the input to share them). Call it after the ITAE
    pass and before building a TensorRT engine, then build the engine from the returned path.
    """
    import onnx

    from graph_passes.preprocess import save_model

    src = Path(onnx_path_in)
    if not opts.any and opts.input_format is None:
        return src
    out = Path(onnx_path_out)
    if out.resolve() == src.resolve():
        raise UsageError(f"graph options: the output {out} is the input ONNX; inputs are never modified")
    model = onnx.load(str(src), load_external_data=False)
    model, record = apply_graph_options_proto(model, opts)
    if all(r.get("already_applied") for r in record.values()):
        return src  # nothing changed (options absent or already in the graph)
    try:
        return save_model(model, out, source_path=src)
    except (FileNotFoundError, FileExistsError) as e:
        raise DeployError(f"writing {out}: {e}") from e


def normalise_pixels(pixels, mean, std, dtype=None):
    """uint8 [B,H,W,3] RGB pixels -> ImageNet-normalised [B,3,H,W], computed in float64 (what the
    uint8-input graph must reproduce), cast to `dtype` (default float32)."""
    import numpy as np

    m = np.reshape(mean, (1, 3, 1, 1))
    s = np.reshape(std, (1, 3, 1, 1))
    return ((pixels.transpose(0, 3, 1, 2).astype(np.float64) / 255.0 - m) / s).astype(dtype or np.float32)


def l2_normalise(y, eps: float = 1e-12):
    """y / max(||y||, eps) row by row, computed in float64, in y's dtype (what --l2-normalize adds)."""
    import numpy as np

    norm = np.linalg.norm(y.astype(np.float64), axis=-1, keepdims=True)
    return (y / np.maximum(norm, eps)).astype(y.dtype)


def reference_batch(
    opts: GraphOptions,
    reference_fn,
    *,
    batch: int,
    height: int,
    width: int,
    seed: int = 0,
):
    """Inputs and expected outputs for a graph built with the graph options, for parity checks of the
    rewritten ONNX or of an engine built from it: (inputs, outputs) as numpy arrays.

    `reference_fn` maps ImageNet-normalised float32 NCHW to embeddings (e.g. the PyTorch ITAE reference).
    uint8-nhwc: inputs are random uint8 [B, H, W, 3] pixels, normalised in float64 for the reference;
    else random normal float32 NCHW. --l2-normalize: outputs are L2-normalised like the graph does.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    if opts.input_format == "uint8-nhwc":
        inputs = rng.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)
        x = normalise_pixels(inputs, opts.mean, opts.std)
    else:
        inputs = x = rng.standard_normal((batch, 3, height, width)).astype(np.float32)
    outputs = np.asarray(reference_fn(x))
    if opts.l2_normalize:
        outputs = l2_normalise(outputs)
    return inputs, outputs


def verify_graph_options(
    onnx_before: str | Path, onnx_after: str | Path, *, batch: int = 2, seed: int = 0,
    size: tuple[int, int] | None = None,
) -> dict[str, float]:
    """ONNX Runtime check that `onnx_after` == `onnx_before` fed the same pixels normalised in NumPy
    (float64) and, if applied, L2-normalised in NumPy. Returns max_abs and cos_min. `size`: the
    (H, W) to feed a dynamic-size graph (default 224 x 224)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from graph_passes.preprocess import L2_NORMALIZE_KEY, UINT8_INPUT_KEY, applied_passes

    after_model = onnx.load(str(onnx_after), load_external_data=False)
    before_model = onnx.load(str(onnx_before), load_external_data=False)
    done = {k: v for k, v in applied_passes(after_model).items() if k not in applied_passes(before_model)}
    providers = ["CPUExecutionProvider"]
    s_before = ort.InferenceSession(str(onnx_before), providers=providers)
    s_after = ort.InferenceSession(str(onnx_after), providers=providers)
    rng = np.random.default_rng(seed)
    i_after = s_after.get_inputs()[0]
    dyn_h, dyn_w = size or (224, 224)
    if UINT8_INPUT_KEY in done:
        rec = done[UINT8_INPUT_KEY]
        h = rec["height"] if isinstance(rec["height"], int) else dyn_h
        w = rec["width"] if isinstance(rec["width"], int) else dyn_w
        px = rng.integers(0, 256, size=(batch, h, w, 3), dtype=np.uint8)
        x_before = normalise_pixels(px, rec["mean"], rec["std"], np.float64)
        x_after = px
    else:
        default = [batch, 3, dyn_h, dyn_w]
        shape = [d if isinstance(d, int) and d > 0 else default[k] for k, d in enumerate(s_before.get_inputs()[0].shape)]
        x_before = rng.normal(size=shape)
        x_after = None
    dt = np.float16 if "float16" in s_before.get_inputs()[0].type else np.float32
    x_before = x_before.astype(dt)
    if x_after is None:
        x_after = x_before
    ref = s_before.run(None, {s_before.get_inputs()[0].name: x_before})[0].astype(np.float64)
    got = s_after.run(None, {i_after.name: x_after})[0].astype(np.float64)
    if L2_NORMALIZE_KEY in done:
        ref = l2_normalise(ref, done[L2_NORMALIZE_KEY]["eps"])
    from .parity import cosine_rows

    return {"max_abs": float(np.max(np.abs(ref - got))), "cos_min": float(np.min(cosine_rows(ref, got)))}
