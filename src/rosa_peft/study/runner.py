"""Run the cells of a study (skipping finished ones) and write the results table.

A cell directory ``OUTPUT_DIR/cells/NAME`` holds what ``rosa train`` writes, the ``rosa eval`` report
``eval-TASK-SPLIT.json`` and, written atomically last, ``cell.json``. A cell is finished exactly when
``cell.json`` exists; a directory without it is a leftover of an interrupted cell. It is redone, unless
the config sets ``checkpoint_steps``: then the cell's spec is kept beside it in ``cells/NAME.partial.json``
while it runs, and an interrupted cell with the same spec and a checkpoint (or finished training) continues
from there (``rosa train --resume``).
"""
from __future__ import annotations

import fnmatch
import gc
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..eval.loading import load_for_eval
from ..eval.runner import evaluate, load_examples, write_report
from ..masks import load_masks
from ..train import run as train_run  # train_run.run_training, so that tests can stand in for it
from ..train.methods import METHODS
from ..train.trainer import MASKS_FILE
from ..utils.checks import UserError
from ..utils.io import atomic_write_text, read_json_object
from . import figures
from .config import Cell, StudyConfig, StudyConfigError
from .structure import mask_structure
from .paired import load_vectors, paired_differences
from .table import render_json, render_markdown

log = logging.getLogger("rosa_peft.study")

CELL_FORMAT = "rosa-study-cell/1"
CELL_FILE = "cell.json"
PARTIAL_SUFFIX = ".partial.json"  # cells/NAME.partial.json: the spec of a cell in progress (with checkpoint_steps)
STRUCTURE_FILE = "mask_structure.json"
TRAIN_KEYS = ("r", "density", "trainable_params", "train_examples", "train_loss", "global_steps", "train_time_s",
              "peak_rss_mb")


def cell_dir(study: StudyConfig, cell: Cell) -> str:
    return os.path.join(study.output_dir, "cells", cell.name)


def read_cell(path: str) -> dict:
    data = read_json_object(path)
    if data.get("format") != CELL_FORMAT:
        raise UserError(f"{path}: not a study cell record (expected 'format': '{CELL_FORMAT}')")
    bad = _non_finite(data)
    if bad is not None:  # the tables would average it silently and results.json would not be JSON
        raise UserError(f"{path}: {bad} is not a finite number")
    return data


def _non_finite(value, where: str = "") -> Optional[str]:
    """The key path of the first NaN / infinite number in a parsed JSON value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the record"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def cell_status(study: StudyConfig) -> Dict[str, str]:
    """``{cell name: "done" | "partial" | "todo"}``; errors if a finished cell was run with other settings."""
    status = {}
    for cell in study.cells:
        d = cell_dir(study, cell)
        path = os.path.join(d, CELL_FILE)
        if os.path.isfile(path):
            stored = read_cell(path).get("spec")
            if stored != _jsonable(cell.spec()):
                raise StudyConfigError(f"{path}: cell {cell.name} was finished with other settings than the config "
                                       f"now gives it; remove {d} to redo it, or use another output_dir")
            status[cell.name] = "done"
        else:
            status[cell.name] = "partial" if os.path.exists(d) else "todo"
    return status


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def check_inputs(study: StudyConfig) -> None:
    """Load every task's train and eval examples once, so missing data fails before any training."""
    seen = set()
    for cell in study.cells:
        if cell.task in seen:
            continue
        seen.add(cell.task)
        train_run.validate(cell.train_options(study, "unused"))
        load_examples(cell.task, cell.eval.get("split"), cell.eval.get("limit"), study.data_dir)


