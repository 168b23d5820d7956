"""compute_masks: score every RoSA layer of an adapter with a registered criterion and select the masks.

Orchestration only: the argument checks, the layers and their densities, the layer groups (one pass
over the batches each), then the criterion's scoring path (:data:`_SCORERS`, keyed by what the
criterion needs), feeding :class:`~rosa_peft.masks.select.Selector` group by group.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from ..utils.checks import UserError, check_int
from ..utils.device import model_device
from .collector import GradientCollector, distributed_world, named_rosa_layers
from .criteria import Criterion, get_criterion
from .select import Selector, check_budget, resolve_densities


# ---- small helpers -------------------------------------------------------------------------------
def _on(t: torch.Tensor, device) -> torch.Tensor:
    return t if device is None else t.to(device)


def _batch_iter(batches):
    return iter(batches()) if callable(batches) else iter(batches)


def _loss_of(model, batch, loss_fn, index: int) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        if not isinstance(batch, Mapping):
            raise TypeError(f"micro-batch {index} is a {type(batch).__name__}: batches must be dicts of model "
                            "inputs (with labels), or pass loss_fn(model, batch)")
        out = model(**batch, loss_only=True)  # a RosaModel: logits only where labels are, the same loss
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError(f"micro-batch {index}: the model output has no loss; the batches need 'labels' "
                             "(or pass loss_fn(model, batch))")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"micro-batch {index}: the loss must be a scalar tensor, got "
                         f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    if not bool(torch.isfinite(loss.detach()).all()):
        raise UserError(f"micro-batch {index}: the loss is not finite ({float(loss)})")
    return loss.reshape(())


@contextlib.contextmanager
def _scoring_state(model, adapter: str):
    """Train mode, the adapter active, every parameter frozen, a forked RNG; afterwards modes, flags, grads
    and adapter as before."""
    params = list(model.parameters())
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in params]
    grads = [(p, p.grad) for p in params]
    previous = model.active_adapter
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        if adapter != previous:
            model.set_adapter(adapter)
        model.train()
        # Scoring needs only dO of each scored layer (reached through the collector's zero-leaf taps), never
        # a parameter gradient: with every parameter frozen, backward skips the LoRA / sparse / bias grads
        # (and the dropout-mask recomputation they need). Forward values and dO are unchanged.
        for p in params:
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            yield
    finally:
        if model.active_adapter != previous:
            model.set_adapter(previous)
        for p, f in flags:
            p.requires_grad_(f)
        for p, g in grads:
            p.grad = g
        for m, t in modes:
            m.training = t


def _score_pass(model, collector, batches, num_batches, loss_fn, seed, bar) -> int:
    torch.manual_seed(seed)  # the same dropout draws on every pass
    device = model_device(model)
    count = 0
    it = _batch_iter(batches)
    while num_batches is None or count < num_batches:
        try:
            batch = next(it)
        except StopIteration:
            break
        loss = _loss_of(model, send_to_device(batch, device), loss_fn, count)
        before = collector.num_batches
        if loss.requires_grad and collector.taps():
            torch.autograd.grad(loss, collector.taps(), allow_unused=True)
            collector.flush()
        if collector.num_batches == before:
            raise UserError(f"micro-batch {count}: the loss does not depend on any scored RoSA layer "
                             f"(e.g. {next(iter(collector.layers))!r})")
        count += 1
        bar.update(1)
    return count


# ---- the plan: what is scored, and how --------------------------------------------------------------
@dataclass
class _Plan:
    """Everything one compute_masks call scores: the layers, the selector and the per-pass layer groups,
    plus the caller's options that the scoring paths read."""

    model: Any
    criterion: Criterion
    adapter: str
    layers: dict
    selector: Selector
    groups: list
    budget: str
    batches: Any
    num_batches: Optional[int]
    loss_fn: Optional[Callable]
    device: Any
    seed: int
    progress: bool
    sync: bool
    process_group: Any


