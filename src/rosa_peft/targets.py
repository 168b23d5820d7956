"""Which modules of a model an adapter wraps (PEFT's target_modules / exclude_modules rules)."""
from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

from .layer import RosaLinear, resolve_base_kind


def _matches(spec: Union[list, str, None], name: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that ``all-linear`` leaves alone."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_out):
        try:
            head = get_out()
        except (AttributeError, NotImplementedError):
            head = None
    for name, module in model.named_modules():
        if head is not None and module is head:
            heads.add(name)
        elif head is None and name.split(".")[-1] in ("lm_head", "score", "classifier"):
            heads.add(name)
    return heads


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every wrappable Linear (float or a registered quantized kind), or an existing RosaLinear."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, RosaLinear):
            out[name] = module
        elif resolve_base_kind(module) is not None and not _inside_rosa(model, name):
            out[name] = module
    return out


def _inside_rosa(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    if parts[-1] == "base_layer" or any(p in ("lora_A", "lora_B") for p in parts):
        return True
    return False


def find_targets(model: nn.Module, target_modules, exclude_modules: Optional[Union[list, str]] = None) -> list[str]:
    """Module names to wrap; raises ValueError listing the available Linear names when none match."""
    cands = candidate_layers(model)
    heads = output_head_names(model)
    if target_modules == "all-linear":
        names = [n for n in cands if n not in heads]
    else:
        names = [n for n in cands if _matches(target_modules, n)]
    names = [n for n in names if not _matches(exclude_modules, n)]
    if not names:
        suffixes = sorted({n.split(".")[-1] for n in cands})
        examples = ", ".join(list(cands)[:3])
        raise ValueError(
            f"target_modules={target_modules!r} matches no Linear module. Available Linear names "
            f"(last component): {', '.join(suffixes) or 'none'}; {len(cands)} in total, e.g. {examples}"
        )
    return names
