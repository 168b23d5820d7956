"""RosaEmbedding: LoRA plus a sparse adapter over a frozen ``nn.Embedding`` table.

The table E (num_embeddings V, embedding_dim D) plays the weight's role: the sparse mask covers E's own
(V, D) shape, A is (r, V) and B is (D, r) (PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` shapes), so
the delta weight is ``s·(B·A)ᵀ + S``. The math is :func:`rosa_peft.function_embedding.rosa_embedding`;
everything else (adapters, merge state, the ``merged`` implementation's W0 bookkeeping) is
:class:`rosa_peft.layer.RosaLayer`.
"""
from __future__ import annotations

import torch
from torch import nn

from .bases.float import EMBEDDING, _embedding_shape, _is_float_embedding
from .config import RosaConfig
from .function_embedding import rosa_embedding
from .layer import RosaLayer
from .weight_source import MergedSource, SpAddSource, SparseOnlySource


class RosaEmbedding(RosaLayer):
    """RoSA over ``nn.Embedding`` (float tables). ``max_norm`` and ``sparse=True`` bases are refused."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RosaConfig, module_name: str = "",
                 tied: bool = False):
        super().__init__()
        if not _is_float_embedding(base_layer):
            raise TypeError(f"{module_name or type(base_layer).__name__}: cannot wrap {type(base_layer).__name__}")
        for arg, bad in (("max_norm", base_layer.max_norm is not None), ("sparse", base_layer.sparse)):
            if bad:
                raise ValueError(f"{module_name}: nn.Embedding with {arg}={getattr(base_layer, arg)!r} is not supported")
        self._setup(base_layer, EMBEDDING, module_name, _embedding_shape(base_layer), tied)
        self.update_layer(adapter_name, config)

    def __setstate__(self, state):
        nn.Module.__setstate__(self, state)
        self.kind = EMBEDDING

    def _lora_dims(self) -> tuple[int, int]:
        return self.out_features, self.in_features  # A: (r, V), B: (D, r)

    def _lora_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        a = self.lora_A[name].weight.detach().to(dtype)
        b = self.lora_B[name].weight.detach().to(dtype)
        return (b @ a).t().mul_(self.scaling[name])

    def weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dL/dE (V, D): each token's output gradient summed into its row (the padding row stays 0)."""
        g = grad_out.detach().reshape(-1, grad_out.shape[-1]).to(dtype)
        dw = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=g.device)
        dw.index_add_(0, x.detach().reshape(-1).to(device=g.device, dtype=torch.long), g)
        if self.base_layer.padding_idx is not None:
            dw[self.base_layer.padding_idx] = 0
        return dw

    def _adapter_forward(self, x: torch.Tensor, name: str, with_base: bool) -> torch.Tensor:
        r = self.r[name]
        sp = self.rosa_spa[name]
        has_sparse = sp.has_mask
        base = self.base_layer
        if with_base:
            source = MergedSource(self.kind) if self._held == name else SpAddSource(self.kind)
        elif has_sparse:
            source = SparseOnlySource()
        else:  # LoRA alone
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            looked = nn.functional.embedding(x, a.t(), padding_idx=base.padding_idx,
                                             scale_grad_by_freq=base.scale_grad_by_freq)
            return (looked @ b.t()) * self.scaling[name]
        return rosa_embedding(
            x, base.weight, self.lora_A[name].weight if r else None, self.lora_B[name].weight if r else None,
            sp.values if has_sparse else None, source, sp if has_sparse else None, self.scaling[name],
            padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq,
        )
