"""The one error family of itae_export, and its exit codes.

Every foreseeable failure is an ItaeError whose message is one sentence naming the file or flag at
fault and what to do. The CLIs print it and exit with `exit_code`; the Python API raises it. The two
signals are the exception: SIGINT is Python's KeyboardInterrupt and SIGTERM is Terminated (a
KeyboardInterrupt), so that no `except Exception` anywhere can swallow them.

| exit | meaning |
|-----:|---------|
| 0 | success |
| 1 | unexpected internal error (one line; rerun with --debug for the traceback) |
| 2 | bad input: a flag, a settings file, a model, weights, data, or a graph the pass refuses |
| 3 | parity: an artifact disagrees with the PyTorch reference beyond tolerance |
| 4 | TensorRT or a GPU is missing, or the engine build failed |
| 5 | the output cannot be written (read-only, full, permissions) |
| 6 | another process is writing the same output |
| 130 | interrupted (SIGINT) |
| 143 | terminated (SIGTERM) |
"""

from __future__ import annotations


class ItaeError(Exception):
    """Base of every error the CLIs report without a traceback."""

    exit_code = 2


class UsageError(ItaeError):
    """A bad command-line value, API argument or combination of options."""


class SettingsError(UsageError):
    """A settings value or file is malformed (wrong type, out of range, unreadable)."""


class OutputExistsError(ItaeError):
    """An output path exists and force (--force) was not given."""


class ModelError(ItaeError):
    """Unknown model name, missing or incompatible weights."""


class ExportError(ItaeError):
    """torch -> ONNX export failed."""


class GraphError(ItaeError):
    """A graph pass refused the graph (no matching attention, already patched, unsafe data location)."""


class DataError(ItaeError):
    """A data set folder, image or file is missing, hostile or not in the expected layout."""


class DeployError(ItaeError):
    """A Triton model repository could not be written."""


class ParityError(ItaeError):
    """A backend disagrees with the PyTorch reference beyond tolerance."""

    exit_code = 3


class EngineError(ItaeError):
    """TensorRT engine building or running failed, or TensorRT / a GPU is missing."""

    exit_code = 4


class OutputError(ItaeError):
    """The output path cannot be written: read-only, full, or no permission."""

    exit_code = 5


class OutputBusyError(ItaeError):
    """Another process holds the lock on the output path."""

    exit_code = 6


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like SIGINT: everything staged is removed (exit 143). Like KeyboardInterrupt it
    is a BaseException, so no library's `except Exception` can swallow or re-wrap it."""

    exit_code = 143


class MissingDependencyError(ItaeError):
    """An optional extra is not installed; the message says which `pip install` gives it."""


def graph_error(e: Exception) -> GraphError:
    """A graph_passes refusal (PassError) as an itae_export error, message unchanged."""
    return GraphError(str(e))
