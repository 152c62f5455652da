#!/usr/bin/env bash
# Everything GPU-related in one command, for a fresh machine with an NVIDIA GPU:
#   1. a venv with the project and its test, trt (TensorRT + cuda-python) and gpu (onnxruntime-gpu) extras
#   2. pytest -m gpu -v   (TensorRT fp32/fp16 engines vs PyTorch, k-means agreement, ORT CUDA)
#   3. itae-export of a random-weight ViT-S/14 to TensorRT engines (fp16, fp32) with their JSON sidecars,
#      then itae-validate on each engine (JUnit XML in the output folder)
#   4. a short report; the exit status is non-zero if any step failed.
# Usage: tools/gpu_check.sh [OUT_DIR]   (env: PYTHON=python3.11, VENV=.gpu-venv, SKIP_INSTALL=1)
# Works inside an NGC TensorRT container too (TensorRT is preinstalled there; pip keeps it).
set -uo pipefail  # no -e: every step runs and the report says which failed
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.gpu-venv}"
mkdir -p "$OUT"
declare -A STATUS

step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember the exit status
  local name="$1"; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  STATUS[$name]=${PIPESTATUS[0]}
}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
  echo "no NVIDIA GPU here (nvidia-smi missing or failing); this script is for a GPU machine" >&2
  exit 4
fi
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$OUT/gpu.csv"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  # --system-site-packages keeps a preinstalled TensorRT (NGC containers) visible in the venv.
  "$PYTHON" -m venv --system-site-packages "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  step install_pip python -m pip install -q --upgrade pip
  step install python -m pip install -e ".[test,trt,gpu]"
  # onnxruntime (CPU, a base dependency) and onnxruntime-gpu share one module folder: keep the GPU one.
  step install_ort_gpu bash -c 'python -m pip uninstall -y onnxruntime >/dev/null; python -m pip install --force-reinstall --no-deps "onnxruntime-gpu"'
else
  # shellcheck disable=SC1091
  [ -f "$VENV/bin/activate" ] && . "$VENV/bin/activate"
fi

step versions python - <<'PY'
import importlib
for mod in ("torch", "tensorrt", "onnxruntime", "onnx", "timm"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod:12s} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{mod:12s} NOT AVAILABLE ({type(e).__name__}: {e})")
import torch, onnxruntime as ort
print("torch.cuda  ", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("ORT providers", ort.get_available_providers())
PY

step pytest_gpu python -m pytest -m gpu -v -rs tests/
step engine_fp16 itae-export dinov2_vits14 --random-weights --img-size 224 --precision fp16 \
  --out "$OUT/vits14_fp16.engine" --timing-cache "$OUT/timing.cache" --force
step engine_fp32 itae-export dinov2_vits14 --random-weights --img-size 224 --precision fp32 \
  --out "$OUT/vits14_fp32.engine" --timing-cache "$OUT/timing.cache" --force
# the engines checked again afterwards, as a CI job on the GPU box would (itae-validate, JUnit report)
step validate_fp16 itae-validate "$OUT/vits14_fp16.engine" --random 16 --junit-xml "$OUT/validate_fp16.xml"
step validate_fp32 itae-validate "$OUT/vits14_fp32.engine" --random 16 --junit-xml "$OUT/validate_fp32.xml"

echo
echo "=================== GPU check report ($(date -u +%FT%TZ)) ==================="
cat "$OUT/gpu.csv"
grep -E "^(tensorrt|onnxruntime|torch) " "$OUT/versions.log" 2>/dev/null || true
grep -E "passed|failed|skipped|error" "$OUT/pytest_gpu.log" | tail -1 || true
for f in "$OUT"/vits14_*.engine.json; do
  [ -f "$f" ] || continue
  python - "$f" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
p = s.get("parity") or {}
print(f"{sys.argv[1]}: TensorRT {s['tensorrt_version']} {s['precision']} on {s['gpu']['name']} "
      f"(cc {s['gpu']['compute_capability']}), fp32 layers {s['fp32_layers']['count']}, "
      f"parity cos_min {p.get('cos_min')} max_abs {p.get('max_abs')} ok={p.get('ok')}")
PY
done
rc=0
for name in "${!STATUS[@]}"; do
  printf '%-16s %s\n' "$name" "$([ "${STATUS[$name]}" = 0 ] && echo ok || echo "FAILED (exit ${STATUS[$name]}, see $OUT/$name.log)")"
  [ "${STATUS[$name]}" = 0 ] || rc=1
done
exit $rc
