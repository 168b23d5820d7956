"""RosaLinear: LoRA (B·A) plus a sparse adapter S over a frozen base Linear (float or 4-bit).

Which base a layer wraps is decided once, by :func:`resolve_base_kind` (float ``nn.Linear`` here;
``rosa_peft.quant`` registers the NF4 kinds). How ``W + S`` reaches the GEMMs is a *weight source*:

* ``merged`` (default on float bases): the base weight holds ``W0 + S`` in place, ``W0`` is kept only at
  the mask positions, and a forward pre-hook rewrites those positions whenever the values tensor's
  version counter moved (i.e. after any optimizer step, by any optimizer). No dense copy per step.
* ``sp_add`` (the reference's path, and the only one for quantized bases): a temporary dense
  ``W + S`` is built per call (dequantised first for 4-bit bases) and dropped after the GEMM.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from . import sparse
from .config import RosaConfig
from .function import rosa_linear
from .sparse import SparseAdapter

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# ---- base kinds: how to read a dense float weight out of the wrapped layer -----------------------
@dataclass
class BaseKind:
    name: str
    matches: Callable[[nn.Module], bool]
    weight: Callable[[nn.Module], torch.Tensor]  # the tensor handed to the autograd Function
    to_dense: Callable[[torch.Tensor, torch.dtype], torch.Tensor]  # may return the tensor itself
    supports_merged: bool
    compute_dtype: Callable[[nn.Module], torch.dtype]


def _is_float_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and m.weight.is_floating_point() and type(m.weight.data) is torch.Tensor


FLOAT_LINEAR = BaseKind(
    name="float",
    matches=_is_float_linear,
    weight=lambda m: m.weight,
    to_dense=lambda w, dtype: w if w.dtype == dtype else w.to(dtype),
    supports_merged=True,
    compute_dtype=lambda m: m.weight.dtype,
)
BASE_KINDS: list[BaseKind] = [FLOAT_LINEAR]


def register_base_kind(kind: BaseKind) -> None:
    BASE_KINDS[:] = [k for k in BASE_KINDS if k.name != kind.name]
    BASE_KINDS.insert(0, kind)


def _register_loaded_quant_kinds() -> None:
    """Lazy hook: a 4-bit base can only exist once torchao / bitsandbytes has been imported (by anyone);
    then let ``rosa_peft.quant`` register its kinds. Imports neither library itself."""
    if "torchao" in sys.modules or "bitsandbytes" in sys.modules:
        from .quant import register_loaded_backends

        register_loaded_backends()


def resolve_base_kind(module: nn.Module) -> Optional[BaseKind]:
    _register_loaded_quant_kinds()
    for kind in BASE_KINDS:
        if kind.matches(module):
            return kind
    return None


# ---- weight sources ------------------------------------------------------------------------------
class MergedSource:
    """The base weight already holds W0 + S: use it as is."""

    def __init__(self, kind: BaseKind):
        self.kind = kind

    def dense(self, weight, sp, values, dtype):
        return self.kind.to_dense(weight, dtype)


class SpAddSource:
    """Build W + S in a temporary (rounded in the base dtype, exactly as ``merged`` stores it)."""

    def __init__(self, kind: BaseKind):
        self.kind = kind

    def dense(self, weight, sp, values, dtype):
        if sp is None or values is None or values.numel() == 0:
            return self.kind.to_dense(weight, dtype)
        if self.kind is FLOAT_LINEAR:
            w = weight.clone()
            sparse.add_into(w, sp, values)
            return w if w.dtype == dtype else w.to(dtype)
        w = self.kind.to_dense(weight, dtype)  # quantized bases: a fresh de-quantised temporary
        return sparse.add_into(w, sp, values)


class _Backup(nn.Module):
    """W0 at the mask positions (merged implementation only); never saved."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.register_buffer("values", values, persistent=False)


