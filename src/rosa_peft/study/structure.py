"""How structured a set of sparse masks is: empty rows/columns and max-pooled heatmaps.

The paper observes (its Figs. 4-5) that RoSA's Fisher masks are far from uniform: their non-zeros gather in a
few rows and columns, so many rows/columns of a mask are empty. :func:`mask_structure` measures that per
weight (the fraction of empty rows and columns, next to what a uniformly random mask of the same density
would give, ``(1 - d)^n``) and keeps max-pooled heatmaps of a few weights, all as plain JSON so a figure
can be redrawn without the masks file.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence

import torch

STRUCTURE_FORMAT = "rosa-mask-structure/1"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> Optional[int]:
    """The transformer block index in a module name (``model.layers.3.mlp.up_proj`` -> 3), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """The last component of a module name (``q_proj``, ``down_proj``, ...)."""
    return name.rsplit(".", 1)[-1]


def row_col_stats(mask: torch.Tensor) -> Dict[str, float]:
    """Density, empty-row and empty-column fractions of a 2-D bool mask, and their uniform-random expectation."""
    if mask.dim() != 2:
        raise ValueError(f"expected a 2-D mask, got shape {tuple(mask.shape)}")
    rows, cols = mask.shape
    m = mask.bool()
    density = m.sum().item() / max(rows * cols, 1)
    return {
        "density": density,
        "empty_rows": (~m.any(dim=1)).float().mean().item(),
        "empty_cols": (~m.any(dim=0)).float().mean().item(),
        "random_empty_rows": (1.0 - density) ** cols,  # a row has `cols` entries, each kept with prob. d
        "random_empty_cols": (1.0 - density) ** rows,
    }


def max_pool(mask: torch.Tensor, pool: int) -> torch.Tensor:
    """A bool grid: True where a ``pool`` x ``pool`` block of ``mask`` holds any kept entry (edges padded)."""
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    x = mask.bool().float()[None, None]
    return torch.nn.functional.max_pool2d(x, pool, stride=pool, ceil_mode=True)[0, 0].bool()


def _grid_rows(grid: torch.Tensor) -> list:
    return ["".join("1" if v else "0" for v in row) for row in grid.tolist()]


def pick_heatmaps(names: Sequence[str], modules: Sequence[str] = ("q_proj", "down_proj")) -> list:
    """The first, middle and last block's weights of the given module types (in ``names`` order)."""
    layers = sorted({i for i in (layer_index(n) for n in names) if i is not None})
    if not layers:
        return []
    chosen = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    return [n for n in names if layer_index(n) in chosen and module_type(n) in modules]


def mask_structure(masks: Mapping[str, torch.Tensor], pool: int = 8,
                   heatmaps: Optional[Sequence[str]] = None) -> dict:
    """Per-weight and per-module-type structure statistics plus max-pooled heatmaps, as a JSON-able dict.

    ``heatmaps`` names the weights to keep a pooled picture of (default: :func:`pick_heatmaps`).
    """
    if not masks:
        raise ValueError("mask_structure: no masks given")
    per_weight = OrderedDict()
    for name, m in masks.items():
        per_weight[name] = {"shape": list(m.shape), "layer": layer_index(name), "module": module_type(name),
                            **row_col_stats(m)}
    keys = ("density", "empty_rows", "empty_cols", "random_empty_rows", "random_empty_cols")
    by_type: Dict[str, dict] = OrderedDict()
    for stats in per_weight.values():
        by_type.setdefault(stats["module"], []).append(stats)
    modules = OrderedDict((t, {"n": len(v), **{k: sum(s[k] for s in v) / len(v) for k in keys}})
                          for t, v in by_type.items())
    overall = {"n": len(per_weight), **{k: sum(s[k] for s in per_weight.values()) / len(per_weight) for k in keys}}
    names = list(masks) if heatmaps is None else list(heatmaps)
    chosen = pick_heatmaps(names) if heatmaps is None else names
    pictures = []
    for name in chosen:
        if name not in masks:
            raise KeyError(f"mask_structure: no mask named {name!r}")
        grid = max_pool(masks[name], pool)
        pictures.append({"name": name, "shape": list(masks[name].shape), "pooled_shape": list(grid.shape),
                         "rows": _grid_rows(grid)})
    return {"format": STRUCTURE_FORMAT, "pool": pool, "overall": overall, "modules": modules,
            "weights": per_weight, "heatmaps": pictures}