def _load_trained(study: StudyConfig, cell: Cell, directory: str):
    """(model, tokenizer, info) of the trained cell, as ``rosa eval`` would load it: in the config's
    ``eval.dtype`` (default float32), the adapter merged when ``eval.merge`` (default: unmerged, as the
    first grids' cells were scored)."""
    dtype = cell.eval.get("dtype", "float32")
    if METHODS[cell.method].wraps_adapter:
        return load_for_eval(study.model, adapter=directory, dtype=dtype, merge=cell.eval.get("merge", False))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(directory, "tokenizer"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer, {"model": directory, "adapter": None, "merged": False, "dtype": dtype}


def _partial_path(study: StudyConfig, cell: Cell) -> str:
    return cell_dir(study, cell) + PARTIAL_SUFFIX


def resume_point(study: StudyConfig, cell: Cell) -> Optional[str]:
    """What an unfinished cell continues from: its last checkpoint (for RoSA, else what its warm-up left:
    see :func:`rosa_peft.train.run.resume_point`), or ``run_config.json`` when only its
    evaluation is missing. None (the cell starts over) without ``checkpoint_steps``, without a stored
    spec equal to the cell's, or with nothing to continue from."""
    directory = cell_dir(study, cell)
    partial = _partial_path(study, cell)
    if study.checkpoint_steps <= 0 or not os.path.isdir(directory) or not os.path.isfile(partial):
        return None
    try:
        if read_json_object(partial) != _jsonable(cell.spec()):
            return None
    except (OSError, ValueError):
        return None
    if os.path.isfile(os.path.join(directory, train_run.RUN_CONFIG)):
        return train_run.RUN_CONFIG
    point = train_run.resume_point(directory)
    return os.path.relpath(point, directory) if point else None


def run_cell(study: StudyConfig, cell: Cell, progress: bool = False) -> dict:
    """Train and evaluate one cell into its directory; returns the ``cell.json`` record.

    Without ``checkpoint_steps`` an unfinished directory is removed first and a failed cell removes its
    directory. With it, the cell resumes where :func:`resume_point` says, and a failed or interrupted
    cell keeps its directory for the next run to continue."""
    directory = cell_dir(study, cell)
    keep = study.checkpoint_steps > 0
    point = resume_point(study, cell)
    if point is not None:
        print(f"study: cell {cell.name} continues from {point}", flush=True)
    else:
        if os.path.exists(directory):
            log.info("study: removing unfinished cell %s", directory)
            shutil.rmtree(directory)
        if keep:
            os.makedirs(os.path.dirname(directory), exist_ok=True)
            atomic_write_text(_partial_path(study, cell), json.dumps(_jsonable(cell.spec())) + "\n")
    try:
        opts = cell.train_options(study, directory, progress=progress, resume=point is not None)
        summary = train_run.run_training(opts)
        gc.collect()
        model, tokenizer, info = _load_trained(study, cell, directory)
        ev = cell.eval
        report = evaluate(model, tokenizer, cell.task, split=ev.get("split"), limit=ev.get("limit"),
                          data_dir=study.data_dir, batch_size=ev.get("batch_size", 8), progress=progress,
                          model_info=info, max_new_tokens=ev.get("max_new_tokens"))
        del model
        gc.collect()
        report_name = f"eval-{report['task']}-{report['split']}.json"
        write_report(report, os.path.join(directory, report_name))
        masks_summary = _write_mask_structure(directory)
        record = {
            "format": CELL_FORMAT, "cell": cell.name, "task": cell.task, "entry": cell.entry, "method": cell.method,
            "seed": cell.seed, "budget": cell.budget, "spec": _jsonable(cell.spec()),
            "train": {k: summary.get(k) for k in TRAIN_KEYS},
            "eval": {"report": report_name, "split": report["split"], "protocol": report["protocol"].get("name"),
                     "summary": report["summary"], "time_s": report["time_s"]},
        }
        if masks_summary is not None:
            record["masks"] = masks_summary
        atomic_write_text(os.path.join(directory, CELL_FILE), json.dumps(_jsonable(record), indent=2) + "\n")
        if keep:  # finished: the checkpoint (for fft a full model and its AdamW state) is of no further use
            shutil.rmtree(os.path.join(directory, train_run.CHECKPOINTS_DIR), ignore_errors=True)
            os.remove(_partial_path(study, cell))
        return record
    except BaseException:
        if not keep:  # an unfinished cell leaves nothing to mistake for a result (it has no cell.json either way)
            shutil.rmtree(directory, ignore_errors=True)
        raise


def _write_mask_structure(directory: str) -> Optional[dict]:
    """``mask_structure.json`` from the cell's ``masks.safetensors`` (rosa/spa); its summary, or None."""

    path = os.path.join(directory, MASKS_FILE)
    if not os.path.isfile(path):
        return None
    structure = mask_structure(load_masks(path))
    atomic_write_text(os.path.join(directory, STRUCTURE_FILE), json.dumps(structure) + "\n")
    return {"file": STRUCTURE_FILE, "overall": structure["overall"]}


def run_cell_isolated(study: StudyConfig, cell: Cell) -> None:
    """Run one cell in a fresh Python process, so its peak RSS is its own and memory is returned after it."""
    cmd = [sys.executable, "-m", "rosa_peft.study.cell", study.path, cell.name, "--output-dir", study.output_dir]
    rc = subprocess.call(cmd)
    if rc != 0 or not os.path.isfile(os.path.join(cell_dir(study, cell), CELL_FILE)):
        if study.checkpoint_steps <= 0:
            shutil.rmtree(cell_dir(study, cell), ignore_errors=True)
        raise RuntimeError(f"study: cell {cell.name} failed (exit status {rc}); its output is above")


def run_study(study: StudyConfig, progress: bool = True, echo=print, isolate: bool = True,
              only: Optional[Sequence[str]] = None) -> Optional[List[dict]]:
    """Run every unfinished cell, then write the results table; returns the cell records in grid order.

    ``isolate`` runs each cell in its own process (the default; the CLI's ``--in-process`` turns it off).
    ``only`` (shell patterns over cell names) restricts which cells this call runs, so that disjoint parts of
    one grid can run side by side; the table is written only once every cell of the grid is finished, and
    None is returned while some are not."""
    status = cell_status(study)
    todo = [c for c in study.cells if status[c.name] != "done" and _selected(c.name, only)]
    if only is not None and not any(_selected(c.name, only) for c in study.cells):
        raise StudyConfigError(f"{study.path}: no cell matches {', '.join(only)}")
    if todo:
        check_inputs(study)
    done = len(study.cells) - sum(s != "done" for s in status.values())
    echo(f"study: {len(study.cells)} cells, {done} finished, {len(todo)} to run -> {study.output_dir}")
    bar = tqdm(todo, desc="study cells", unit="cell", disable=not progress or not todo)
    for cell in bar:
        bar.set_postfix_str(cell.name)
        if isolate:
            run_cell_isolated(study, cell)
        else:
            run_cell(study, cell, progress=False)
    bar.close()
    missing = [c.name for c in study.cells if not os.path.isfile(os.path.join(cell_dir(study, c), CELL_FILE))]
    if missing:
        echo(f"study: {len(missing)} cell(s) of the grid are not finished ({', '.join(missing[:4])}"
             f"{', ...' if len(missing) > 4 else ''}); the table is written once all are")
        return None
    return write_results(study)


def _selected(name: str, only: Optional[Sequence[str]]) -> bool:
    return only is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in only)


def write_results(study: StudyConfig) -> List[dict]:
    """``results.json``, ``results.md`` (and ``results.png``) from the cells' ``cell.json`` files only."""
    records = []
    for cell in study.cells:
        path = os.path.join(cell_dir(study, cell), CELL_FILE)
        record = read_cell(path)
        record["cell_json"] = os.path.relpath(path, study.output_dir)
        records.append(record)
    dirs = [cell_dir(study, cell) for cell in study.cells]
    paired = paired_differences(records, load_vectors(records, dirs))
    atomic_write_text(os.path.join(study.output_dir, "results.json"), render_json(records, paired))
    atomic_write_text(os.path.join(study.output_dir, "results.md"), render_markdown(records, paired))
    figures.plot_accuracy(records, os.path.join(study.output_dir, "results.png"))
    figures.plot_losses(records, dirs, os.path.join(study.output_dir, "loss.png"))
    figures.plot_masks(records, dirs, os.path.join(study.output_dir, "masks.png"))
    return records
