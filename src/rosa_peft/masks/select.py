"""Top-k mask selection from scores: per layer or one global budget, with deterministic ties.

Order used everywhere: higher score first; among equal scores the earlier position wins, where
positions run over the layers in the order given (the model's order) and, inside a layer, over the
flat (row-major) index. ``torch.topk`` gives no such guarantee on ties, so selection is done here by
an exact threshold search (a radix select over order-preserving integer keys of the float scores,
16 bits per pass, with ``bincount``), then the ties at the threshold are filled lowest index first.
Nothing is ever concatenated across layers, and the global budget can be fed group by group
(:class:`Selector`), keeping only the current best ``K`` candidates between groups.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch

from ..utils.checks import UserError, check_fraction

BUDGETS = ("per_layer", "global")
_DIGIT = 16
_RADIX = 1 << _DIGIT


# ---- exact top-K over several tensors ------------------------------------------------------------
def _keys(t: torch.Tensor, wide: bool) -> torch.Tensor:
    """Flat signed-integer keys with the same order as the float values (-0.0 folded into +0.0)."""
    if wide:
        f = t.detach().reshape(-1).to(torch.float64) + 0.0
        bits, flip = f.view(torch.int64), 0x7FFFFFFFFFFFFFFF
    else:
        f = t.detach().reshape(-1).to(torch.float32) + 0.0
        bits, flip = f.view(torch.int32), 0x7FFFFFFF
    return torch.where(bits < 0, bits ^ flip, bits)


def _kth_largest_key(tensors: Sequence[torch.Tensor], k: int, wide: bool) -> tuple[int, int]:
    """The K-th largest key over all tensors (1 <= K <= total) and how many keys are strictly larger."""
    bits = 64 if wide else 32
    shift, prefix, above = bits - _DIGIT, None, 0
    while True:
        hist = torch.zeros(_RADIX, dtype=torch.int64)
        for t in tensors:
            key = _keys(t, wide)
            if prefix is None:
                digit = (key >> shift) + _RADIX // 2
            else:
                key = key[(key >> (shift + _DIGIT)) == prefix]
                digit = (key >> shift) & (_RADIX - 1)
            hist += torch.bincount(digit.long(), minlength=_RADIX).cpu()
        from_top = hist.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, torch.tensor(k - above)))
        d = _RADIX - 1 - j
        above += int(from_top[j]) - int(hist[d])
        prefix = d - _RADIX // 2 if prefix is None else prefix * _RADIX + d
        if shift == 0:
            return prefix, above
        shift -= _DIGIT


def top_k_masks(tensors: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks (one per tensor, same shape and device) of the ``k`` best entries over all tensors."""
    total = sum(t.numel() for t in tensors)
    if k <= 0:
        return [torch.zeros(t.shape, dtype=torch.bool, device=t.device) for t in tensors]
    if k >= total:
        return [torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in tensors]
    wide = any(t.dtype == torch.float64 for t in tensors)
    threshold, above = _kth_largest_key(tensors, k, wide)
    need = k - above
    out = []
    for t in tensors:
        key = _keys(t, wide)
        m = key > threshold
        if need > 0:
            ties = (key == threshold).nonzero().squeeze(1)[:need]
            m[ties] = True
            need -= ties.numel()
        out.append(m.view(t.shape))
    return out


# ---- validation ----------------------------------------------------------------------------------
def check_density(field: str, d) -> float:
    """``d`` as a float in [0, 1] (a mask may keep nothing or everything)."""
    return check_fraction(field, d, 0.0, 1.0, closed="both")


