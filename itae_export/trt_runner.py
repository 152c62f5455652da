"""Run a serialized TensorRT engine on numpy batches, and the onnxruntime GPU providers.

TrtRunner uses the TensorRT 10.x / 11.x tensor-name API: deserialize_cuda_engine, one execution
context, set_input_shape, set_tensor_address, execute_async_v3. Device memory comes from torch CUDA
tensors when torch.cuda is available (no extra dependency in this project), else from cuda-python
(`cuda.bindings.runtime`, the `cuda-python` package of the `.[trt]` extra). Batches larger than the
engine's profile are split; smaller than its minimum are padded and the padding dropped.

ort_gpu_providers() gives onnxruntime's CUDA or TensorRT execution provider as a second GPU path.
onnxruntime falls back to the CPU silently when a GPU provider cannot load its libraries, so
check_session_providers() confirms that a session really runs on the requested provider.

Nothing here has been run on a GPU yet; the CPU tests cover the error paths only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # checked against tensorrt-stubs by tools/typecheck_tensorrt.py; never imported here
    import tensorrt

from .errors import EngineError
from .settings import PATCH_SIZE as PATCH

INSTALL_HINT = 'pip install -e ".[trt]" on a machine with an NVIDIA GPU, or use an NGC TensorRT container'
_PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def _import_tensorrt() -> Any:
    from .engine import import_tensorrt

    trt, why = import_tensorrt()
    if trt is None:
        raise EngineError(f"cannot run TensorRT engines: the tensorrt package does not import ({why}); {INSTALL_HINT}")
    return trt


class _TorchMemory:
    """Device buffers as torch CUDA tensors; the engine runs on torch's current stream."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", torch.cuda.current_device())

    def to_device(self, x: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def empty(self, shape: tuple[int, ...], np_dtype: np.dtype) -> Any:
        dt = {np.dtype(np.float32): self.torch.float32, np.dtype(np.float16): self.torch.float16,
              np.dtype(np.int32): self.torch.int32, np.dtype(np.int64): self.torch.int64,
              np.dtype(np.bool_): self.torch.bool, np.dtype(np.uint16): self.torch.bfloat16}[np.dtype(np_dtype)]
        return self.torch.empty(shape, dtype=dt, device=self.device)

    @staticmethod
    def ptr(buf: Any) -> int:
        return int(buf.data_ptr())

    def stream(self) -> int:
        return int(self.torch.cuda.current_stream(self.device).cuda_stream)

    def to_host(self, buf: Any) -> np.ndarray:
        self.torch.cuda.current_stream(self.device).synchronize()
        return buf.float().cpu().numpy() if buf.is_floating_point() else buf.cpu().numpy()

    def free(self, buf: Any) -> None:
        del buf


class _CudaPythonMemory:
    """Device buffers through cuda-python's runtime bindings (cudaMalloc / cudaMemcpyAsync)."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
            except ImportError as e:
                raise EngineError(f"TrtRunner needs torch with CUDA or cuda-python for device memory; {INSTALL_HINT}") from e
        self.rt = cudart
        self._stream = self._ok(cudart.cudaStreamCreate())
        self._shapes: dict[int, tuple[tuple[int, ...], np.dtype]] = {}

    def _ok(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != int(self.rt.cudaError_t.cudaSuccess):
            raise EngineError(f"CUDA runtime call failed ({err}); check the GPU driver (nvidia-smi)")
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    def to_device(self, x: np.ndarray) -> int:
        x = np.ascontiguousarray(x)
        ptr = self.empty(x.shape, x.dtype)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, kind, self._stream))
        self._ok(self.rt.cudaStreamSynchronize(self._stream))  # x may be freed by the caller
        return ptr

    def empty(self, shape: tuple[int, ...], np_dtype: np.dtype) -> int:
        nbytes = max(int(np.prod(shape)) * np.dtype(np_dtype).itemsize, 1)
        ptr = int(self._ok(self.rt.cudaMalloc(nbytes)))
        self._shapes[ptr] = (tuple(shape), np.dtype(np_dtype))
        return ptr

    @staticmethod
    def ptr(buf: int) -> int:
        return int(buf)

    def stream(self) -> int:
        return int(self._stream)

    def to_host(self, buf: int) -> np.ndarray:
        shape, dt = self._shapes[buf]
        out = np.empty(shape, dtype=dt)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(out.ctypes.data, buf, out.nbytes, kind, self._stream))
        self._ok(self.rt.cudaStreamSynchronize(self._stream))
        if dt == np.uint16:  # bfloat16 bits -> float32
            return (out.astype(np.uint32) << 16).view(np.float32)
        return out.astype(np.float32) if dt == np.float16 else out

    def free(self, buf: int) -> None:
        self._shapes.pop(buf, None)
        self._ok(self.rt.cudaFree(buf))


def _device_memory() -> Any:
    try:
        import torch

        if torch.cuda.is_available():
            return _TorchMemory()
    except ImportError:
        pass
    return _CudaPythonMemory()


class TrtRunner:
    """TrtRunner(engine_path).run(x: float32 [B,C,H,W]) -> float32 [B,D] (first engine output)."""

    def __init__(self, engine_path: str | Path) -> None:
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise EngineError(f"engine file {self.engine_path} does not exist; build it with itae-export --out *.engine")
        trt = _import_tensorrt()
        self.trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime: tensorrt.Runtime = trt.Runtime(self._logger)
        self.engine: tensorrt.ICudaEngine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise EngineError(
                f"TensorRT {getattr(trt, '__version__', '?')} cannot load {self.engine_path}: engines only run on the "
                "TensorRT version and GPU model that built them; rebuild it here (see build_engine.sh next to the ONNX)"
            )
        self.context: tensorrt.IExecutionContext = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {self.engine_path} (GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        if len(self.inputs) != 1 or not self.outputs:
            raise EngineError(f"{self.engine_path} has inputs {self.inputs} and outputs {self.outputs}; expected one image input")
        self.input_name = self.inputs[0]
        mn, _, mx = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(mn[0]), int(mx[0])
        self.dynamic_hw = len(mn) == 4 and (int(mn[2]), int(mn[3])) != (int(mx[2]), int(mx[3]))
        self._mem = _device_memory()

    def _np_dtype(self, name: str) -> np.dtype:
        dt = self.engine.get_tensor_dtype(name)
        if hasattr(self.trt, "bfloat16") and dt == self.trt.bfloat16:
            return np.dtype(np.uint16)
        return np.dtype(self.trt.nptype(dt))

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n < self.min_batch:  # pad up to the profile minimum, drop the padding afterwards
            x = np.concatenate([x, np.zeros((self.min_batch - n, *x.shape[1:]), dtype=x.dtype)])
        x = x.astype(self._np_dtype(self.input_name), copy=False)
        if self.dynamic_hw and (x.shape[2] % PATCH or x.shape[3] % PATCH):
            # TensorRT would floor the patch grid silently; the official model refuses such sizes
            raise EngineError(f"input {x.shape[2]}x{x.shape[3]}: the engine takes heights and widths that are "
                              f"multiples of {PATCH}; resize or crop the images")
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise EngineError(f"input shape {tuple(x.shape)} is outside the profile of {self.engine_path}")
        mem = self._mem
        bufs = {self.input_name: mem.to_device(x)}
        try:
            for name in self.outputs:
                dims = self.context.get_tensor_shape(name)
                shape = tuple(int(dims[i]) for i in range(len(dims)))
                bufs[name] = mem.empty(shape, self._np_dtype(name))
            for name, buf in bufs.items():
                self.context.set_tensor_address(name, mem.ptr(buf))
            if not self.context.execute_async_v3(mem.stream()):
                raise EngineError(f"TensorRT execution of {self.engine_path} failed (see the TensorRT log above)")
            out = mem.to_host(bufs[self.outputs[0]])
        finally:
            for buf in bufs.values():
                mem.free(buf)
        return np.asarray(out, dtype=np.float32)[:n]

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise EngineError(f"TrtRunner.run expects [B,C,H,W], got shape {x.shape}")
        chunks = [self._run_one(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return np.concatenate(chunks, axis=0)


def ort_gpu_providers(
    kind: str,
    cache_dir: str | Path | None = None,
    *,
    fp16: bool = False,
    device_id: int = 0,
    profile: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    workspace_mib: int | None = None,
) -> list[Any]:
    """Providers list for onnxruntime.InferenceSession: kind "cuda" -> [CUDA, CPU]; "tensorrt" ->
    [TensorRT (engine + timing cache under cache_dir), CUDA, CPU].

    profile: optional {"min"|"opt"|"max": (input_name, shape)} for the TensorRT EP's dynamic-shape
    profile. Raises EngineError when onnxruntime-gpu's provider is not available here.
    """
    if kind not in _PROVIDERS:
        raise EngineError(f"unknown GPU provider kind {kind!r}; choose 'cuda' or 'tensorrt'")
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = _PROVIDERS[kind]
    if wanted not in available:
        raise EngineError(
            f"onnxruntime {ort.__version__} has no {wanted} (available: {', '.join(available)}); install onnxruntime-gpu "
            '(pip install -e ".[gpu]", uninstalling the CPU onnxruntime first)'
            + (" and TensorRT" if kind == "tensorrt" else "")
            + " on a machine with an NVIDIA GPU"
        )
    cuda_opts = {"device_id": device_id}
    providers: list[Any] = []
    if kind == "tensorrt":
        trt_opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": bool(fp16)}
        if cache_dir is not None:
            cache = Path(cache_dir)
            cache.mkdir(parents=True, exist_ok=True)
            trt_opts.update(
                trt_engine_cache_enable=True,
                trt_engine_cache_path=str(cache),
                trt_timing_cache_enable=True,
                trt_timing_cache_path=str(cache),
            )
        if workspace_mib is not None:
            trt_opts["trt_max_workspace_size"] = int(workspace_mib) << 20
        if profile:
            for key in ("min", "opt", "max"):
                name, shape = profile[key]
                trt_opts[f"trt_profile_{key}_shapes"] = f"{name}:{'x'.join(str(int(s)) for s in shape)}"
        providers.append(("TensorrtExecutionProvider", trt_opts))
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", cuda_opts))
    providers.append("CPUExecutionProvider")
    return providers


def check_session_providers(session: Any, kind: str) -> None:
    """Raise EngineError unless the session's first provider is the requested GPU provider
    (onnxruntime silently falls back to the CPU when CUDA/TensorRT libraries are missing)."""
    wanted = _PROVIDERS[kind]
    got = list(session.get_providers())
    if not got or got[0] != wanted:
        raise EngineError(
            f"onnxruntime did not start {wanted} (session providers: {', '.join(got) or 'none'}); its CUDA/cuDNN"
            + ("/TensorRT" if kind == "tensorrt" else "")
            + " libraries are missing or do not match this onnxruntime-gpu build (see the onnxruntime warnings above)"
        )