def _adapter_of(model, adapter_name: Optional[str]) -> str:
    if not hasattr(model, "rosa_layers") or not hasattr(model, "peft_config"):
        raise TypeError(f"model must be a RosaModel (from get_rosa_model), got {type(model).__name__}")
    adapter = adapter_name or model.active_adapter
    if adapter not in model.peft_config:
        raise ValueError(f"adapter_name: unknown adapter {adapter!r}; have {sorted(model.peft_config)}")
    return adapter


def _resolve_sync(sync: Optional[bool], process_group) -> bool:
    """DDP: exchange the statistics by default when there are several processes, never with one."""
    if sync is None:
        return distributed_world(process_group) > 1
    if sync and distributed_world(process_group) == 1:
        return False  # one process: nothing to exchange
    return sync


def _layers_of(model, adapter: str) -> dict:
    layers = {n: l for n, l in named_rosa_layers(model) if adapter in l.density}
    if not layers:
        raise ValueError(f"no RoSA layer carries adapter {adapter!r}")
    return layers


def _selector(layers: dict, adapter: str, density, budget: str) -> Selector:
    """The selector for the layers' shapes and densities (each layer's own ``density[adapter]`` by default)."""
    if density is None:
        density = {n: l.density[adapter] for n, l in layers.items()}
    densities = resolve_densities(density, list(layers))
    selector = Selector({n: (l.out_features, l.in_features) for n, l in layers.items()}, densities, budget)
    if not selector.needs_scores or (budget == "global" and selector.total == 0):
        raise UserError("the densities select no weight entry in any layer (set RosaConfig(density=...) or pass density=)")
    return selector


def _groups(names: list, max_layers_per_pass: Optional[int]) -> list:
    step = max_layers_per_pass or len(names)
    return [names[i:i + step] for i in range(0, len(names), step)]


# ---- the scoring paths, by what the criterion needs ---------------------------------------------------
def _score_without_data(plan: _Plan) -> None:
    """Scores from each layer alone: per layer one at a time, a global budget in the pass groups."""
    names = plan.selector.needs_scores
    groups = plan.groups if plan.budget == "global" else [[n] for n in names]
    for group in groups:
        plan.selector.add({n: _on(plan.criterion.score(n, plan.layers[n], plan.adapter, plan.seed), plan.device)
                           for n in group})


def _check_batches(plan: _Plan) -> None:
    batches = plan.batches
    if batches is None:
        raise ValueError(f"criterion {plan.criterion.name!r} needs batches (micro-batches of model inputs with labels)")
    if isinstance(batches, Mapping) or isinstance(batches, (str, bytes)):
        raise TypeError("batches must be an iterable of micro-batches (or a callable returning one), not a single batch")
    if len(plan.groups) > 1 and not callable(batches) and iter(batches) is batches:
        raise ValueError("max_layers_per_pass needs several passes over the batches: pass a list or a callable "
                         "returning a fresh iterator, not a one-shot iterator")
    if plan.loss_fn is not None and not callable(plan.loss_fn):
        raise TypeError("loss_fn must be a callable loss_fn(model, batch) -> scalar loss")


def _progress_total(plan: _Plan) -> Optional[int]:
    """Micro-batches over all passes, when the cap or the batches' length tells."""
    batches = plan.batches
    known = [x for x in (plan.num_batches, len(batches) if hasattr(batches, "__len__") else None) if x is not None]
    return len(plan.groups) * min(known) if known else None


def _check_pass_count(count: int, first_count: Optional[int], i: int) -> int:
    if count == 0:
        raise ValueError("batches yielded no micro-batch")
    if first_count is not None and count != first_count:
        raise ValueError(f"batches yielded {first_count} micro-batches on the first pass but {count} on "
                         f"pass {i + 1}: with max_layers_per_pass they must be the same on every pass")
    return count if first_count is None else first_count


