"""Helpers for users' pytest suites.

    from itae_export.testing import assert_parity

    def test_deployed_model_matches_pytorch():
        assert_parity("repo/dinov2_vitl14_itae", weights="dinov2_vitl14_pretrain.pth", n_random=16)

assert_parity takes validate()'s keyword arguments (itae_export.validation.validate) and raises
AssertionError with the whole report when a figure is beyond tolerance; it returns the report otherwise.
Inputs it cannot compare at all (a missing artifact, mismatched weights, no TensorRT) raise the
ItaeError validate() raises, so a broken setup is not mistaken for a parity failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .validation import ValidationReport, validate

__all__ = ["assert_parity"]


def assert_parity(artifact: str | Path, **kwargs: Any) -> ValidationReport:
    """validate(artifact, **kwargs); AssertionError carrying the report text when it did not pass."""
    __tracebackhide__ = True  # pytest: show the assertion, not this frame
    report = validate(artifact, **kwargs)
    if not report:
        raise AssertionError(f"{report.failure_message()}\n{report}")
    return report
