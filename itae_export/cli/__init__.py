"""The command-line tools. The only place that imports argparse: each command parses its flags into
the typed API's arguments and calls it. The entry points import their own command module only, so
`itae-patch` does not pay for loading the exporter's."""

from __future__ import annotations

from collections.abc import Sequence


def export_main(argv: Sequence[str] | None = None) -> int:
    from .export_cmd import export_main as main

    return main(argv)


def patch_main(argv: Sequence[str] | None = None) -> int:
    from .patch_cmd import patch_main as main

    return main(argv)


def inspect_main(argv: Sequence[str] | None = None) -> int:
    from .patch_cmd import inspect_main as main

    return main(argv)


def triton_main(argv: Sequence[str] | None = None) -> int:
    from .triton_args import triton_main as main

    return main(argv)


def validate_main(argv: Sequence[str] | None = None) -> int:
    from .validate_cmd import validate_main as main

    return main(argv)


def embed_main(argv: Sequence[str] | None = None) -> int:
    from .embed_cmd import embed_main as main

    return main(argv)


def cluster_main(argv: Sequence[str] | None = None) -> int:
    from .cluster_cmd import cluster_main as main

    return main(argv)


__all__ = ["cluster_main", "embed_main", "export_main", "inspect_main", "patch_main", "triton_main", "validate_main"]
