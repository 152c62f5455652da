"""Subprocess writer for tests/test_outputs.py: writes a tiny external-data ONNX model (y = x + w,
w = VALUE) through an OutputTransaction and exits with the ItaeError's exit code on failure.

    python tests/_writer_proc.py DEST VALUE [--force] [--signals] [--wait-file F] [--sleep S]
                                 [--kill-before-replace]

Prints "STAGED <pid>" once the model is staged. --kill-before-replace SIGKILLs the process in the
middle of commit(): after the data file was renamed in, before the .onnx os.replace.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_model(value: float) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    w = numpy_helper.from_array(np.full(4, value, np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, location=location or path.name + ".data",
                    size_threshold=0)


def stage_model(tx, dest: Path, value: float) -> Path:
    """Stage the model for `dest` the way the exporters do: external data named `<dest>.data`."""
    staged = tx.stage_path(dest)
    save_external(make_model(value), staged, Path(dest).name + ".data")
    tx.add(staged, dest)
    return staged


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dest", type=Path)
    ap.add_argument("value", type=float)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--signals", action="store_true")
    ap.add_argument("--wait-file", type=Path)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--kill-before-replace", action="store_true")
    args = ap.parse_args()

    from itae_export.errors import ItaeError, Terminated
    from itae_export.outputs import OutputTransaction, install_signal_handlers

    if args.signals:
        install_signal_handlers()
    if args.kill_before_replace:
        real_replace = os.replace
        target = os.path.abspath(args.dest)

        def replace(src, dst, *a, **kw):
            if os.path.abspath(dst) == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *a, **kw)

        os.replace = replace
    try:
        with OutputTransaction(args.dest, force=args.force) as tx:
            stage_model(tx, args.dest, args.value)
            print("STAGED", os.getpid(), flush=True)
            while args.wait_file is not None and not args.wait_file.exists():
                time.sleep(0.02)
            time.sleep(args.sleep)
            tx.commit()
    except ItaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
