"""Training throughput of ``rosa train`` on the CPU: seconds per training example and the mask-scoring cost.

:func:`run_train_speed` builds RoSA models of the same base under several settings ("variants") in one
process and times, interleaved round by round on the same micro-batches of the task:

* ``warmup_step``: forward + backward of one micro-batch in the LoRA-only warm-up phase;
* ``score``: :func:`rosa_peft.masks.compute_masks` (fisher) per micro-batch: its forward + backward with
  the weight gradients folded into the Fisher accumulators;
* ``select``: the top-k selection from the accumulated scores, once per ``compute_masks`` call (a fixed
  cost of a run, not of a micro-batch: dividing it by this bench's 2 to 16 micro-batches would make
  the per-micro-batch ratio depend on how many examples the bench happens to use);
* ``train_step``: forward + backward of one micro-batch in the main phase (LoRA + sparse, masks set).

Variants: ``before`` (float32 base, batch 1, the code as issue #14 found it, emulated in this process:
scoring with the parameters' gradients computed, torch's ``bernoulli_`` dropout masks, the loss from the
full-vocabulary logits), ``after`` (float32, batch 1, the current code: frozen scoring, the CPU dropout
mask of :func:`rosa_peft.function.dropout_keep_mask`, the output head only at labelled positions, as
``RosaTrainer`` computes it), ``bf16`` (``--dtype bfloat16`` base, float32 adapters, batch 1) and
``bf16-b8`` (bf16, micro-batches of 8 examples of similar length with dynamic padding, as
``rosa train --batch-size 8`` groups them), ``paper-b8`` (also bf16 adapters, as ``--recipe paper``
trains them: the study grids' setting) and ``paper-b8-eager`` (that with ``--attn-implementation eager``
instead of transformers' default SDPA, whose CPU backward is slow at these shapes). The baseline
``peft-lora-b8-eager`` is HF PEFT's LoRA at the same rank, dropout and targets on that same base (adapters
in the base's bf16: ``autocast_adapter_dtype=False``), trained through PEFT's own forward (the loss from
the full-vocabulary logits); it has no warm-up, scoring or selection, so those columns are empty and
its ``rosa_run_min`` is its epoch. Each round times one pass over all of a variant's micro-batches (they
differ in length), so a round's value is the mean cost of the bench's examples; the per-variant value is
the minimum (``stat="min"``, robust to other processes' bursts) or the median of the rounds' values.
Timings of a shared machine are noisy: compare the ratios of one report. The projection of one ``rosa train`` run
is warm-up micro-batches + scoring micro-batches + one selection + one epoch of main-phase micro-batches.
The optimizer step (once per ``grad_accum`` micro-batches) and the data loader are not included.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from .. import function
from .. import model as model_module
from ..config import RosaConfig
from ..masks import compute as masks
from ..masks import compute_masks
from ..masks import select
from ..model import get_rosa_model
from ..tasks import Collator, build_dataset, get_task
from ..utils.checks import UserError
from ..utils.model_loading import load_model
from .methods import have

_NEEDS_PEFT = "needs the 'peft' package (pip install rosa-peft[bench])"

VARIANTS = {
    "before": {"dtype": "float32", "adapter_dtype": "float32", "attn": "sdpa", "batch_size": 1, "code": "before"},
    "after": {"dtype": "float32", "adapter_dtype": "float32", "attn": "sdpa", "batch_size": 1, "code": "current"},
    "bf16": {"dtype": "bfloat16", "adapter_dtype": "float32", "attn": "sdpa", "batch_size": 1, "code": "current"},
    "bf16-b8": {"dtype": "bfloat16", "adapter_dtype": "float32", "attn": "sdpa", "batch_size": 8, "code": "current"},
    # --recipe paper --batch-size 8 (the study grids' setting), then with --attn-implementation eager
    "paper-b8": {"dtype": "bfloat16", "adapter_dtype": "bfloat16", "attn": "sdpa", "batch_size": 8, "code": "current"},
    "paper-b8-eager": {"dtype": "bfloat16", "adapter_dtype": "bfloat16", "attn": "eager", "batch_size": 8,
                       "code": "current"},
    # the baseline of the same run: PEFT LoRA at the same rank, no sparse part, as a PEFT user trains it
    "peft-lora-b8-eager": {"dtype": "bfloat16", "adapter_dtype": "bfloat16", "attn": "eager", "batch_size": 8,
                           "code": "peft"},
}


def _bernoulli_keep_mask(x: torch.Tensor, p: float):
    """The dropout mask as the fused Function drew it before: torch's CPU ``bernoulli_`` per element."""
    return torch.empty_like(x, dtype=torch.uint8).bernoulli_(1.0 - p), 1.0 / (1.0 - p)


