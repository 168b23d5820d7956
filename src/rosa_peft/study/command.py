"""``rosa study CONFIG.yaml``: train and evaluate a grid (tasks x methods x budgets x seeds), resumably.

    rosa study configs/study-viggo.yaml [--output-dir DIR] [--dry-run] [--cells PATTERN...] [--in-process]

Finished cells (``cell.json`` present) are skipped; the table is always rebuilt from the cell records.
See docs/study.md.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..options import find_config, packaged_configs
from .config import load_config
from .runner import cell_status, resume_point, run_study


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study YAML (tasks, methods, seeds, train, eval; see docs/study.md); a name not "
                                  "found here is looked up among the packaged recipes: "
                                  + ", ".join(n for n in packaged_configs() if n.startswith("study")))
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where the cells and tables go (default: the config's output_dir)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and which are finished; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cells", nargs="+", metavar="PATTERN", default=None,
                   help="run only the cells whose names match these shell patterns (e.g. 'viggo-lora-*'), so "
                        "disjoint parts of one grid can run side by side; the table is written once all are done "
                        "(default: every cell)")
    p.add_argument("--in-process", action="store_true",
                   help="run the cells in this process instead of one fresh process per cell "
                        "(peak RSS then accumulates across cells)")


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    study = load_config(find_config(args.config), output_dir=args.output_dir)
    if args.dry_run:
        status = cell_status(study)
        width = max(len(c.name) for c in study.cells)
        for cell in study.cells:
            point = resume_point(study, cell) if status[cell.name] == "partial" else None
            print(f"{cell.name.ljust(width)}  {status[cell.name]}" + (f" (continues from {point})" if point else ""))
        n_done = sum(s == "done" for s in status.values())
        print(f"{len(study.cells)} cells: {n_done} finished, {len(study.cells) - n_done} to run "
              f"(output_dir {study.output_dir})")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    records = run_study(study, progress=not args.no_progress, echo=_err, isolate=not args.in_process,
                        only=args.cells)
    if records is not None:
        _err(f"wrote {study.output_dir}/results.md, results.json and figures")
    return 0
