"""The mask criteria registry: one :class:`Criterion` per file of this package, found on import.

A criterion says what it needs and how it turns that into scores (higher = keep):

* ``needs="nothing"``: ``score(name, layer, adapter, seed)`` gives the (out, in) scores of one RoSA layer
  from the layer alone (``magnitude``, ``random``);
* ``needs="gradients"``: :class:`~rosa_peft.masks.collector.GradientCollector` forms each micro-batch's
  dW, ``fold(dW)`` is the term summed over micro-batches and ``finish(mean)`` turns the mean of those
  terms into the score (``fisher``: dW⊙dW, unchanged; ``grad``: dW, then |·|).

Adding a criterion is one new module here that calls :func:`register` (see docs/masks.md); the modules
are imported in name order, and :data:`CRITERIA` lists their criteria in that order.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional

import torch

NEEDS = ("nothing", "gradients")


def unchanged(t: torch.Tensor) -> torch.Tensor:
    """The identity, the default ``fold`` / ``finish`` of a gradient criterion."""
    return t


@dataclass(frozen=True)
class Criterion:
    """How one criterion scores the weights of a RoSA layer (see the module docstring).

    ``fold`` and ``finish`` may work in place on the tensor they are given (it is the criterion's own).
    """

    name: str
    needs: str
    score: Optional[Callable[..., torch.Tensor]] = None
    fold: Callable[[torch.Tensor], torch.Tensor] = unchanged
    finish: Callable[[torch.Tensor], torch.Tensor] = unchanged

    def __post_init__(self):
        if self.needs not in NEEDS:
            raise ValueError(f"criterion {self.name!r}: needs must be one of {NEEDS}, got {self.needs!r}")
        if self.needs == "nothing" and self.score is None:
            raise ValueError(f"criterion {self.name!r} needs no data, so it must give "
                             "score(name, layer, adapter, seed)")


_REGISTRY: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
    """Add a criterion under its name (each name once); returns it."""
    if criterion.name in _REGISTRY:
        raise ValueError(f"mask criterion {criterion.name!r} is already registered")
    _REGISTRY[criterion.name] = criterion
    return criterion


def get_criterion(name: str) -> Criterion:
    """The registered criterion called ``name``; a ValueError listing the names otherwise."""
    found = _REGISTRY.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"criterion must be one of {tuple(_REGISTRY)}, got {name!r}")
    return found


def names_needing(needs: str) -> tuple[str, ...]:
    """The names of the criteria with this ``needs``, in :data:`CRITERIA` order."""
    return tuple(n for n, c in _REGISTRY.items() if c.needs == needs)


for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

CRITERIA = tuple(_REGISTRY)
