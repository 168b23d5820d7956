"""Which modules of a model an adapter wraps (PEFT's target_modules / exclude_modules /
layers_to_transform / layers_pattern rules)."""
from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

from .embedding import EMBEDDING, RosaEmbedding
from .layer import RosaLayer, resolve_base_kind
from .modules_to_save import ModulesToSaveWrapper
from .utils.checks import UserError

# Names of the module list holding a model's layers that PEFT tries when layers_pattern is None.
COMMON_LAYERS_PATTERN = ("layers", "h", "block", "blocks", "layer")


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
    """Every wrappable layer: a Linear (float or a registered quantized kind), GPT-2 ``Conv1D``,
    ``nn.Embedding`` (only when named: ``all-linear`` leaves embeddings alone), or an existing RoSA layer.

    Modules inside a RoSA layer (its base layer and adapters) or inside a
    :class:`~rosa_peft.modules_to_save.ModulesToSaveWrapper` (the frozen original and the per-adapter
    copies) are never candidates.
    """
    out = {}
    closed = None  # the RoSA layer / wrapper whose submodules named_modules() is walking (pre-order)
    for name, module in model.named_modules():
        if closed is not None and _within(name, closed):
            continue
        closed = None
        if isinstance(module, (RosaLayer, ModulesToSaveWrapper)):
            closed = name
        if isinstance(module, RosaLayer) or (
                closed is None and (resolve_base_kind(module) is not None or EMBEDDING.matches(module))):
            out[name] = module
    return out


def _within(name: str, root: str) -> bool:
    """``name`` is a submodule of ``root`` (``""``: the model itself)."""
    return root == "" or name.startswith(root + ".")


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, RosaEmbedding) or EMBEDDING.matches(module)


def layer_index(name: str, layers_pattern: Optional[Union[list, str]] = None) -> Optional[int]:
    """The layer index in a module name: ``idx`` of its first ``.<pattern>.<idx>.`` component (PEFT's rule).

    ``layers_pattern`` is a regex or a list of them, tried in order, each matched as whole dotted
    component(s); ``None`` tries :data:`COMMON_LAYERS_PATTERN`. ``None`` when no pattern matches.
    """
    if layers_pattern is None:
        patterns = list(COMMON_LAYERS_PATTERN)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    for pattern in patterns:
        # lazy prefix: the first index after the pattern, not a nested one (e.g. an MoE expert index)
        match = re.match(rf"(?:.*?\.)??(?:{pattern})\.(?P<idx>\d+)\.", name)
        if match is not None:
            return int(match.group("idx"))
    return None


def _in_layers(name: str, layers_to_transform, layers_pattern) -> bool:
    idx = layer_index(name, layers_pattern)
    if idx is None:
        return False
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    return idx in wanted


def _uses_layers(layers_to_transform) -> bool:
    return layers_to_transform is not None and (not isinstance(layers_to_transform, list) or len(layers_to_transform) > 0)


def _under(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def find_targets(model: nn.Module, target_modules, exclude_modules: Optional[Union[list, str]] = None,
                 layers_to_transform: Optional[Union[list, int]] = None,
                 layers_pattern: Optional[Union[list, str]] = None, *,
                 modules_to_save: Optional[list] = None) -> list[str]:
    """Module names to wrap; raises :class:`~rosa_peft.utils.checks.UserError` listing the available Linear names when none match.

    ``layers_to_transform`` / ``layers_pattern`` keep only the layers listed (see :func:`layer_index`);
    ``[]`` or ``None`` keeps all. Modules matched by ``modules_to_save`` (exact name or dotted suffix),
    and everything inside them, are left out: they get a trainable copy instead of an adapter.
    """
    cands = candidate_layers(model)
    heads = output_head_names(model)
    if target_modules == "all-linear":
        names = [n for n in cands if n not in heads and not _is_embedding(cands[n])]
    else:
        names = [n for n in cands if _matches(target_modules, n)]
    names = [n for n in names if not _matches(exclude_modules, n)]
    if modules_to_save:
        saved = [n for n, _ in model.named_modules() if n and _matches(list(modules_to_save), n)]
        names = [n for n in names if not _under(n, saved)]
    before_layers = len(names)
    if _uses_layers(layers_to_transform):
        names = [n for n in names if _in_layers(n, layers_to_transform, layers_pattern)]
    if not names:
        suffixes = sorted({n.split(".")[-1] for n in cands})
        examples = ", ".join(list(cands)[:3])
        why = ""
        if before_layers:
            pattern = layers_pattern if layers_pattern is not None else list(COMMON_LAYERS_PATTERN)
            why = (f" with layers_to_transform={layers_to_transform!r} (layers_pattern={pattern!r}); "
                   f"{before_layers} module(s) match without it")
        raise UserError(
            f"target_modules={target_modules!r} matches no Linear module{why}. Available Linear names "
            f"(last component): {', '.join(suffixes) or 'none'}; {len(cands)} in total, e.g. {examples}"
        )
    return names


def find_targets_for(model: nn.Module, config) -> list[str]:
    """:func:`find_targets` with every targeting field of a :class:`~rosa_peft.config.RosaConfig`."""
    return find_targets(model, config.target_modules, config.exclude_modules,
                        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
                        modules_to_save=config.modules_to_save)
