"""docs/migration.md: its shell examples parse with `rosa convert-reference`'s options, its Python names exist."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

from rosa_peft.cli import build_parser

DOC = Path(__file__).resolve().parents[2] / "docs" / "migration.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def test_shell_examples_parse():
    lines = [ln for block in _blocks("bash") for ln in block.splitlines() if ln.startswith("rosa ")]
    assert len(lines) >= 2
    parser = build_parser(load="convert-reference")
    directions = set()
    for line in lines:
        args = parser.parse_args(shlex.split(line)[1:])
        assert args.command == "convert-reference"
        directions.add(args.to)
    assert directions == {"rosa", "reference"}


def test_python_examples_import_what_they_use():
    for block in _blocks("python"):
        for module, names in re.findall(r"^from (\S+) import (.+)$", block, re.MULTILINE):
            mod = importlib.import_module(module)
            for name in names.split(","):
                assert hasattr(mod, name.strip()), (module, name)