def _score_with_gradients(plan: _Plan) -> None:
    """One pass over the batches per layer group, the collector's statistics (all-reduced under DDP)
    scored by the criterion."""
    _check_batches(plan)
    bar = tqdm(total=_progress_total(plan), desc="scoring masks", unit="batch", disable=not plan.progress)
    first_count = None
    try:
        with _scoring_state(plan.model, plan.adapter):
            for i, group in enumerate(plan.groups):
                with GradientCollector(plan.model, plan.criterion.name, device=plan.device, layers=group) as collector:
                    collector.tap_all = True
                    count = _score_pass(plan.model, collector, plan.batches, plan.num_batches, plan.loss_fn,
                                        plan.seed, bar)
                first_count = _check_pass_count(count, first_count, i)
                lost = collector.missing()
                if lost:
                    warnings.warn(f"mask scoring: no gradient reached {len(lost)} layer(s), e.g. {lost[0]!r}; "
                                  "their scores are zero", stacklevel=3)
                if plan.sync:
                    collector.all_reduce(plan.process_group)
                plan.selector.add(collector.scores(release=True))
    finally:
        bar.close()


_SCORERS: dict[str, Callable[[_Plan], None]] = {"nothing": _score_without_data, "gradients": _score_with_gradients}


# ---- the entry point ----------------------------------------------------------------------------
def compute_masks(
    model,
    batches: Union[Iterable, Callable[[], Iterable], None] = None,
    criterion: str = "fisher",
    density: Union[float, Mapping[str, float], None] = None,
    num_batches: Optional[int] = None,
    budget: str = "per_layer",
    adapter_name: Optional[str] = None,
    max_layers_per_pass: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    *,
    loss_fn: Optional[Callable] = None,
    device="cpu",
    process_group=None,
    sync: Optional[bool] = None,
) -> dict[str, torch.Tensor]:
    """Masks {layer name: bool (out, in) on the CPU} for every RoSA layer of ``adapter_name``.

    ``batches``: micro-batches (dicts of model inputs with labels; ``loss = model(**batch).loss``, or
    ``loss_fn(model, batch)``), an iterable or a callable returning one; each is one forward + backward.
    Needed by ``fisher`` / ``grad`` only; ``num_batches`` caps how many are used per pass. ``density``:
    None = each layer's density for the adapter (the adapter config's ``density_for(name)``), else a
    float or {name: float}. ``budget``:
    ``per_layer`` (k = int(d·numel) per layer) or ``global``. ``max_layers_per_pass``: score at most this
    many layers per pass over the batches (accumulator RAM ≈ 4 bytes × Σ numel of one group; the
    batches must then yield the same micro-batches on every pass). ``device``: where accumulators live
    (None = on the layer's device). Scoring runs in train mode with the RNG seeded from ``seed``; the
    model's modes, parameter grads, requires_grad flags and active adapter are restored afterwards.

    Several processes (DDP): ``sync=None`` (default) all-reduces the gradient statistics over
    ``process_group`` (default: the world) whenever ``torch.distributed`` is initialised with more than
    one process, so each rank scores its own share of the micro-batches and every rank then selects
    from the same global mean — identical masks everywhere. ``sync=False`` keeps each rank's scores
    local. ``magnitude`` and ``random`` need no exchange (every rank has the same weights and seed).
    """
    scoring = get_criterion(criterion)
    check_budget(budget)
    adapter = _adapter_of(model, adapter_name)
    num_batches = check_int("num_batches", num_batches, minimum=1, allow_none=True)
    sync = _resolve_sync(sync, process_group)
    max_layers_per_pass = check_int("max_layers_per_pass", max_layers_per_pass, minimum=1, allow_none=True)
    layers = _layers_of(model, adapter)
    selector = _selector(layers, adapter, density, budget)
    plan = _Plan(model=model, criterion=scoring, adapter=adapter, layers=layers, selector=selector,
                 groups=_groups(selector.needs_scores, max_layers_per_pass), budget=budget, batches=batches,
                 num_batches=num_batches, loss_fn=loss_fn, device=device, seed=seed, progress=progress,
                 sync=sync, process_group=process_group)
    _SCORERS[scoring.needs](plan)
    return selector.result(device="cpu")
