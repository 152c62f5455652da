"""Exception families. The CLIs catch ItaeError (and graph_passes' PassError), print the message
and exit non-zero; every message names the file/flag at fault and what to do."""

from __future__ import annotations


class ItaeError(Exception):
    """Base of every error the CLIs report without a traceback."""

    exit_code = 2


class UsageError(ItaeError):
    """A bad command-line value or combination of flags."""


class OutputExistsError(ItaeError):
    """An output path exists and --force was not given."""


class ModelError(ItaeError):
    """Unknown model name, missing or incompatible weights."""


class ExportError(ItaeError):
    """torch -> ONNX export failed."""


class ParityError(ItaeError):
    """A backend disagrees with the PyTorch reference beyond tolerance."""

    exit_code = 3


class EngineError(ItaeError):
    """TensorRT engine building or running failed, or TensorRT / a GPU is missing."""

    exit_code = 4


class DataError(ItaeError):
    """A data set folder or file is missing or not in the expected layout."""


class DeployError(ItaeError):
    """A Triton model repository could not be written."""
