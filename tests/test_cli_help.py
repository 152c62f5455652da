"""Every option of every command has help text, defaults are shown, and itae-inspect says first
that a graph is already patched, naming the block."""

from __future__ import annotations

import argparse

import pytest

from itae_export.cli.eval_cmd import build_calibrate_parser, build_eval_parser
from itae_export.cli.export_cmd import export_parser
from itae_export.cli.patch_cmd import inspect_main, inspect_parser, patch_parser
from itae_export.cli.triton_args import triton_parser
from itae_export.cli.validate_cmd import validate_parser

PARSERS = {"itae-export": export_parser, "itae-patch": patch_parser, "itae-inspect": inspect_parser,
           "itae-triton": triton_parser, "itae-eval": build_eval_parser, "itae-calibrate": build_calibrate_parser,
           "itae-validate": validate_parser}


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_option_has_help(prog):
    parser = PARSERS[prog]()
    missing = [a.dest for a in parser._actions  # noqa: SLF001 - walking the parser is the point
               if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not missing, f"{prog}: options without help: {missing}"
    text = parser.format_help()
    assert "docs/method.md" in text or prog in ("itae-triton", "itae-validate"), "the ITAE flags point at the method page"
    assert "../shared" not in text


def test_defaults_are_shown():
    text = export_parser().format_help()
    assert "(default: dynamo)" in " ".join(text.split()) and "(default: 224)" in text
    groups = [g.title for g in export_parser()._action_groups]  # noqa: SLF001
    for title in ("model and output", "export and validation", "TensorRT engine (--out *.engine)", "Triton deployment"):
        assert title in groups


def test_inspect_says_already_patched_first_and_names_the_block(exported, tmp_path, capsys):
    from itae_export.cli import patch_main

    src = exported("plain", "dynamo")
    assert patch_main([str(src), "--out", str(tmp_path / "p.onnx"), "--check", "no"]) == 0
    capsys.readouterr()
    assert inspect_main([str(tmp_path / "p.onnx")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "already patched" in lines[0]
    assert "attention block 1 (0-based from the input, of 2)" in lines[0]  # the tiny models have 2 blocks
    assert not any("rejected candidate" in ln for ln in lines)
