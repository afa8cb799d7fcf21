"""``python examples/X.py --help`` shows every option's default, so a newcomer sees what a bare run does
without reading the source. The options and defaults are read from each script's ``add_argument`` calls,
so a new option without a help string (argparse's defaults formatter then prints no default) fails here.
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def declared_options(script: Path) -> dict[str, object]:
    """``{"--steps": 500, ...}``: each ``add_argument("--name", ..., default=...)`` of the script."""
    options = {}
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            default = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "default"), None)
            options[ast.literal_eval(node.args[0])] = default
    return options


def help_entries(text: str) -> dict[str, str]:
    """``{"--steps": "--steps STEPS optimiser steps (default: 500)", ...}`` from argparse's options section,
    whitespace collapsed (argparse wraps long help over lines indented deeper than the option)."""
    section = re.split(r"\n(?:options|optional arguments):\n", text)[1]
    entries = re.split(r"\n(?=  -)", section)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_help_shows_every_default(script):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    options = declared_options(script)
    assert options, f"{script.name} declares no options"  # the AST walk found the parser
    entries = help_entries(proc.stdout)
    for option, default in options.items():
        assert option in entries, f"{script.name} --help does not list {option}:\n{proc.stdout}"
        assert f"(default: {default})" in entries[option], f"{script.name} --help: {entries[option]!r}"
