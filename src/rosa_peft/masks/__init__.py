"""Sparse masks for RoSA: score every target weight, keep the top entries, save / load the masks.

Criteria: ``fisher`` (mean over micro-batches of dW⊙dW — the paper's default), ``grad`` (|mean dW|),
``magnitude`` (|W0|, de-quantised for 4-bit bases) and ``random`` (seeded uniform scores). See
docs/masks.md.

The package:

* ``criteria/`` — the :class:`Criterion` registry (``__init__``) and one module per criterion
  (``fisher``, ``grad``, ``magnitude``, ``random``), found on import; :data:`CRITERIA` lists them.
* ``collector`` — :class:`GradientCollector`: per-micro-batch dW from hooks, folded by the criterion.
* ``select`` — :func:`select_masks`, :func:`top_k_masks`, :class:`Selector`: exact top-k with
  deterministic ties, per layer or one global budget (:data:`BUDGETS`).
* ``compute`` — :func:`compute_masks`: the orchestration (checks, groups, passes) over the above.
* ``files`` — :func:`save_masks` / :func:`load_masks`.
"""
from __future__ import annotations

from .collector import GRAD_CRITERIA, GradientCollector, distributed_world, named_rosa_layers
from .compute import compute_masks
from .criteria import CRITERIA, Criterion, get_criterion
from .criteria import register as register_criterion
from .criteria.magnitude import magnitude_scores
from .criteria.random import random_scores
from .files import load_masks, save_masks
from .select import BUDGETS, Selector, check_budget, check_density, resolve_densities, select_masks, top_k_masks

__all__ = ["CRITERIA", "BUDGETS", "GradientCollector", "compute_masks", "select_masks", "top_k_masks",
           "magnitude_scores", "random_scores", "save_masks", "load_masks", "Criterion", "get_criterion",
           "register_criterion", "GRAD_CRITERIA", "Selector", "check_budget", "check_density", "distributed_world",
           "named_rosa_layers", "resolve_densities"]