@contextlib.contextmanager
def _code(version: str):
    """``before``: the dropout mask and the loss as issue #14 found them (``bernoulli_``; every position
    projected onto the vocabulary), plus the unfrozen scoring of :func:`_scoring_like`."""
    if version in ("current", "peft"):
        yield
        return
    saved = function.dropout_keep_mask, model_module.labelled_loss
    function.dropout_keep_mask = _bernoulli_keep_mask
    model_module.labelled_loss = lambda model, inputs, **kw: None  # loss_only falls back to the full forward
    try:
        with _scoring_like(freeze=False):
            yield
    finally:
        function.dropout_keep_mask, model_module.labelled_loss = saved


@contextlib.contextmanager
def _scoring_like(freeze: bool):
    """``freeze=False``: the earlier scoring, which left every parameter's requires_grad as it was."""

    if freeze:
        yield
        return
    original = masks._scoring_state

    @contextlib.contextmanager
    def unfrozen(model, adapter):
        flags = [(p, p.requires_grad) for p in model.parameters()]
        with original(model, adapter):
            for p, f in flags:
                p.requires_grad_(f)
            yield

    masks._scoring_state = unfrozen
    try:
        yield
    finally:
        masks._scoring_state = original


@contextlib.contextmanager
def _timed_selection(seconds: List[float]):
    """Adds the wall time spent in ``Selector.add`` / ``Selector.result`` (the selection part of
    ``compute_masks``) to ``seconds[0]`` while the block runs."""
    originals = {name: getattr(select.Selector, name) for name in ("add", "result")}

    def timed(fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[0] += time.perf_counter() - t
        return wrapper

    for name, fn in originals.items():
        setattr(select.Selector, name, timed(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(select.Selector, name, fn)


def _step(model, batch, peft: bool = False) -> float:
    """One timed forward + backward: a RosaModel's loss at labelled positions only (as
    RosaTrainer.compute_loss), or with ``peft`` a PEFT model's own forward (as transformers' Trainer)."""
    model.train()
    t = time.perf_counter()
    loss = model(**batch).loss if peft else model(**batch, loss_only=True).loss
    loss.backward()
    elapsed = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return elapsed


def run_train_speed(model_name: Optional[str] = None, task: str = "viggo", data_dir: Optional[str] = None,
                    n_examples: int = 16, threads: int = 2, rounds: int = 2, max_seq_len: int = 512,
                    variants: Optional[Sequence[str]] = None, r: int = 16, density: float = 0.006,
                    epoch_examples: int = 5103, warmup_steps: int = 64, grad_accum: int = 32,
                    seed: int = 0, progress: bool = False, stat: str = "min") -> Dict:
    """Seconds per training example (at each variant's micro-batch size) per variant, the
    scoring / step ratios and the projected time of one epoch; returns a JSON-ready dict with ``rows``.
    ``variants=None``: all of :data:`VARIANTS`, without the PEFT row when peft is not installed (then
    ``skipped`` says so); naming the PEFT row without peft raises."""

    if stat not in ("min", "median"):
        raise ValueError(f"stat must be 'min' or 'median', got {stat!r}")
    variants, skipped = _resolve_variants(variants)
    if n_examples < 1 or rounds < 1 or threads < 1:
        raise ValueError("n_examples, rounds and threads must be >= 1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        examples = get_task(task, data_dir=data_dir).load(limit=n_examples)
        built = {}
        for name in variants:
            spec = VARIANTS[name]
            models = []
            for _ in range(1 if spec["code"] == "peft" else 2):  # RoSA: one stays in the warm-up state, one gets masks
                torch.manual_seed(seed)
                base, tok = load_model(model_name, dtype=spec["dtype"], attn_implementation=spec["attn"])
                if spec["code"] == "peft":
                    models += [_peft_lora(base, r, spec["adapter_dtype"])] * 2
                    continue
                cfg = RosaConfig(r=r, density=density, lora_alpha=16.0, lora_dropout=0.05,
                                 target_modules="all-linear", adapter_dtype=spec["adapter_dtype"])
                models.append(get_rosa_model(base, cfg))
            ds = build_dataset(examples, tok, max_seq_len=max_seq_len)
            collate = Collator(tok)
            size = VARIANTS[name]["batch_size"]
            feats = sorted(ds.features, key=lambda f: len(f["input_ids"])) if size > 1 else list(ds.features)
            batches = [collate(feats[i:i + size]) for i in range(0, len(feats), size)]
            tokens = sum(len(f["input_ids"]) for f in feats)
            padded = sum(int(b["input_ids"].numel()) for b in batches)
            built[name] = {"warm": models[0], "train": models[1], "batches": batches,
                           "meta": {"examples": len(feats), "batches": len(batches),
                                    "mean_tokens": round(tokens / len(feats), 1), "padding": round(padded / tokens - 1, 3)}}
        times: Dict[str, Dict[str, List[float]]] = {n: {"warmup_step": [], "score": [], "select": [],
                                                        "train_step": []} for n in variants}
        for rnd in range(rounds):
            for name in variants:
                b = built[name]
                peft = VARIANTS[name]["code"] == "peft"
                with _code(VARIANTS[name]["code"]):
                    if rnd == 0:
                        _step(b["warm"], b["batches"][0], peft)  # first-call allocations / kernel selection
                    if not peft:  # PEFT LoRA: no warm-up phase, scoring or masks
                        _time_rosa_phases(b, times[name], seed, rnd == 0, progress)
                    times[name]["train_step"].append(sum(_step(b["train"], batch, peft) for batch in b["batches"]))
        rows = [_row(name, times[name], built[name]["meta"], threads=threads, task=task, stat=stat,
                     epoch_examples=epoch_examples, warmup_steps=warmup_steps, grad_accum=grad_accum)
                for name in variants]
        _add_ratios(rows)
        return {"bench": "train_speed", "model": model_name or "smollm2-135m", "task": task,
                "epoch_examples": epoch_examples, "warmup_steps": warmup_steps, "grad_accum": grad_accum,
                "rounds": rounds, "stat": stat, "bf16_supported": bool(_cpu_bf16()), "rows": rows, "skipped": skipped,
                "raw": times}
    finally:
        torch.set_num_threads(previous_threads)


def _resolve_variants(variants: Optional[Sequence[str]]) -> tuple[List[str], Dict[str, str]]:
    """``(the variants to run, {left-out variant: why})``: None is every variant that can run here."""
    if variants is None:
        run = [v for v in VARIANTS if VARIANTS[v]["code"] != "peft" or have("peft")]
        return run, {v: _NEEDS_PEFT for v in VARIANTS if v not in run}
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise UserError(f"train bench variants must be a non-empty subset of {', '.join(VARIANTS)}; "
                        f"got {', '.join(map(str, variants)) or 'none'}")
    if any(VARIANTS[v]["code"] == "peft" for v in variants) and not have("peft"):
        raise UserError(f"the PEFT LoRA row {_NEEDS_PEFT}")
    return list(variants), {}


def _row(name: str, times: Dict[str, List[float]], meta: Dict, *, threads: int, task: str, stat: str,
         epoch_examples: int, warmup_steps: int, grad_accum: int) -> Dict:
    """One report row from a variant's per-round times and its data (``meta``: examples, micro-batches per
    pass, mean tokens per example, padding fraction)."""
    per_batch, per_example = _per_round_stats(times, meta["examples"], meta["batches"], stat)
    epoch_s = epoch_examples * per_example["train_step"]
    row = {"variant": name, **VARIANTS[name], "threads": threads, "task": task,
           "examples": meta["examples"], "mean_tokens": meta["mean_tokens"], "padding": meta["padding"],
           "s_per_example_warmup": None, "s_per_example_train": round(per_example["train_step"], 4),
           "score_s_per_microbatch": None, "select_s": None, "score_over_warmup_step": None,
           "score_over_train_step": None, "epoch_train_min": round(epoch_s / 60, 1),
           "rosa_run_min": round(epoch_s / 60, 1)}
    if "score" in per_batch:
        # grad_accum: examples per optimizer step (rosa train's default: batch 1 x 32 micro-batches);
        # mask_grad_steps=1 scores one optimizer step's examples
        run_s = (warmup_steps * grad_accum * per_example["warmup_step"] + grad_accum * per_example["score"]
                 + per_batch["select"] + epoch_s)
        row.update({"s_per_example_warmup": round(per_example["warmup_step"], 4),
                    "score_s_per_microbatch": round(per_batch["score"], 4),
                    "select_s": round(per_batch["select"], 3),
                    "score_over_warmup_step": round(per_batch["score"] / per_batch["warmup_step"], 3),
                    "score_over_train_step": round(per_batch["score"] / per_batch["train_step"], 3),
                    "rosa_run_min": round(run_s / 60, 1)})
    return row


def _add_ratios(rows: List[Dict]) -> None:
    """Each row's speed-up over the first row and, when the PEFT LoRA row ran, its time over PEFT LoRA's."""
    base = rows[0]
    peft = next((row for row in rows if row["code"] == "peft"), None)
    for row in rows:
        row["speedup_vs_" + base["variant"]] = round(base["s_per_example_train"] / row["s_per_example_train"], 3)
        if peft is not None:  # the kind of ratio: a training example against PEFT LoRA's, same run
            row["train_over_peft_lora"] = round(row["s_per_example_train"] / peft["s_per_example_train"], 3)


def _per_round_stats(times: Dict[str, List[float]], examples: int, batches: int,
                     stat: str) -> tuple[Dict[str, float], Dict[str, float]]:
    """``times``: per phase, one value per round (the seconds of one pass over all ``batches`` micro-batches;
    for ``select`` one selection). Returns (per micro-batch, per example) seconds of each phase: the rounds'
    minimum or median, divided by the micro-batches or examples of a pass (``select``: per call, in both)."""
    pick = min if stat == "min" else statistics.median
    per_batch, per_example = {}, {}
    for k, v in times.items():
        if not v:
            continue
        value = pick(v)
        per_batch[k] = value if k == "select" else value / batches
        per_example[k] = value if k == "select" else value / examples
    return per_batch, per_example


def _time_rosa_phases(b: Dict, times: Dict[str, List[float]], seed: int, first: bool, progress: bool) -> None:
    """One round of a RoSA variant before its main-phase steps: the warm-up steps, the scoring of every
    micro-batch and the selection (timed apart), each one value for the whole pass; on the first round the
    masks go to the main-phase model."""
    times["warmup_step"].append(sum(_step(b["warm"], batch) for batch in b["batches"]))
    selecting = [0.0]
    t = time.perf_counter()
    with _timed_selection(selecting):
        masks = compute_masks(b["warm"], b["batches"], criterion="fisher", seed=seed, progress=progress)
    total = time.perf_counter() - t
    times["score"].append(total - selecting[0])
    times["select"].append(selecting[0])
    if first:
        b["train"].set_masks(masks)
        _step(b["train"], b["batches"][0])


def _peft_lora(base, r: int, adapter_dtype: str):
    from . import peft_baselines  # peft is optional: imported only for the PEFT row

    keep = str(base.dtype).replace("torch.", "") == adapter_dtype
    return peft_baselines.train_lora(base, r=r, lora_alpha=16.0, lora_dropout=0.05, keep_base_dtype=keep)


def _cpu_bf16() -> bool:
    with contextlib.suppress(Exception):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


if __name__ == "__main__":  # python -m rosa_peft.bench.train_speed [data_dir]
    import json
    import sys

    print(json.dumps({k: v for k, v in run_train_speed(data_dir=(sys.argv[1] if len(sys.argv) > 1 else None)).items()
                      if k != "raw"}, indent=1))