# ---- the layer -----------------------------------------------------------------------------------
class RosaLinear(nn.Module):
    adapter_layer_names = ("lora_A", "lora_B", "rosa_spa")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RosaConfig, module_name: str = ""):
        super().__init__()
        kind = resolve_base_kind(base_layer)
        if kind is None:
            raise TypeError(f"{module_name or type(base_layer).__name__}: cannot wrap {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.kind = kind
        self.module_name = module_name
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.rosa_spa = nn.ModuleDict()
        self.rosa_w0 = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.density: dict[str, float] = {}
        self.impl: dict[str, str] = {}
        self.init_lora_weights: dict[str, object] = {}
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self._synced: Optional[tuple] = None  # (adapter, values key) whose S lives in the base weight
        self.update_layer(adapter_name, config)
        self.register_forward_pre_hook(_sync_pre_hook)

    # ---- adapters ----------------------------------------------------------------------------------
    def _adapter_dtype(self, config: RosaConfig) -> torch.dtype:
        if config.adapter_dtype is not None:
            return _DTYPES[config.adapter_dtype]
        dt = self.kind.compute_dtype(self.base_layer)
        return dt if dt.is_floating_point else torch.float32

    def update_layer(self, adapter_name: str, config: RosaConfig) -> None:
        r = config.rank_for(self.module_name)
        impl = config.impl
        if impl == "auto":
            impl = "merged" if self.kind.supports_merged else "sp_add"
        elif impl == "merged" and not self.kind.supports_merged:
            raise ValueError(f"{self.module_name}: impl='merged' cannot edit a {self.kind.name} base in place; use 'sp_add' or 'auto'")
        dtype = self._adapter_dtype(config)
        device = self.kind.weight(self.base_layer).device
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling_for(self.module_name)
        self.lora_dropout[adapter_name] = float(config.lora_dropout)
        self.density[adapter_name] = config.density_for(self.module_name)
        self.impl[adapter_name] = impl
        self.init_lora_weights[adapter_name] = config.init_lora_weights
        if r > 0:
            self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
            self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)
        self.rosa_spa[adapter_name] = SparseAdapter(
            self.out_features, self.in_features, dtype=dtype, device=device, index_dtype=config.index_dtype
        )
        self.reset_lora_parameters(adapter_name)

    def reset_lora_parameters(self, adapter_name: str, generator: Optional[torch.Generator] = None) -> None:
        """Fresh LoRA init: A Kaiming-uniform (or Gaussian), B = 0 (random when init_lora_weights=False)."""
        if self.r.get(adapter_name, 0) == 0:
            return
        init = self.init_lora_weights[adapter_name]
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init == "gaussian":
                a.normal_(0.0, 1.0 / self.r[adapter_name], generator=generator)
            else:
                bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)) on (r, in)
                a.uniform_(-bound, bound, generator=generator)
            if init is False:
                bound_b = 1.0 / math.sqrt(max(1, self.r[adapter_name]))
                b.uniform_(-bound_b, bound_b, generator=generator)
            else:
                b.zero_()

    def set_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        sp: SparseAdapter = self.rosa_spa[adapter_name]
        if tuple(mask.shape) != sp.shape:
            raise ValueError(f"mask for {self.module_name!r} has shape {tuple(mask.shape)}, the weight is {sp.shape}")
        self._restore_base()
        init = None
        if self.init_lora_weights[adapter_name] is False:
            nnz = int(mask.sum())
            init = torch.randn(nnz, dtype=sp.values.dtype, device=sp.values.device) * 0.02
        trainable = sp.values.requires_grad
        sp.set_mask(mask, init)
        sp.values.requires_grad_(trainable)
        self._after_structure_change(adapter_name)

    def load_sparse(self, adapter_name: str, row_offsets, col_indices, values) -> None:
        sp: SparseAdapter = self.rosa_spa[adapter_name]
        self._restore_base()
        trainable = sp.values.requires_grad
        sp.set_csr(row_offsets, col_indices, values)
        sp.values.requires_grad_(trainable)
        self._after_structure_change(adapter_name)

    def _after_structure_change(self, adapter_name: str) -> None:
        sp = self.rosa_spa[adapter_name]
        if self.impl[adapter_name] == "merged":
            w = self.kind.weight(self.base_layer)
            self.rosa_w0[adapter_name] = _Backup(sparse.gather_from(w.detach(), sp).clone())
        self._synced = None

    def delete_adapter(self, adapter_name: str) -> None:
        if self._synced is not None and self._synced[0] == adapter_name:
            self._restore_base()
        for d in (self.lora_A, self.lora_B, self.rosa_spa, self.rosa_w0):
            if adapter_name in d:
                del d[adapter_name]
        for d in (self.r, self.scaling, self.lora_dropout, self.density, self.impl, self.init_lora_weights):
            d.pop(adapter_name, None)

    def set_adapter(self, adapter_name: str, trainable: bool = True) -> None:
        self.active_adapter = adapter_name
        for name in self.rosa_spa:
            on = trainable and name == adapter_name
            for mod in (self.lora_A, self.lora_B, self.rosa_spa):
                if name in mod:
                    mod[name].requires_grad_(on)

    # ---- keeping the base weight in step with S (merged implementation) ------------------------------
    def _wanted_in_base(self) -> Optional[str]:
        name = self.active_adapter
        if self.disable_adapters or name not in self.rosa_spa or self.impl.get(name) != "merged":
            return None
        return name if self.rosa_spa[name].has_mask else None

    @staticmethod
    def _values_key(sp: SparseAdapter) -> tuple:
        v = sp.values
        return (id(v), v._version, v.data_ptr(), v.device)

    @torch.no_grad()
    def _restore_base(self) -> None:
        """Write W0 back at the positions of the adapter currently held in the base weight."""
        if self._synced is None:
            return
        name = self._synced[0]
        if name in self.rosa_w0:
            w = self.kind.weight(self.base_layer)
            sparse.write_into(w, self.rosa_spa[name], self.rosa_w0[name].values)
        self._synced = None

    @torch.no_grad()
    def _sync_base(self) -> None:
        if self.merged_adapters:
            return
        wanted = self._wanted_in_base()
        if self._synced is not None and self._synced[0] != wanted:
            self._restore_base()
        if wanted is None:
            return
        sp = self.rosa_spa[wanted]
        key = self._values_key(sp)
        if self._synced is not None and self._synced[1] == key:
            return
        w = self.kind.weight(self.base_layer)
        w0 = self.rosa_w0[wanted].values
        sparse.write_into(w, sp, w0 + sp.values.detach().to(w0.dtype))
        self._synced = (wanted, self._values_key(sp))

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self.active_adapter
        if self.disable_adapters or self.merged_adapters or name not in self.rosa_spa:
            return self.base_layer(x, *args, **kwargs)
        r = self.r[name]
        sp: SparseAdapter = self.rosa_spa[name]
        has_sparse = sp.has_mask
        if r == 0 and not has_sparse:
            return self.base_layer(x, *args, **kwargs)
        if self.impl[name] == "merged":
            self._sync_base()  # normally a no-op: the pre-hook already did it
            source = MergedSource(self.kind)
        else:
            source = SpAddSource(self.kind)
        bias = getattr(self.base_layer, "bias", None)
        return rosa_linear(
            x,
            self.kind.weight(self.base_layer),
            bias,
            self.lora_A[name].weight if r else None,
            self.lora_B[name].weight if r else None,
            sp.values if has_sparse else None,
            source,
            sp if has_sparse else None,
            self.scaling[name],
            self.lora_dropout[name] if self.training else 0.0,
        )

    # ---- merging -----------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str, include_sparse: bool = True, dtype=torch.float32) -> torch.Tensor:
        """s·B·A (+ dense S) as a dense (out, in) tensor."""
        delta = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.rosa_spa[adapter_name].values.device)
        if self.r.get(adapter_name, 0):
            a = self.lora_A[adapter_name].weight.detach().to(dtype)
            b = self.lora_B[adapter_name].weight.detach().to(dtype)
            delta.addmm_(b, a, alpha=self.scaling[adapter_name])
        sp = self.rosa_spa[adapter_name]
        if include_sparse and sp.has_mask:
            sparse.add_into(delta, sp, sp.values.detach())
        return delta

    @torch.no_grad()
    def merged_weight(self, adapter_name: str) -> torch.Tensor:
        """W0 + S + s·B·A in float32 (any base kind), without touching the layer."""
        w = self.kind.weight(self.base_layer)
        dense = self.kind.to_dense(w, torch.float32).clone()
        in_base = self._synced is not None and self._synced[0] == adapter_name
        if in_base:  # the base already holds W0 + S rounded to its dtype; keep that rounding
            return dense.add_(self.get_delta_weight(adapter_name, include_sparse=False))
        return dense.add_(self.get_delta_weight(adapter_name, include_sparse=True))

    @torch.no_grad()
    def merge(self, adapter_name: Optional[str] = None, safe_merge: bool = False) -> None:
        name = adapter_name or self.active_adapter
        if self.merged_adapters or name not in self.rosa_spa:
            return
        if not self.kind.supports_merged:
            raise ValueError(f"{self.module_name}: a {self.kind.name} base cannot be merged in place; use merge_and_unload()")
        self._sync_base()
        w = self.kind.weight(self.base_layer)
        in_base = self._synced is not None and self._synced[0] == name
        delta = self.get_delta_weight(name, include_sparse=not in_base)
        new = w.float() + delta
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"{self.module_name}: NaN/inf in the merged weight of adapter {name!r}")
        w.copy_(new.to(w.dtype))
        self.merged_adapters.append(name)
        self._merge_in_base = in_base

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        name = self.merged_adapters.pop()
        w = self.kind.weight(self.base_layer)
        delta = self.get_delta_weight(name, include_sparse=not getattr(self, "_merge_in_base", False))
        w.copy_((w.float() - delta).to(w.dtype))
        if self._synced is not None:  # rewrite the mask positions exactly on the next forward
            self._synced = (self._synced[0], None)

    def extra_repr(self) -> str:
        name = self.active_adapter
        return f"adapter={name!r}, r={self.r.get(name)}, impl={self.impl.get(name)}, base={self.kind.name}"


def _sync_pre_hook(module: RosaLinear, args):
    module._sync_base()
