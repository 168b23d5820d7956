"""The study config (YAML): validated as a whole, then expanded into cells (task x method x seed).

Every check runs before anything is trained or written; each error names the offending key, e.g.
``study.yaml: methods[1].r: expected an integer >= 1, got 'eight'``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from ..tasks import task_names
from ..train.methods import METHODS
from ..train.run import TrainOptions
from ..utils.checks import UserError, is_int, is_real

TOP_KEYS = ("output_dir", "model", "data_dir", "tasks", "methods", "seeds", "train", "eval", "task_overrides",
            "checkpoint_steps")
ENTRY_KEYS = ("method", "r", "density", "budget", "rosa_lora_fraction", "name", "seeds", "train")
EVAL_KEYS = ("limit", "batch_size", "max_new_tokens", "split", "dtype", "merge")
EVAL_DTYPES = ("float32", "bfloat16")  # the dtype the trained cell is loaded in for evaluation (default float32)
# TrainOptions fields that the study itself sets per cell (not settable under `train:`)
STUDY_OWNED = ("model", "task", "data_dir", "method", "r", "density", "budget", "output_dir", "seed", "resume",
               "progress", "extra", "save_steps", "save_total_limit", "rosa_lora_fraction")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainOptions) if f.name not in STUDY_OWNED)
_TYPES = {f.name: str(f.type) for f in dataclasses.fields(TrainOptions)}


class StudyConfigError(UserError):
    """A bad study config; the message names the file and the key (a :class:`UserError`, so a ``ValueError``)."""


@dataclass
class Cell:
    """One (task, method entry, seed) of the grid."""

    name: str
    task: str
    entry: str  # the method entry's name (the cell name without task and seed)
    method: str
    seed: int
    r: Optional[int] = None
    density: Optional[float] = None
    budget: Optional[int] = None
    rosa_lora_fraction: Optional[float] = None
    train: Dict[str, Any] = field(default_factory=dict)
    eval: Dict[str, Any] = field(default_factory=dict)

    def spec(self) -> dict:
        """What defines the cell's result: a finished cell whose stored spec differs is not reused."""
        return dataclasses.asdict(self)

    def train_options(self, study: "StudyConfig", output_dir: str, progress: bool = False,
                      resume: bool = False) -> TrainOptions:
        """The cell's ``TrainOptions``: config ``train:`` + task overrides + the cell's method and seed, with
        the study's ``checkpoint_steps`` as ``save_steps``; ``resume`` continues from the last checkpoint."""
        values = dict(self.train)
        values.update(model=study.model, task=self.task, data_dir=study.data_dir, method=self.method, r=self.r,
                      density=self.density, budget=self.budget, seed=self.seed, output_dir=output_dir,
                      progress=progress, save_steps=study.checkpoint_steps, save_total_limit=1, resume=resume)
        if self.rosa_lora_fraction is not None:
            values["rosa_lora_fraction"] = self.rosa_lora_fraction
        return TrainOptions(**values)


@dataclass
class StudyConfig:
    path: str
    output_dir: str
    model: Optional[str]
    data_dir: Optional[str]
    tasks: List[str]
    entries: List[dict]
    seeds: List[int]
    cells: List[Cell]
    # checkpoint every N optimizer steps; an interrupted cell then resumes from its last checkpoint (0: never,
    # an interrupted cell is redone). Not part of a cell's spec: resuming reproduces the uninterrupted run.
    checkpoint_steps: int = 0


_is_int, _is_num = is_int, is_real


def _check_train_value(where: str, key: str, value) -> None:
    t = _TYPES[key].replace("typing.", "")
    optional = t.startswith("Optional[")
    base = t[len("Optional["):-1] if optional else t
    if value is None:
        if optional:
            return
        raise StudyConfigError(f"{where}.{key}: must not be null")
    ok = {"int": _is_int, "float": _is_num, "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}.get(base, lambda v: True)(value)
    if not ok:
        raise StudyConfigError(f"{where}.{key}: expected {'an integer' if base == 'int' else 'a ' + base}, "
                               f"got {value!r}")
    if key in ("batch_size", "grad_accum", "max_seq_len", "limit") and value < 1:
        raise StudyConfigError(f"{where}.{key}: must be >= 1, got {value!r}")


def _check_mapping(where: str, value, allowed) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = [str(k) for k in value if k not in allowed]
    if unknown:
        raise StudyConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(allowed)}")
    return dict(value)


def _check_train(where: str, value) -> dict:
    train = _check_mapping(where, value, TRAIN_KEYS)
    for key, v in train.items():
        _check_train_value(where, key, v)
    return train


def _check_eval(where: str, value) -> dict:
    ev = _check_mapping(where, value, EVAL_KEYS)
    for key, v in ev.items():
        if key == "split":
            if v is not None and not isinstance(v, str):
                raise StudyConfigError(f"{where}.split: expected a string, got {v!r}")
        elif key == "dtype":
            if v not in EVAL_DTYPES:
                raise StudyConfigError(f"{where}.dtype: expected one of {', '.join(EVAL_DTYPES)}, got {v!r}")
        elif key == "merge":
            if not isinstance(v, bool):
                raise StudyConfigError(f"{where}.merge: expected true or false, got {v!r}")
        elif v is not None and (not _is_int(v) or v < 1):
            raise StudyConfigError(f"{where}.{key}: expected an integer >= 1, got {v!r}")
    return ev


def _fmt(x) -> str:
    return f"{x:g}"


