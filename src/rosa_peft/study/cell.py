"""``python -m rosa_peft.study.cell CONFIG CELL [--output-dir DIR]``: train and evaluate one study cell.

``rosa study`` runs every cell through this entry point in its own process, so that each cell's peak
RSS (``ru_maxrss``) is its own and nothing one cell allocated stays resident for the next.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .config import load_config
from .runner import run_cell


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rosa_peft.study.cell", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("cell", help="the cell's name, as `rosa study CONFIG --dry-run` lists it")
    p.add_argument("--output-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    study = load_config(args.config, output_dir=args.output_dir)
    cells = {c.name: c for c in study.cells}
    if args.cell not in cells:
        print(f"{args.config}: no cell named {args.cell!r}", file=sys.stderr)
        return 2
    run_cell(study, cells[args.cell], progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