def resolve_densities(density: Union[float, Mapping[str, float]], names: Sequence[str]) -> dict[str, float]:
    if isinstance(density, Mapping):
        missing = [n for n in names if n not in density]
        extra = sorted(set(density) - set(names))
        if missing:
            raise ValueError(f"density has no entry for layer {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            raise ValueError(f"density names layer {extra[0]!r}, which has no scores")
        return {n: check_density(f"density[{n!r}]", density[n]) for n in names}
    d = check_density("density", density)
    return {n: d for n in names}


def check_scores(name: str, s) -> torch.Tensor:
    if not isinstance(s, torch.Tensor) or not s.is_floating_point():
        raise ValueError(f"scores[{name!r}] must be a floating-point tensor, got {type(s).__name__}"
                         f"{'' if not isinstance(s, torch.Tensor) else ' of ' + str(s.dtype)}")
    if bool(torch.isnan(s).any()):
        raise UserError(f"scores[{name!r}] contain NaN (did the loss diverge?)")
    return s


def check_budget(budget: str) -> str:
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    return budget


# ---- selection, possibly fed group by group ------------------------------------------------------
class Selector:
    """Masks for layers whose scores arrive in groups (in layer order); see the module docstring.

    ``per_layer``: each layer keeps its own top int(d·numel). ``global``: one budget
    K = Σ int(d_l·numel_l) over the layers with d_l > 0 (layers with d = 0 take no entries), chosen by
    score across layers. Between groups only the best K (value, global position) pairs are kept.
    """

    def __init__(self, shapes: Mapping[str, tuple], densities: Mapping[str, float], budget: str):
        self.budget = check_budget(budget)
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.k = {n: int(densities[n] * math.prod(self.shapes[n])) for n in self.shapes}
        self.masks: dict[str, torch.Tensor] = {}
        self._seen: set = set()
        if budget == "global":
            self.eligible = [n for n in self.shapes if densities[n] > 0]
            self.total = sum(self.k[n] for n in self.eligible)
            self.offset, pos = {}, 0
            for n in self.eligible:
                self.offset[n] = pos
                pos += math.prod(self.shapes[n])
            self._vals: Optional[torch.Tensor] = None
            self._pos: Optional[torch.Tensor] = None
            self._last = -1
        else:
            self.eligible = [n for n in self.shapes if self.k[n] > 0]

    @property
    def needs_scores(self) -> list[str]:
        """The layers whose scores matter (in order); the others get all-False masks."""
        return list(self.eligible)

    def add(self, scores: Mapping[str, torch.Tensor]) -> None:
        for n, s in scores.items():
            if n not in self.shapes:
                raise ValueError(f"scores name layer {n!r}, which is not being selected")
            check_scores(n, s)
            if tuple(s.shape) != self.shapes[n]:
                raise ValueError(f"scores[{n!r}] has shape {tuple(s.shape)}, expected {self.shapes[n]}")
        self._seen.update(scores)
        if self.budget == "per_layer":
            for n, s in scores.items():
                self.masks[n] = top_k_masks([s], self.k[n])[0]
            return
        group = [n for n in self.eligible if n in scores]
        if not group:
            return
        if self.offset[group[0]] <= self._last:
            raise ValueError("global selection needs the layers' scores in model order, each once")
        self._last = self.offset[group[-1]]
        tensors = [scores[n] for n in group]
        k_group = min(self.total, sum(t.numel() for t in tensors))
        vals, pos = [], []
        for n, t, m in zip(group, tensors, top_k_masks(tensors, k_group)):
            idx = m.reshape(-1).nonzero().squeeze(1)
            vals.append(t.detach().reshape(-1)[idx])
            pos.append(idx + self.offset[n])
        self._merge(vals, pos)

    def _merge(self, vals: list, pos: list) -> None:
        if self._vals is not None:
            vals, pos = [self._vals] + vals, [self._pos] + pos
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in vals) else torch.float32
        device = vals[0].device
        v = torch.cat([x.to(device=device, dtype=dtype) for x in vals])
        p = torch.cat([x.to(device) for x in pos])
        if v.numel() > self.total:  # candidates are in position order, so ties keep the earliest
            keep = top_k_masks([v], self.total)[0]
            v, p = v[keep], p[keep]
        self._vals, self._pos = v, p

    def result(self, device=None) -> dict[str, torch.Tensor]:
        missing = [n for n in self.eligible if n not in self._seen]
        if missing:
            raise ValueError(f"no scores were given for layer {missing[0]!r}")
        out = {}
        for n, shape in self.shapes.items():
            m = self.masks.get(n)
            if m is None:
                m = torch.zeros(shape, dtype=torch.bool, device=device)
                if self.budget == "global" and n in self.offset and self._pos is not None:
                    lo = self.offset[n]
                    p = self._pos[(self._pos >= lo) & (self._pos < lo + m.numel())] - lo
                    m.view(-1)[p.to(m.device)] = True
            elif device is not None:
                m = m.to(device)
            out[n] = m
        return out


def select_masks(scores: Mapping[str, torch.Tensor], density: Union[float, Mapping[str, float]],
                 budget: str = "per_layer") -> dict[str, torch.Tensor]:
    """Bool masks from scores: {layer: score tensor} -> {layer: bool tensor of the same shape}.

    ``density`` is one fraction for every layer or {layer: fraction}. ``budget="per_layer"`` keeps
    k = int(d·numel) entries per layer (the paper); ``"global"`` keeps K = Σ int(d_l·numel_l) entries in
    all, ranked by score across layers (exactly K). Ties: the lower flat index (then the earlier layer,
    in the dict's order) wins. Masks are on the scores' device.
    """
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty dict {layer name: score tensor}")
    check_budget(budget)
    for n, s in scores.items():
        check_scores(n, s)
    densities = resolve_densities(density, list(scores))
    sel = Selector({n: tuple(s.shape) for n, s in scores.items()}, densities, budget)
    sel.add({n: scores[n] for n in sel.needs_scores})
    device = next(iter(scores.values())).device
    return sel.result(device=device)
