"""Float base kinds: ``nn.Linear``, transformers' GPT-2 ``Conv1D`` and ``nn.Embedding`` with plain float weights.

Their weight is the dense tensor itself (``to_dense`` only casts, so it is not fresh), and ``W0 + S`` can
be written into it in place (``supports_merged``). ``FLOAT_LINEAR`` and ``CONV1D`` are registered as
fallbacks (after the more specific 4-bit kinds); ``EMBEDDING`` is used by ``RosaEmbedding`` directly.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from . import BaseKind, register_base_kind


def _is_float_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and m.weight.is_floating_point() and type(m.weight.data) is torch.Tensor


def _conv1d_class():
    """transformers' GPT-2 ``Conv1D`` when transformers is already imported (never imports it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _is_float_conv1d(m: nn.Module) -> bool:
    cls = _conv1d_class()
    return (cls is not None and isinstance(m, cls) and m.weight.is_floating_point()
            and type(m.weight.data) is torch.Tensor)


def _is_float_embedding(m: nn.Module) -> bool:
    return isinstance(m, nn.Embedding) and m.weight.is_floating_point() and type(m.weight.data) is torch.Tensor


def _plain_weight(m: nn.Module) -> torch.Tensor:
    return m.weight


def _conv1d_weight(m: nn.Module) -> torch.Tensor:
    return m.weight.t()  # Conv1D stores (in, out): hand out the (out, in) view


def _cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w if w.dtype == dtype else w.to(dtype)


def _weight_dtype(m: nn.Module) -> torch.dtype:
    return m.weight.dtype


def _conv1d_shape(m: nn.Module) -> tuple:
    return (m.weight.shape[1], m.weight.shape[0])


def _embedding_shape(m: nn.Module) -> tuple:
    return tuple(m.weight.shape)


FLOAT_LINEAR = BaseKind(name="float", matches=_is_float_linear, weight=_plain_weight, to_dense=_cast,
                        supports_merged=True, compute_dtype=_weight_dtype)
CONV1D = BaseKind(name="conv1d", matches=_is_float_conv1d, weight=_conv1d_weight, to_dense=_cast,
                  supports_merged=True, compute_dtype=_weight_dtype, shape=_conv1d_shape)
EMBEDDING = BaseKind(name="embedding", matches=_is_float_embedding, weight=_plain_weight, to_dense=_cast,
                     supports_merged=True, compute_dtype=_weight_dtype, shape=_embedding_shape)


def register() -> None:
    """Called once by the registry (``bases.load_backend``): the float kinds, matched last."""
    for kind in (FLOAT_LINEAR, CONV1D):
        register_base_kind(kind, fallback=True)
