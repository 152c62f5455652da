"""What every command shares: the ITAE flags, --debug, logging to stdout, and one runner that maps
the error family to exit codes (and SIGTERM to 143) with one clear line and no traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from graph_passes.config import (
    ATTENUATIONS,
    DIRECTIONS,
    NORM_SCOPES,
    NORM_SOURCES,
    RELATIVE_STATS,
    ROWS,
    ITAEConfig,
)
from graph_passes.errors import PassError

from ..errors import ItaeError, SettingsError, Terminated, UsageError
from ..outputs import install_signal_handlers

METHOD_DOC = "docs/method.md"
ITAE_FIELDS = ("norm_source", "norm_scope", "direction", "threshold", "relative_threshold", "relative_stat",
               "attenuation", "alpha", "rows")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults where they are real values (not None/False/SUPPRESS)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or "(default" in text:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: "PROG: error: ...; see PROG --help", exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--debug", action="store_true", help="print the full traceback of an unexpected error")
    return p


def add_itae_args(p: argparse.ArgumentParser, *, attenuation: bool = True, thresholds: bool = True) -> None:
    """The ITAE flags; itae-calibrate leaves out the thresholds (it computes one) and the attenuation."""
    g = p.add_argument_group(f"ITAE settings (the method and its defaults: {METHOD_DOC})")
    g.add_argument("--settings", metavar="FILE", help="JSON settings file (e.g. from itae-calibrate); flags override it")
    g.add_argument("--norm-source", choices=NORM_SOURCES, help="tensor whose token lengths flag artifacts (default v)")
    g.add_argument("--norm-scope", choices=NORM_SCOPES, help="length over all heads (token) or per head (default token)")
    g.add_argument("--direction", choices=DIRECTIONS, help="artifacts are longer (high) or shorter (low) (default high)")
    if thresholds:
        g.add_argument("--threshold", type=float, metavar="LEN", help="absolute length threshold (calibrated)")
        g.add_argument("--relative-threshold", type=float, metavar="GAMMA",
                       help="flag lengths beyond GAMMA x the image's mean patch length (default 2.0 high / 0.5 low)")
    g.add_argument("--relative-stat", choices=RELATIVE_STATS, help="statistic for --relative-threshold (default mean)")
    if attenuation:
        g.add_argument("--attenuation", choices=ATTENUATIONS, help="how flagged tokens are attenuated (default min-logit)")
        g.add_argument("--alpha", type=float, help="weight factor for --attenuation scale, in [0, 1] (default 0)")
        g.add_argument("--rows", choices=ROWS, help="attenuate in the CLS query row or in every row (default cls)")


def given_itae_flags(args: argparse.Namespace) -> list[str]:
    return ["--" + f.replace("_", "-") for f in (*ITAE_FIELDS, "settings") if getattr(args, f, None) is not None]


def itae_config_from_args(args: argparse.Namespace) -> ITAEConfig:
    """The settings file (if any) with the flags given on the command line on top."""
    base: dict = {}
    try:
        if getattr(args, "settings", None):
            base = ITAEConfig.from_file(args.settings).to_dict()
            if base.get("threshold") is not None:
                base["relative_threshold"] = None
        given = {f: getattr(args, f) for f in ITAE_FIELDS if getattr(args, f, None) is not None}
        if "threshold" in given:
            base["relative_threshold"] = None
        if "relative_threshold" in given:
            base["threshold"] = None
        base.update(given)
        return ITAEConfig.from_dict(base)
    except PassError as e:
        raise SettingsError(str(e)) from e


class _StdoutHandler(logging.Handler):
    """Plain messages to whatever sys.stdout is at emit time (pytest's capsys swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), flush=True)


def run_command(prog: str, parser: argparse.ArgumentParser, fn: Callable[[argparse.Namespace], int | None],
                argv: Sequence[str] | None) -> int:
    """Parse, run `fn`, and turn every failure into one line on stderr and an exit code."""
    args = parser.parse_args(argv)
    logger = logging.getLogger("itae_export")
    handler = _StdoutHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    install_signal_handlers()
    try:
        return int(fn(args) or 0)
    except ItaeError as e:
        return _fail(prog, str(e), e.exit_code)
    except PassError as e:
        return _fail(prog, str(e), UsageError.exit_code)
    except Terminated as e:
        return _fail(prog, str(e), Terminated.exit_code)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted (SIGINT); unfinished outputs were removed and existing ones left as they "
                     "were", 130)
    except OSError as e:
        if args.debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _fail(prog, f"{where}{e.strerror or e}; check the path and its permissions", 2)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if args.debug:
            raise
        return _fail(prog, f"unexpected {type(e).__name__}: {e}; rerun with --debug for the traceback "
                     "and report it", 1)
    finally:
        logger.removeHandler(handler)


def run_tool(prog: str, main: Callable[[], int | None]) -> int:
    """A tools/ script's main() with the package's errors as one line on stderr and their exit code, as
    run_command gives the CLIs (the script parses its own arguments)."""
    try:
        return int(main() or 0)
    except ItaeError as e:
        return _fail(prog, str(e), e.exit_code)
    except PassError as e:
        return _fail(prog, str(e), UsageError.exit_code)


def _fail(prog: str, message: str, code: int) -> int:
    text = " ".join(message.split()) if message else "failed"
    print(f"{prog}: error: {text}", file=sys.stderr)
    return code
