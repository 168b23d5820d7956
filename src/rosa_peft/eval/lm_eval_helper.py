"""Hand an in-memory model (a RosaModel, merged or not, or any HF causal LM) to lm-evaluation-harness.

lm-eval's ``--model_args peft=...`` loads adapters through ``peft.PeftModel``, which does not know
RoSA adapters. Its ``HFLM`` class also accepts an already built model object, which is what this
module does. One call evaluates and returns lm-eval's results dictionary::

    from rosa_peft.eval.lm_eval_helper import evaluate_harness, format_harness_table

    results = evaluate_harness(rosa_model, tokenizer, ["arc_easy"], batch_size=8, limit=100)
    print(format_harness_table(results))

or, closer to lm-eval's own API::

    lm = to_hflm(rosa_model, tokenizer, batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"])

``rosa eval --harness TASK[,TASK]`` is the command line of :func:`evaluate_harness`. lm-eval is an
optional dependency (``pip install lm-eval``); this is the only module that imports it, and only when
one of its functions is called.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence, Union

from ..utils.checks import UserError
from ..utils.io import atomic_write_text

INSTALL_HINT = "pip install lm-eval"
PathLike = Union[str, "os.PathLike[str]"]


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness is importable (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _import_lm_eval(what: str):
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - the part every caller needs
    except ImportError as exc:
        raise ImportError(f"{what} needs lm-evaluation-harness, which is not installed: {INSTALL_HINT} "
                          f"(import failed: {exc})") from exc
    return lm_eval


def to_hflm(model, tokenizer, **kwargs: Any):
    """An ``lm_eval`` ``HFLM`` wrapping ``model`` in memory (no reload, adapters stay as they are).

    ``kwargs`` go to ``HFLM`` (e.g. ``batch_size=8``, ``max_length=2048``). ``HFLM`` needs the model
    to expose ``.config`` and ``.device``; a RosaModel forwards both to its base model. The model is
    put in eval mode. Accelerate/parallelize options do not apply to an in-memory model.
    """
    _import_lm_eval("to_hflm")
    from lm_eval.models.huggingface import HFLM

    for attr in ("config", "device", "generate"):
        if getattr(model, attr, None) is None:
            raise ValueError(f"to_hflm: the model has no .{attr}; pass a transformers causal LM or a RosaModel")
    if tokenizer is None:
        raise ValueError("to_hflm: a tokenizer is required")
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, **kwargs)


def _include_paths(include_path) -> Optional[list[str]]:
    if include_path is None:
        return None
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    out = []
    for p in paths:
        p = os.path.abspath(os.path.expanduser(os.fspath(p)))
        if not os.path.exists(p):
            raise FileNotFoundError(f"lm-eval task folder {p} does not exist")
        out.append(p)
    return out


def make_task_manager(include_path: Union[PathLike, Sequence[PathLike], None] = None, include_defaults: bool = True):
    """lm-eval's ``TaskManager``: the task YAMLs under ``include_path`` plus (``include_defaults``) its
    built-in tasks. Indexing the built-in ones reads thousands of files (seconds); a folder alone is instant."""
    _import_lm_eval("make_task_manager")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=_include_paths(include_path), include_defaults=include_defaults)


def check_tasks(tasks: Union[str, Sequence[str]], manager) -> list[str]:
    """The task, group and tag names of ``manager`` that ``tasks`` name, glob patterns expanded as
    ``lm-eval run --tasks`` does, in order, each once.

    :class:`UserError` names the names that match nothing, before any model is loaded."""
    patterns = [t.strip() for t in ([tasks] if isinstance(tasks, str) else tasks)]
    if not patterns or not all(patterns):
        raise UserError(f"lm-eval tasks must be non-empty names, got {list(tasks)!r}")
    matches = {t: manager.match_tasks([t]) for t in patterns}
    unknown = [t for t, found in matches.items() if not found]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (not built into lm-eval "
                        f"{_version()} nor under the include path; `lm-eval ls tasks` lists them)")
    return list(dict.fromkeys(name for found in matches.values() for name in found))


def resolve_tasks(tasks: Union[str, Sequence[str]],
                  include_path: Union[PathLike, Sequence[PathLike], None] = None) -> tuple[list[str], Any]:
    """``(names, task_manager)`` for ``tasks``, checked by :func:`check_tasks`. When ``include_path``
    holds every task, lm-eval's built-in tasks are not indexed at all (that saves seconds per call)."""
    if include_path is not None:
        local = make_task_manager(include_path, include_defaults=False)
        try:
            return check_tasks(tasks, local), local
        except UserError:
            pass
    manager = make_task_manager(include_path)
    return check_tasks(tasks, manager), manager


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def evaluate_harness(model, tokenizer, tasks: Union[str, Sequence[str]], *, num_fewshot: Optional[int] = None,
                     limit: Optional[Union[int, float]] = None, batch_size: int = 8,
                     include_path: Union[PathLike, Sequence[PathLike], None] = None, log_samples: bool = False,
                     task_manager=None, hflm_kwargs: Optional[dict] = None, **simple_evaluate_kwargs: Any) -> dict:
    """Evaluate ``model`` (in memory, adapters as they are) on lm-eval ``tasks``; lm-eval's results dict.

    ``tasks``: lm-eval task / group / tag names (a string or a list); ``include_path``: a folder (or
    list) of extra task YAMLs, e.g. a local task; or a ready ``task_manager`` (:func:`resolve_tasks`,
    :func:`make_task_manager`). ``num_fewshot``, ``limit``
    (examples per task), ``log_samples`` (per-example requests and responses under ``"samples"``)
    and any other keyword go to ``lm_eval.simple_evaluate``; ``hflm_kwargs`` to ``HFLM`` (e.g. ``max_length``). The dictionary
    holds ``"results"`` (``{task: {"acc,none": ..., ...}}``), ``"configs"``, ``"versions"``,
    ``"n-shot"`` and ``"n-samples"``, as lm-eval's own ``simple_evaluate`` returns them.
    """
    lm_eval = _import_lm_eval("evaluate_harness")
    if task_manager is None:
        names, task_manager = resolve_tasks(tasks, include_path)
    else:
        names = check_tasks(tasks, task_manager)
    lm = to_hflm(model, tokenizer, batch_size=batch_size, **(hflm_kwargs or {}))
    return lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=task_manager, log_samples=log_samples, **simple_evaluate_kwargs)


def harness_json(results: dict, extra: Optional[dict] = None) -> str:
    """``results`` (plus ``extra`` keys, e.g. what model was loaded) as JSON text; numpy scalars become numbers."""
    _import_lm_eval("harness_json")
    from lm_eval.utils import handle_non_serializable

    data = dict(results)
    data.update(extra or {})
    return json.dumps(data, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"


def write_harness_results(results: dict, path: PathLike, extra: Optional[dict] = None) -> None:
    """Write :func:`harness_json` to ``path`` atomically (a crash leaves the old file or none)."""
    atomic_write_text(os.fspath(path), harness_json(results, extra))


def format_harness_table(results: dict) -> str:
    """lm-eval's markdown table of ``results`` (and of its groups, if any)."""
    _import_lm_eval("format_harness_table")
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
