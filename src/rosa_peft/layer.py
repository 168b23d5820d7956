"""RoSA layers: LoRA (B·A) plus a sparse adapter S over a frozen base layer, with PEFT's layer contract.

``RosaLayer`` holds what every RoSA layer shares, in the shape of HF PEFT's ``BaseTunerLayer``: adapters
keyed by name (``lora_A`` / ``lora_B`` / ``rosa_spa``), several active adapters, ``merge(safe_merge,
adapter_names)`` / ``unmerge()`` with ``merged_adapters``, ``enable_adapters``, ``delete_adapter``, mixed
adapter batches (``adapter_names=`` per sample). ``RosaLinear`` wraps ``nn.Linear`` (float or 4-bit) and
transformers' GPT-2 ``Conv1D``; ``RosaEmbedding`` (``embedding.py``) wraps ``nn.Embedding``.

Which base a layer wraps is decided once, by :func:`rosa_peft.bases.resolve_base_kind` (float ``nn.Linear``
and ``Conv1D`` in ``bases/float.py``, the 4-bit kinds in ``bases/torchao_nf4.py`` and ``bases/bnb_4bit.py``).
How ``W + S`` reaches the GEMMs is a *weight source* (``weight_source.py``):

* ``merged`` (default on float bases): the base weight holds ``W0 + S`` at the mask positions and ``W0``
  is kept there only (``rosa_w0``). Before every forward those nnz positions are rewritten from the
  current values — O(nnz), next to an O(out·in·tokens) GEMM — so the result never depends on how the
  values were updated (fused optimizers, ``param.data``, ``no_grad`` writes, ``load_state_dict``). The
  writes go through ``.data`` (no autograd version bump). ``state_dict()`` always presents ``W0``, and
  loading a state dict refreshes ``W0``: nothing outside the layer sees ``W0 + S``, except the live
  base Parameter itself (``named_parameters``), which is the point of the implementation.
* ``sp_add`` (the reference's path, and the only one for quantized bases): a temporary dense
  ``W + S`` is built per call (dequantised first for 4-bit bases) and dropped after the GEMM.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
from torch import nn

from . import sparse

# BASE_KINDS, BaseKind, register_base_kind, FLOAT_LINEAR and the sources: also importable from here (1.x path)
from .bases import BASE_KINDS, BaseKind, base_shape, register_base_kind, resolve_base_kind  # noqa: F401
from .bases.float import CONV1D, FLOAT_LINEAR  # noqa: F401
from .config import RosaConfig
from .function import rosa_linear
from .sparse import SparseAdapter
from .utils.device import is_sharded
from .weight_source import MergedSource, QuantSpmmSource, SpAddSource, SparseOnlySource

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
BASE_ONLY = "__base__"  # the name that selects no adapter in a mixed batch (PEFT's convention)


class _Backup(nn.Module):
    """W0 at the mask positions (merged implementation only); never saved."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.register_buffer("values", values, persistent=False)


# ---- state-dict hooks: the base weight is always presented (and loaded) as W0 ---------------------
def _present_w0(layer: "RosaLayer", state_dict, prefix, local_metadata):
    held = layer._held
    if held is None or layer.merged_adapters:
        return state_dict
    key = prefix + "base_layer.weight"
    if key in state_dict:
        raw = state_dict[key].detach().clone()
        view = raw.t() if layer.kind is CONV1D else raw
        sparse.write_into(view, layer.rosa_spa[held], layer.rosa_w0[held].values)
        state_dict[key] = raw
    return state_dict


def _before_load(layer: "RosaLayer", state_dict, prefix, *args):
    layer._restore_base()  # the base holds W0 exactly while new tensors are copied in


def _after_load(layer: "RosaLayer", incompatible_keys):
    if not layer.merged_adapters:
        layer._refresh_w0()


