#!/usr/bin/env python3
"""Type-check the TensorRT modules (itae_export/engine.py, itae_export/trt_runner.py) with mypy against
the installed `tensorrt-stubs` (10.13): the only check of our TensorRT API calls that runs without a GPU.

The stubs are machine-generated and do not parse as they are (a parameter named `in`, parameters
without a default after ones with a default, an import of the absent `tensorrt_libs`), and their
`tensorrt` folder has no py.typed marker, so mypy would skip them silently. This copies them into a
temporary folder, repairs those three things, and runs mypy with that folder on MYPYPATH.

    pip install --no-deps "tensorrt-stubs==10.13.*" && python tools/typecheck_tensorrt.py
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["itae_export/engine.py", "itae_export/trt_runner.py"]


def _split_params(text: str) -> list[str]:
    """Split a parameter list at top-level commas (types hold brackets)."""
    out, depth, cur = [], 0, []
    for ch in text:
        depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


def _repair_def(line: str) -> str:
    m = re.match(r"^(\s*def \w+\()(.*)(\)\s*->.*)$", line)
    if not m:
        return line
    params, seen_default = [], False
    for p in _split_params(m.group(2)):
        name = p.strip()
        if name.startswith("in:"):
            p = p.replace("in:", "in_:", 1)
        if "=" in p:
            seen_default = True
        elif seen_default and not name.startswith("*"):
            p += " = ..."
        params.append(p)
    return m.group(1) + ",".join(params) + m.group(3)


def repaired_stubs(dest: Path) -> Path:
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        raise SystemExit('tensorrt-stubs is not installed: pip install --no-deps "tensorrt-stubs==10.13.*"')
    site = Path(spec.origin).parent.parent
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / pkg, dest / pkg, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        (dest / pkg / "py.typed").write_text("")
    for pyi in dest.rglob("*.pyi"):
        lines = [ln for ln in pyi.read_text().splitlines() if not ln.startswith("import tensorrt_libs")]
        # the stubs' own remaining flaws (enum members used as types...) are not ours to report
        pyi.write_text("# mypy: ignore-errors\n" + "\n".join(_repair_def(ln) for ln in lines) + "\n")
    return dest


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="trt-stubs-") as tmp:
        stubs = repaired_stubs(Path(tmp))
        env = {**os.environ, "MYPYPATH": str(stubs)}
        cmd = [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports", *TARGETS]
        return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