def _check_entry(i: int, raw) -> dict:
    where = f"methods[{i}]"
    if isinstance(raw, str):
        raw = {"method": raw}
    entry = _check_mapping(where, raw, ENTRY_KEYS)
    method = METHODS.get(entry.get("method")) if isinstance(entry.get("method"), str) else None
    if method is None:
        raise StudyConfigError(f"{where}.method: unknown method {entry.get('method')!r}; "
                               f"choose one of {', '.join(METHODS)}")
    r, d, b = entry.get("r"), entry.get("density"), entry.get("budget")
    if r is not None and (not _is_int(r) or r < 1):
        raise StudyConfigError(f"{where}.r: expected an integer >= 1, got {r!r}")
    if d is not None and (not _is_num(d) or not 0 < d < 1):
        raise StudyConfigError(f"{where}.density: expected a number in (0, 1), got {d!r}")
    if b is not None and (not _is_int(b) or b < 1):
        raise StudyConfigError(f"{where}.budget: expected an integer >= 1, got {b!r}")
    frac = entry.get("rosa_lora_fraction")
    if frac is not None and (not _is_num(frac) or not 0 < frac < 1):
        raise StudyConfigError(f"{where}.rosa_lora_fraction: expected a number in (0, 1), got {frac!r}")
    if b is not None and (r is not None or d is not None):
        raise StudyConfigError(f"{where}: give either budget or r/density, not both")
    if not method.wraps_adapter and (r is not None or d is not None or b is not None):
        raise StudyConfigError(f"{where}: method {method.name} takes no r, density or budget")
    if not method.sparse and d is not None:
        raise StudyConfigError(f"{where}.density: method {method.name} has no sparse part")
    if not method.low_rank and r is not None:
        raise StudyConfigError(f"{where}.r: method {method.name} has no low-rank part")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name or "/" in name or name.startswith(".")):
        raise StudyConfigError(f"{where}.name: expected a plain directory-name string, got {name!r}")
    if name is None:
        if b is None:
            # the defaults training would pick, made explicit so the directory names the cell fully
            r, d = method.resolve(r, d)
            entry["r"], entry["density"] = (r if method.low_rank else None), (d if method.sparse else None)
        name = method.cell_name(r, d, b)
        if frac is not None:
            name += f"-f{_fmt(frac)}"
    entry["name"] = name
    if "seeds" in entry:
        entry["seeds"] = _check_seeds(f"{where}.seeds", entry["seeds"])
    entry["train"] = _check_train(f"{where}.train", entry.get("train"))
    return entry


def _check_seeds(where: str, seeds) -> List[int]:
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        raise StudyConfigError(f"{where}: expected a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyConfigError(f"{where}: a seed is listed twice")
    return list(seeds)


def load_config(path: str, output_dir: Optional[str] = None) -> StudyConfig:
    """Read, validate and expand ``path``; ``output_dir`` overrides the config's."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"study config {path!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise StudyConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        cfg = _check_mapping("config", raw, TOP_KEYS)
        return _expand(path, cfg, output_dir, tuple(task_names(evaluable=True, needs_path=False)))
    except StudyConfigError as exc:
        raise StudyConfigError(f"{path}: {exc}") from None


def _expand(path: str, cfg: dict, output_dir: Optional[str], protocol_tasks) -> StudyConfig:
    for key in ("output_dir", "model", "data_dir"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise StudyConfigError(f"{key}: expected a string, got {cfg[key]!r}")
    tasks = cfg.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise StudyConfigError("tasks: expected a non-empty list of task names")
    for i, t in enumerate(tasks):
        if t not in protocol_tasks:
            raise StudyConfigError(f"tasks[{i}]: unknown task {t!r}; choose from {', '.join(protocol_tasks)}")
    if len(set(tasks)) != len(tasks):
        raise StudyConfigError("tasks: a task is listed twice")
    methods = cfg.get("methods")
    if not isinstance(methods, list) or not methods:
        raise StudyConfigError("methods: expected a non-empty list of method entries")
    entries = [_check_entry(i, m) for i, m in enumerate(methods)]
    names = [e["name"] for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyConfigError(f"methods: entries {', '.join(dup)} would share a directory (give them a name:)")
    seeds = _check_seeds("seeds", cfg.get("seeds", [0]))
    checkpoint_steps = cfg.get("checkpoint_steps", 0)
    if not _is_int(checkpoint_steps) or checkpoint_steps < 0:
        raise StudyConfigError(f"checkpoint_steps: expected an integer >= 0, got {checkpoint_steps!r}")
    train = _check_train("train", cfg.get("train"))
    ev = _check_eval("eval", cfg.get("eval"))
    overrides = _check_mapping("task_overrides", cfg.get("task_overrides"), tasks)
    per_task = {}
    for task, ov in overrides.items():
        ov = _check_mapping(f"task_overrides.{task}", ov, ("train", "eval"))
        per_task[task] = (_check_train(f"task_overrides.{task}.train", ov.get("train")),
                          _check_eval(f"task_overrides.{task}.eval", ov.get("eval")))
    cells = []
    for task in tasks:
        t_train, t_eval = per_task.get(task, ({}, {}))
        for entry in entries:
            for seed in entry.get("seeds", seeds):
                cells.append(Cell(name=f"{task}-{entry['name']}-s{seed}", task=task, entry=entry["name"],
                                  method=entry["method"],
                                  seed=seed, r=entry.get("r"), density=entry.get("density"),
                                  budget=entry.get("budget"), rosa_lora_fraction=entry.get("rosa_lora_fraction"),
                                  train={**train, **t_train, **entry["train"]}, eval={**ev, **t_eval}))
    out = output_dir or cfg.get("output_dir") or "results"
    return StudyConfig(path=path, output_dir=os.path.abspath(os.path.expanduser(out)), model=cfg.get("model"),
                       data_dir=cfg.get("data_dir"), tasks=list(tasks), entries=entries, seeds=list(seeds),
                       cells=cells, checkpoint_steps=checkpoint_steps)
