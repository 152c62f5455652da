"""The command-line tools. The only place that imports argparse: each command parses its flags into
the typed API's arguments and calls it."""

from .export_cmd import export_main
from .patch_cmd import inspect_main, patch_main
from .triton_args import triton_main

__all__ = ["export_main", "inspect_main", "patch_main", "triton_main"]
