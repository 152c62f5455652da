"""The one exception family of graph_passes. Every refusal is a PassError whose message names what
failed and what to do; callers (itae_export's API) translate it into their own error root."""

from __future__ import annotations


class PassError(ValueError):
    """Base of every graph-pass failure."""


class ConfigError(PassError):
    """An ITAE option has a bad value; the message names the option and the allowed values."""


class MatchError(PassError):
    """The graph does not contain a ViT attention block we can match; `step` names what failed."""

    def __init__(self, step: str, reason: str, hint: str = ""):
        self.step = step
        self.reason = reason
        msg = f"match failed at step '{step}': {reason}"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


class AlreadyPatchedError(PassError):
    """The graph already carries ITAE; re-patching would attenuate twice."""


class PreprocessPassError(PassError):
    """A deployment pass cannot be applied to this graph; the message says why and what to do."""


class Int8Error(PassError):
    """The model or the paths cannot be quantized as asked."""


class MetadataError(PassError):
    """A metadata_props entry of ours holds a value of the wrong type; the message names the key."""


class UnsafeLocationError(PassError):
    """An external-data location points outside the model's folder (absolute, '..', or a symlink out)."""