# ---- the shared layer ------------------------------------------------------------------------------
class RosaLayer(nn.Module):
    """What every RoSA layer shares (PEFT's ``BaseTunerLayer`` contract); subclasses provide the math."""

    adapter_layer_names = ("lora_A", "lora_B", "rosa_spa")
    other_param_names = ("r", "scaling", "lora_dropout", "density", "impl", "init_lora_weights")

    def _setup(self, base_layer: nn.Module, kind, module_name: str, shape: tuple, tied: bool = False) -> None:
        self.base_layer = base_layer
        self.kind = kind
        self.module_name = module_name
        self.out_features, self.in_features = shape
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
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._held: Optional[str] = None  # the adapter whose S lives in the base weight (merged impl)
        self._batch_adapter_names: Optional[list] = None  # set by RosaModel for mixed-batch forwards
        self.tied = tied  # the base weight is shared with another module (e.g. tied input/output embeddings)
        self._register_state_dict_hook(_present_w0)
        self._register_load_state_dict_pre_hook(_before_load, with_module=True)
        self.register_load_state_dict_post_hook(_after_load)

    # ---- pickling: base kinds hold functions, so store the kind by what it matches -----------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["kind"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.kind = resolve_base_kind(self.base_layer)

    # ---- PEFT's layer properties ---------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str:
        return self._active_adapter[0] if self._active_adapter else ""

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    def _adapter_dtype(self, config: RosaConfig) -> torch.dtype:
        if config.adapter_dtype is not None:
            return _DTYPES[config.adapter_dtype]
        dt = self.kind.compute_dtype(self.base_layer)
        return dt if dt.is_floating_point else torch.float32

    def _device(self) -> torch.device:
        return self.kind.weight(self.base_layer).device

    # ---- adapters ----------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: RosaConfig) -> None:
        r = config.rank_for(self.module_name)
        impl = config.impl
        if impl == "auto":
            # 4-bit bases: sp_add (spmm is an option: on CPU its CSR SpMMs made it slower, see docs/qrosa.md)
            impl = "merged" if self.kind.supports_merged and not self.tied else "sp_add"
        elif impl == "spmm" and self.kind.matmul is None:
            raise ValueError(f"{self.module_name}: impl='spmm' needs a 4-bit base with its own matmul; "
                             f"a {self.kind.name} base takes 'merged', 'sp_add' or 'auto'")
        elif impl == "merged" and not self.kind.supports_merged:
            raise ValueError(f"{self.module_name}: impl='merged' cannot edit a {self.kind.name} base in place; use 'sp_add' or 'auto'")
        elif impl == "merged" and self.tied:
            warnings.warn(f"{self.module_name}: its weight is tied to another module (e.g. the output head), "
                          "so impl='merged' would change that module too; using 'sp_add' for this layer",
                          UserWarning, stacklevel=3)
            impl = "sp_add"
        dtype = self._adapter_dtype(config)
        device = self._device()
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling_for(self.module_name)
        self.lora_dropout[adapter_name] = float(config.lora_dropout)
        self.density[adapter_name] = config.density_for(self.module_name)
        self.impl[adapter_name] = impl
        self.init_lora_weights[adapter_name] = config.init_lora_weights
        if r > 0:
            a_in, b_out = self._lora_dims()
            self.lora_A[adapter_name] = nn.Linear(a_in, r, bias=False, dtype=dtype, device=device)
            self.lora_B[adapter_name] = nn.Linear(r, b_out, bias=False, dtype=dtype, device=device)
        self.rosa_spa[adapter_name] = SparseAdapter(
            self.out_features, self.in_features, dtype=dtype, device=device, index_dtype=config.index_dtype
        )
        self.reset_lora_parameters(adapter_name)
        if not self._active_adapter:
            self._active_adapter = [adapter_name]
        self.set_adapter(self._active_adapter)

    def _lora_dims(self) -> tuple[int, int]:
        """(A's input size, B's output size)."""
        return self.in_features, self.out_features

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
                bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)) on (r, fan_in)
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
        self._check_not_merged(adapter_name, "set a mask of")
        self._restore_base()
        init = None
        if self.init_lora_weights[adapter_name] is False:
            nnz = int(mask.sum())
            init = torch.randn(nnz, dtype=sp.values.dtype, device=sp.values.device) * 0.02
        trainable = sp.values.requires_grad
        sp.set_mask(mask, init)
        sp.values.requires_grad_(trainable)
        self._refresh_w0()

    def load_sparse(self, adapter_name: str, row_offsets, col_indices, values) -> None:
        sp: SparseAdapter = self.rosa_spa[adapter_name]
        self._check_not_merged(adapter_name, "load sparse values into")
        self._restore_base()
        trainable = sp.values.requires_grad
        sp.set_csr(row_offsets, col_indices, values)
        sp.values.requires_grad_(trainable)
        self._refresh_w0()

    def _check_not_merged(self, adapter_name: str, verb: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"{self.module_name}: cannot {verb} adapter {adapter_name!r} while it is merged; "
                             "call unmerge_adapter() first")

    @torch.no_grad()
    def _refresh_w0(self) -> None:
        """Re-read W0 at the mask positions of every ``merged``-impl adapter (the base must hold W0)."""
        self._held = None
        for name, sp in self.rosa_spa.items():
            if self.impl.get(name) == "merged" and sp.has_mask:
                w = self._weight_data()
                self.rosa_w0[name] = _Backup(sparse.gather_from(w, sp).clone())
            elif name in self.rosa_w0:
                del self.rosa_w0[name]

    def set_impl(self, adapter_name: str, impl: str) -> None:
        """Switch how ``W + S`` of one adapter reaches the GEMMs (``merged`` / ``sp_add`` / ``spmm``, as
        ``RosaConfig.impl``); same outputs, the base weight holds plain W0 afterwards until the next forward.
        Before sharding a model with FSDP2, switch to ``sp_add`` (``RosaModel.set_impl``)."""
        impl = self.resolve_impl(adapter_name, impl)
        self._restore_base()
        self.impl[adapter_name] = impl
        self._refresh_w0()

    def resolve_impl(self, adapter_name: str, impl: str) -> str:
        """The implementation :meth:`set_impl` would install (``auto`` resolved); raises, naming this layer,
        if this layer cannot take it. Changes nothing."""
        if adapter_name not in self.rosa_spa:
            raise ValueError(f"{self.module_name}: no adapter named {adapter_name!r}")
        self._check_not_merged(adapter_name, "change the implementation of")
        if impl == "auto":
            impl = "merged" if self.kind.supports_merged and not self.tied else "sp_add"
        if impl not in ("merged", "sp_add", "spmm"):
            raise ValueError(f"impl must be 'auto', 'merged', 'sp_add' or 'spmm', got {impl!r}")
        if impl == "spmm" and self.kind.matmul is None:
            raise ValueError(f"{self.module_name}: impl='spmm' needs a 4-bit base with its own matmul")
        if impl == "merged" and (not self.kind.supports_merged or self.tied):
            raise ValueError(f"{self.module_name}: impl='merged' cannot edit this base weight in place; use 'sp_add'")
        return impl

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; a merged one is unmerged first (the others merged stay merged)."""
        if adapter_name not in self.rosa_spa:
            return
        remerge = None
        if adapter_name in self.merged_adapters:
            remerge = [n for n in self.merged_adapters if n != adapter_name]
            self.unmerge()
        if self._held == adapter_name:
            self._restore_base()
        for d in (self.lora_A, self.lora_B, self.rosa_spa, self.rosa_w0):
            if adapter_name in d:
                del d[adapter_name]
        for d in (self.r, self.scaling, self.lora_dropout, self.density, self.impl, self.init_lora_weights):
            d.pop(adapter_name, None)
        if adapter_name in self._active_adapter:
            rest = [n for n in self._active_adapter if n != adapter_name]
            if not rest and len(self.rosa_spa):
                rest = [next(iter(self.rosa_spa))]
            self._active_adapter = rest
            if rest:
                self.set_adapter(rest)
        if remerge:
            self.merge(adapter_names=remerge)

    def set_adapter(self, adapter_names: Union[str, list], trainable: bool = True) -> None:
        """Activate one or several adapters; only active adapters are trainable (PEFT's semantics)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.rosa_spa:
            on = trainable and name in names
            for mod in (self.lora_A, self.lora_B, self.rosa_spa):
                if name in mod:
                    mod[name].requires_grad_(on)
        self._active_adapter = names

    def set_requires_grad(self, adapter_names: Union[str, list], requires_grad: bool = True) -> None:
        """PEFT's: the named adapters' LoRA factors and sparse values (those this layer has) get ``requires_grad``."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            for mod in (self.lora_A, self.lora_B, self.rosa_spa):
                if name in mod:
                    mod[name].requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's ``enable_adapters``: disabled layers run the base alone (a merged adapter is unmerged
        at the next forward)."""
        if enabled:
            self.set_adapter(self._active_adapter)
            self._disable_adapters = False
        else:
            for layer_name in self.adapter_layer_names:
                getattr(self, layer_name).requires_grad_(False)
            self._disable_adapters = True

    # ---- keeping the base weight in step with S (merged implementation) ------------------------------
    def _weight_data(self) -> torch.Tensor:
        """The (out, in) view of the base weight's ``.data`` (writes through it bump no version)."""
        return self.kind.weight(self.base_layer).data

    def _wanted_in_base(self) -> Optional[str]:
        if self._disable_adapters or self.merged_adapters or self._batch_adapter_names is not None:
            return None
        for name in self._active_adapter:
            if name in self.rosa_spa and self.impl.get(name) == "merged" and self.rosa_spa[name].has_mask:
                return name
        return None

    @torch.no_grad()
    def _restore_base(self) -> None:
        """Write W0 back at the positions of the adapter currently held in the base weight."""
        name = self._held
        if name is None:
            return
        if name in self.rosa_w0:
            sparse.write_into(self._weight_data(), self.rosa_spa[name], self.rosa_w0[name].values)
        self._held = None

    @torch.no_grad()
    def _sync_base(self) -> None:
        """Make the base weight hold exactly W0 + S(current values) for the wanted adapter, O(nnz)."""
        if self.merged_adapters:
            return
        wanted = self._wanted_in_base()
        if self._held is not None and self._held != wanted:
            self._restore_base()
        if wanted is None:
            return
        if is_sharded(self.kind.weight(self.base_layer)):
            raise RuntimeError(
                f"{self.module_name}: the base weight is sharded (FSDP2 DTensor), and impl='merged' writes W0 + S "
                "into it, which FSDP re-gathers without it for backward; call model.set_impl('sp_add') before "
                "fully_shard (or use RosaConfig(impl='sp_add'))")
        sp = self.rosa_spa[wanted]
        w0 = self.rosa_w0[wanted].values
        if w0.device != sp.values.device or w0.numel() != sp.nnz:  # moved or re-masked outside our verbs
            self._refresh_w0()
            w0 = self.rosa_w0[wanted].values
        sparse.write_into(self._weight_data(), sp, w0 + sp.values.detach().to(w0.dtype))
        self._held = wanted

    @torch.no_grad()
    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A fresh dense copy of W0 as (out, in) in ``dtype`` (dequantised for 4-bit bases), whatever the
        layer holds in its base weight right now (merged adapters excluded: those are part of the base)."""
        w = self.kind.to_dense(self.kind.weight(self.base_layer), dtype)
        w = w if self.kind.fresh_dense else w.clone(memory_format=torch.contiguous_format)
        held = self._held
        if held is not None and not self.merged_adapters:
            sparse.write_into(w, self.rosa_spa[held], self.rosa_w0[held].values.to(dtype))
        return w

    def weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dL/dW (out, in) of the base weight for the layer input ``x`` and output gradient (mask scoring)."""
        g = grad_out.detach().reshape(-1, grad_out.shape[-1]).to(dtype)
        return g.t() @ x.detach().reshape(-1, x.shape[-1]).to(dtype)

    # ---- forward -----------------------------------------------------------------------------------
    def _runs(self, name: str) -> bool:
        return name in self.rosa_spa and (self.r[name] > 0 or self.rosa_spa[name].has_mask)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            adapter_names = self._batch_adapter_names
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            self._sync_base()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if self.merged_adapters:
                raise ValueError("cannot pass adapter_names while adapters are merged; call unmerge_adapter() first")
            return self._mixed_batch_forward(x, list(adapter_names), *args, **kwargs)
        if self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        self._sync_base()
        active = [n for n in self._active_adapter if self._runs(n)]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        first = self._held if self._held in active else active[0]
        out = self._adapter_forward(x, first, with_base=True)
        for name in active:
            if name != first:
                out = out + self._adapter_forward(x, name, with_base=False).to(out.dtype)
        return out

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list, *args, **kwargs) -> torch.Tensor:
        """Each sample through its own adapter (``"__base__"``: none), as PEFT's mixed adapter batches."""
        self._restore_base()
        n = x.shape[0]
        if len(adapter_names) != n:
            if len(adapter_names) and n % len(adapter_names) == 0:  # e.g. generate(num_return_sequences=k)
                k = n // len(adapter_names)
                adapter_names = [a for a in adapter_names for _ in range(k)]
            else:
                raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {n}")
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            if name == BASE_ONLY or not self._runs(name):
                continue
            idx = torch.tensor([i for i, a in enumerate(adapter_names) if a == name], device=x.device)
            delta = self._adapter_forward(x.index_select(0, idx), name, with_base=False)
            result = result.index_add(0, idx, delta.to(result.dtype))
        return result

    def _adapter_forward(self, x: torch.Tensor, name: str, with_base: bool) -> torch.Tensor:
        raise NotImplementedError

    # ---- merging -----------------------------------------------------------------------------------
    def _lora_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """s·B·A as the (out, in) weight delta."""
        a = self.lora_A[name].weight.detach().to(dtype)
        b = self.lora_B[name].weight.detach().to(dtype)
        return (b @ a).mul_(self.scaling[name])

    def get_delta_weight(self, adapter_name: str, include_sparse: bool = True, dtype=torch.float32) -> torch.Tensor:
        """s·B·A (+ dense S) as a dense (out, in) tensor."""
        device = self.rosa_spa[adapter_name].values.device
        if self.r.get(adapter_name, 0):
            delta = self._lora_delta(adapter_name, dtype).to(device)
        else:
            delta = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=device)
        sp = self.rosa_spa[adapter_name]
        if include_sparse and sp.has_mask:
            sparse.add_into(delta, sp, sp.values.detach())
        return delta

    @torch.no_grad()
    def merged_weight(self, adapter_names: Union[str, list, None] = None) -> torch.Tensor:
        """W0 + Σ (S + s·B·A) in float32 (any base kind), without touching the layer."""
        names = self._merge_names(adapter_names, warn=False)
        dense = self.base_weight(torch.float32)
        for name in names:
            dense.add_(self.get_delta_weight(name).to(dense.device))
        return dense

    def _merge_names(self, adapter_names, warn: bool = True) -> list[str]:
        if adapter_names is None:
            adapter_names = self._active_adapter
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        names = [n for n in adapter_names if n in self.rosa_spa]
        if not warn or not self.merged_adapters:
            return names
        todo = [n for n in names if n not in self.merged_adapters]
        if todo:
            warnings.warn(f"{self.module_name or 'layer'}: adapters {', '.join(self.merged_adapters)} are already "
                          f"merged; now also merging {', '.join(todo)}", UserWarning, stacklevel=3)
        else:
            warnings.warn(f"{self.module_name or 'layer'}: all of {', '.join(names)} are already merged; nothing to do",
                          UserWarning, stacklevel=3)
        return todo

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        """Add s·B·A + S of the given (default: active) adapters into the base weight (PEFT's ``merge``)."""
        if isinstance(safe_merge, str):  # the old positional form merge(adapter_name)
            safe_merge, adapter_names = False, [safe_merge]
        names = self._merge_names(adapter_names)
        if not names:
            return
        if not self.kind.supports_merged:
            raise ValueError(f"{self.module_name}: a {self.kind.name} base cannot be merged in place; use merge_and_unload()")
        if self.tied:
            warnings.warn(f"{self.module_name}: merging into a weight that is tied to another module changes that "
                          "module too (as in PEFT); untie the weights first to merge this layer alone",
                          UserWarning, stacklevel=3)
        self._restore_base()
        w = self._weight_data()
        for name in names:
            new = w.to(torch.float32) + self.get_delta_weight(name).to(w.device)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"{self.module_name}: NaN/inf in the merged weight of adapter {name!r}; "
                                 "the adapter seems to be broken")
            w.copy_(new.to(w.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter again (latest first)."""
        if not self.merged_adapters:
            return
        w = self._weight_data()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w.copy_((w.to(torch.float32) - self.get_delta_weight(name).to(w.device)).to(w.dtype))
        self._held = None

    def extra_repr(self) -> str:
        name = self.active_adapter
        return f"adapter={name!r}, r={self.r.get(name)}, impl={self.impl.get(name)}, base={self.kind.name}"


class RosaLinear(RosaLayer):
    """RoSA over a Linear-like base: ``nn.Linear`` (float or 4-bit) or GPT-2 ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RosaConfig, module_name: str = "",
                 tied: bool = False):
        super().__init__()
        kind = resolve_base_kind(base_layer)
        if kind is None:
            raise TypeError(f"{module_name or type(base_layer).__name__}: cannot wrap {type(base_layer).__name__}")
        self._setup(base_layer, kind, module_name, base_shape(kind, base_layer), tied)
        self.update_layer(adapter_name, config)

    def _adapter_forward(self, x: torch.Tensor, name: str, with_base: bool) -> torch.Tensor:
        r = self.r[name]
        sp: SparseAdapter = self.rosa_spa[name]
        has_sparse = sp.has_mask
        dropout = self.lora_dropout[name] if self.training else 0.0
        if with_base:
            if self._held == name:
                source = MergedSource(self.kind)
            elif self.impl[name] == "spmm" and self.kind.matmul is not None:
                source = QuantSpmmSource(self.kind)
            else:
                source = SpAddSource(self.kind)
            bias = getattr(self.base_layer, "bias", None)
        elif not has_sparse:  # LoRA alone: plain autograd
            a, b = self.lora_A[name], self.lora_B[name]
            xl = nn.functional.dropout(x.to(a.weight.dtype), dropout, self.training)
            return b(a(xl)) * self.scaling[name]
        else:
            source, bias = SparseOnlySource(), None
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
            dropout,
        )
