"""RosaModel: wrap a model with RoSA adapters; the PEFT verbs for adapters, merging, saving and loading.

The verbs follow HF PEFT's ``PeftModel`` / ``LoraModel`` so a PEFT user recognises them and gets the same
semantics: ``get_rosa_model``, ``print_trainable_parameters``, ``save_pretrained`` / ``from_pretrained`` /
``load_adapter``, ``add_adapter`` / ``set_adapter`` (one name or several) / ``delete_adapter``,
``disable_adapter()`` and ``enable_adapter_layers`` / ``disable_adapter_layers``, ``merge_adapter`` /
``unmerge_adapter`` / ``merge_and_unload`` / ``unload``, ``add_weighted_adapter``, mixed adapter batches
(``adapter_names=`` in ``forward`` / ``generate``), ``get_layer_status`` / ``get_model_status``,
``modules_to_save`` and ``layers_to_transform``. A PEFT keyword that has no meaning here raises naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import hub, modelcard
from .bases import base_shape, resolve_base_kind
from .config import CONFIG_NAME, RosaConfig
from .embedding import RosaEmbedding
from .labelled_loss import check_reduction, labelled_loss, sequence_mean_nll
from .layer import BASE_ONLY, RosaLayer, RosaLinear
from .sparse.storage import SHARDED_MASK_FIX
from .modules_to_save import (
    SEP,
    ModulesToSaveWrapper,
    find_modules_to_save,
    load_modules_to_save_state,
    modules_to_save_state_dict,
    modules_to_save_wrappers,
    unwrap_modules_to_save,
    wrap_modules_to_save,
)
from .targets import find_targets_for
from .utils.checks import UserError
from .utils.device import is_sharded
from .utils.io import atomic_save_safetensors
from .utils.model_loading import _ALIASES

WEIGHTS_NAME = "adapter_model.safetensors"
_PARTS = ("lora_A.weight", "lora_B.weight", "rosa_spa.values", "rosa_spa.row_offsets", "rosa_spa.col_indices")
_SAVE_PART = ".modules_to_save."


def _reject(verb: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{verb}() got unsupported keyword argument(s): {', '.join(sorted(kwargs))}")


def _layer_for(module: nn.Module, adapter_name: str, config: RosaConfig, name: str, tied: bool) -> RosaLayer:
    if isinstance(module, nn.Embedding):
        return RosaEmbedding(module, adapter_name, config, module_name=name, tied=tied)
    return RosaLinear(module, adapter_name, config, module_name=name, tied=tied)


def _shared_weight_ids(model: nn.Module) -> set[int]:
    """ids of weights that more than one module holds (tied embeddings / output heads)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def _module_shape(module: nn.Module) -> tuple:
    """(out, in) of the weight a RoSA layer over ``module`` adapts."""
    if isinstance(module, RosaLayer):
        return (module.out_features, module.in_features)
    if isinstance(module, nn.Embedding):
        return tuple(module.weight.shape)
    kind = resolve_base_kind(module)
    return base_shape(kind, module) if kind is not None else (module.out_features, module.in_features)


def _base_name_of(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


@dataclasses.dataclass
class TunerLayerStatus:
    """One adapted layer, as PEFT's ``get_layer_status`` reports it."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list
    merged_adapters: list
    requires_grad: dict
    available_adapters: list
    devices: dict


@dataclasses.dataclass
class TunerModelStatus:
    """The whole model, as PEFT's ``get_model_status`` reports it (``"irregular"`` where layers disagree)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Any
    active_adapters: Any
    merged_adapters: Any
    requires_grad: dict
    available_adapters: list
    devices: dict


try:  # torch builds without distributed support have no FSDP2
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # pragma: no cover
    _FSDPModule = None


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (FSDP2 DTensor: a collective every process must join)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class RosaModel(nn.Module):
    """A transformers (or any torch) model with RoSA adapters injected in place."""

    def __init__(self, model: nn.Module, config: RosaConfig, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, RosaConfig] = {}
        self._active: list[str] = [adapter_name]
        self._inject(adapter_name, config)
        # HF Trainer reads forward's signature to pick dataset columns: expose the base model's.
        self.__dict__["forward"] = functools.update_wrapper(functools.partial(type(self).forward, self), model.forward)

    # ---- injection -----------------------------------------------------------------------------------
    def _inject(self, adapter_name: str, config: RosaConfig) -> None:
        if not isinstance(config, RosaConfig):
            raise TypeError(f"config must be a RosaConfig, got {type(config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_ONLY or "." in adapter_name:
            raise ValueError(f"invalid adapter name {adapter_name!r}")
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = _base_name_of(self.model)
        names = find_targets_for(self.model, config)  # validates first
        layers = [self.model.get_submodule(n) for n in names]
        for name, module in zip(names, layers):
            out_f, in_f = _module_shape(module)
            if config.index_dtype == "int16" and in_f > 32768:
                raise UserError(f"index_dtype='int16' cannot address the {in_f} columns of {name!r}")
        if not self.peft_config:  # first adapter: freeze the base model
            for p in self.model.parameters():
                p.requires_grad_(False)
        shared = _shared_weight_ids(self.model)
        for name, module in zip(names, layers):
            if isinstance(module, RosaLayer):
                module.update_layer(adapter_name, config)
            else:
                tied = id(getattr(module, "weight", None)) in shared
                self.model.set_submodule(name, _layer_for(module, adapter_name, config, name, tied))
        if config.modules_to_save:
            wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        active = [a for a in self._active if a in self.peft_config] or [adapter_name]
        self.set_adapter(active if len(active) > 1 else active[0])

    def rosa_layers(self) -> Iterator[tuple[str, RosaLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, RosaLayer):
                yield name, module

    # ---- pass-through ----------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "peft_config", "_active") or name.startswith("__"):
                raise
            return getattr(self.model, name)

    @property
    def base_model(self) -> "RosaModel":
        """PEFT's ``PeftModel.base_model`` is the tuner holding ``.model``; here that is this object."""
        return self

    def get_base_model(self) -> nn.Module:
        return self.model

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names):
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str):
            raise ValueError("adapter_names must be a list with one adapter name per sample, not a string")
        unknown = sorted({a for a in adapter_names if a != BASE_ONLY and a not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names names unknown adapter(s): {', '.join(unknown)}; "
                             f"have {sorted(self.peft_config)} (and {BASE_ONLY!r} for none)")
        if any(layer.merged_adapters for _, layer in self.rosa_layers()):
            raise ValueError("cannot pass adapter_names while adapters are merged; call unmerge_adapter() first")
        layers = [layer for _, layer in self.rosa_layers()]
        wrappers = list(modules_to_save_wrappers(self.model).values())
        try:
            for module in layers + wrappers:
                module._batch_adapter_names = list(adapter_names)
            yield
        finally:
            for module in layers + wrappers:
                module._batch_adapter_names = None
            for layer in layers:
                layer._sync_base()

    def forward(self, *args, adapter_names: Optional[list] = None, loss_only: bool = False,
                loss_reduction: str = "token", **kwargs):
        """The wrapped model's forward. ``loss_only=True`` (with ``labels``): return only the loss, with
        the output head run at the labelled positions alone (``labelled_loss``; ``logits`` is None), the
        same value as the full forward's; models or inputs it is not exact for run the full forward.
        ``loss_reduction="sequence"`` (with ``loss_only``): the loss is instead averaged per sequence
        (``labelled_loss.sequence_mean_nll``, the reference's loss), on either path."""
        self._refuse_merged_under_fsdp()
        check_reduction(loss_reduction)
        if loss_reduction == "sequence" and not (loss_only and kwargs.get("labels") is not None):
            raise ValueError("loss_reduction='sequence' needs loss_only=True and labels")
        if loss_only and not args and adapter_names is None:
            loss = labelled_loss(self.model, kwargs, reduction=loss_reduction)
            if loss is not None:
                return CausalLMOutputWithPast(loss=loss)
        if loss_reduction == "sequence":
            labels = kwargs.pop("labels")
            kwargs.pop("num_items_in_batch", None)
            with self._mixed_batch(adapter_names):
                out = self.model(*args, **kwargs)
            out.loss = sequence_mean_nll(out.logits, labels)
            return out
        with self._mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[list] = None, **kwargs):
        self._refuse_merged_under_fsdp()
        with self._mixed_batch(adapter_names):
            return self.model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs):
        kw = {"use_reentrant": False}
        kw.update(gradient_checkpointing_kwargs or {})
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)
        if kw.get("use_reentrant") and hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None, **kwargs):
        """transformers 5's name for :meth:`gradient_checkpointing_enable` (non-reentrant by default)."""
        self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the adapter files only (what ``save_pretrained`` writes), never the base model."""
        return hub.push_adapter_to_hub(self.save_pretrained, repo_id, **kwargs)

    # ---- adapters ----------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: RosaConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter (not made active, as in PEFT). ``low_cpu_mem_usage`` is accepted; the
        adapter is small next to the base and is created directly on the base's device."""
        self._inject(adapter_name, peft_config)

    @property
    def active_adapter(self) -> Union[str, list]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_peft_config(self) -> RosaConfig:
        return self.peft_config[self._active[0]]

    def _known_names(self, adapter_names: Union[str, list], verb: str) -> list[str]:
        """``adapter_names`` (one name or several) as a non-empty list of existing adapters, else ValueError."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if not names:
            raise ValueError(f"{verb} needs at least one adapter name")
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; have {sorted(self.peft_config)}")
        return names

    def set_adapter(self, adapter_name: Union[str, list], inference_mode: bool = False) -> None:
        """Activate one adapter, or several at once (their deltas add up). Active adapters are trainable
        unless their config says ``inference_mode`` (or ``inference_mode=True`` is passed)."""
        names = self._known_names(adapter_name, "set_adapter")
        trainable = not inference_mode and not any(self.peft_config[n].inference_mode for n in names)
        self._active = names
        for _, layer in self.rosa_layers():
            layer.set_adapter([n for n in names if n in layer.rosa_spa] or names, trainable=trainable)
        for wrapper in modules_to_save_wrappers(self.model).values():
            wrapper.set_adapter(names, trainable=trainable)

    def set_requires_grad(self, adapter_names: Union[str, list], requires_grad: bool = True) -> None:
        """PEFT's ``set_requires_grad``: turn the gradients of the named adapters' LoRA factors, sparse values
        and ``modules_to_save`` copies on or off, active or not; other adapters and the base are left as they
        are. ``set_adapter`` and ``set_masks`` (which creates the sparse values) set the flags anew: the active
        adapters trainable, unless in inference mode."""
        names = self._known_names(adapter_names, "set_requires_grad")
        for _, layer in self.rosa_layers():
            layer.set_requires_grad(names, requires_grad)
        for wrapper in modules_to_save_wrappers(self.model).values():
            wrapper.set_requires_grad(names, requires_grad)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """PEFT's: False inside ``disable_adapter()`` (and here also after ``disable_adapter_layers()``) or when
        no adapter is active."""
        return bool(self._active) and any(not layer.disable_adapters for _, layer in self.rosa_layers())

    @property
    def modules_to_save(self) -> Optional[set]:
        """PEFT's: the names in every adapter's ``modules_to_save``, or None if there are none."""
        names = {n for cfg in self.peft_config.values() for n in (cfg.modules_to_save or ())}
        return names or None

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        """PEFT's: the wrapped model's ``dtype`` (None for a module without one)."""
        return getattr(self.model, "dtype", None)

    def _refuse_merged_under_fsdp(self) -> None:
        """FSDP2 shards the base weights and gathers them again for backward, without the W0 + S that the
        ``merged`` implementation writes in forward: gradients would be silently wrong, so refuse."""
        if _FSDPModule is None or not any(isinstance(m, _FSDPModule) for m in self.model.modules()):
            return
        for key, layer in self.rosa_layers():
            if any(layer.impl.get(n) == "merged" and sp.has_mask for n, sp in layer.rosa_spa.items()):
                raise RuntimeError(
                    f"{key}: the model is sharded with FSDP2, and impl='merged' writes W0 + S into the base weight, "
                    "which FSDP re-gathers without it for backward; call model.set_impl('sp_add') before "
                    "fully_shard (or use RosaConfig(impl='sp_add'))")

    def set_impl(self, impl: str, adapter_name: Optional[str] = None) -> None:
        """Switch every layer of an adapter (default: the active ones) to ``impl`` (``RosaConfig.impl``:
        ``auto`` / ``merged`` / ``sp_add`` / ``spmm``); outputs are unchanged. Call ``set_impl("sp_add")``
        before sharding with FSDP2 (``fully_shard``): ``merged`` edits the base weight, which FSDP shards.
        All or nothing: if one layer cannot take ``impl`` (e.g. ``merged`` on a tied or 4-bit weight), the
        error names it and no layer is switched."""
        names = list(self._active) if adapter_name is None else [adapter_name]
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; have {sorted(self.peft_config)}")
        # every layer is checked before any changes: a layer that cannot take impl leaves the model as it was
        plan = [(layer, name, layer.resolve_impl(name, impl))
                for _, layer in self.rosa_layers() for name in names if name in layer.rosa_spa]
        for layer, name, resolved in plan:
            layer.set_impl(name, resolved)
        for name in names:
            self.peft_config[name].impl = impl

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; a merged one is unmerged first, so nothing of it stays in the base."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; have {sorted(self.peft_config)}")
        for _, layer in self.rosa_layers():
            layer.delete_adapter(adapter_name)
        for wrapper in modules_to_save_wrappers(self.model).values():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        rest = [a for a in self._active if a != adapter_name]
        if not rest and self.peft_config:
            rest = [next(iter(self.peft_config))]
        self._active = rest
        if rest:
            self.set_adapter(rest if len(rest) > 1 else rest[0])

    def _set_enabled(self, enabled: bool) -> None:
        for _, layer in self.rosa_layers():
            layer.enable_adapters(enabled)
            layer._sync_base()
        for wrapper in modules_to_save_wrappers(self.model).values():
            wrapper.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_enabled(True)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone until :meth:`enable_adapter_layers` (merged adapters get unmerged)."""
        for _, layer in self.rosa_layers():
            layer.unmerge()
        self._set_enabled(False)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model inside the block; adapters come back afterwards, also on an exception.
        As in PEFT, a merged adapter is unmerged (and stays unmerged) when disabled."""
        layers = [layer for _, layer in self.rosa_layers()]
        previous = [layer.disable_adapters for layer in layers]
        wrappers = list(modules_to_save_wrappers(self.model).values())
        wrapper_prev = [w.disable_adapters for w in wrappers]
        try:
            self.disable_adapter_layers()
            yield
        finally:
            for layer, prev in zip(layers, previous):
                layer.enable_adapters(not prev)
                layer._sync_base()
            for wrapper, prev in zip(wrappers, wrapper_prev):
                wrapper.enable_adapters(not prev)

    # ---- masks -----------------------------------------------------------------------------------------
    def set_masks(self, masks: dict[str, torch.Tensor], adapter_name: Optional[str] = None) -> None:
        """Install sparse masks: {module name: bool tensor of the weight's shape}. Validated before any change.
        Not on a model sharded with FSDP2: set the masks first, then ``fully_shard`` (RuntimeError)."""
        name = adapter_name or self._active[0]
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; have {sorted(self.peft_config)}")
        layers = dict(self.rosa_layers())
        sharded = next((k for k in masks if k in layers and name in layers[k].rosa_spa
                        and is_sharded(layers[k].rosa_spa[name].values)), None)
        if sharded is not None:
            raise RuntimeError(f"{sharded}: the model is sharded with FSDP2, which owns the sparse values' "
                               f"parameter; {SHARDED_MASK_FIX}")
        unknown = sorted(set(masks) - set(layers))
        if unknown:
            raise UserError(f"masks name modules that carry no RoSA adapter: {', '.join(unknown[:5])}"
                             f"{' ...' if len(unknown) > 5 else ''}")
        selected = 0
        for key, mask in masks.items():
            if not isinstance(mask, torch.Tensor):
                raise UserError(f"mask for {key!r} is a {type(mask).__name__}, not a tensor")
            if name not in layers[key].rosa_spa:
                raise UserError(f"layer {key!r} carries no adapter {name!r}")
            shape = (layers[key].out_features, layers[key].in_features)
            if tuple(mask.shape) != shape:
                raise UserError(f"mask for {key!r} has shape {tuple(mask.shape)}, the weight is {shape}")
            if name in layers[key].merged_adapters:
                raise ValueError(f"adapter {name!r} is merged in {key!r}; call unmerge_adapter() first")
            nnz = int(mask.count_nonzero())
            if nnz == mask.numel():
                raise UserError(f"mask for {key!r} selects all {nnz} entries of the {shape[0]}x{shape[1]} weight; "
                                 "a sparse adapter's density must be < 1")
            selected += nnz
        if masks and selected == 0 and self.peft_config[name].density > 0:
            raise UserError(f"masks select no entry in any layer ({len(masks)} layers, e.g. {next(iter(masks))!r}) "
                             f"although adapter {name!r} has density {self.peft_config[name].density:g}")
        for key, mask in masks.items():
            layers[key].set_mask(name, mask)
        self.set_adapter(self.active_adapter)

    def get_masks(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        name = adapter_name or self._active[0]
        return {k: layer.rosa_spa[name].to_mask() for k, layer in self.rosa_layers()
                if name in layer.rosa_spa and layer.rosa_spa[name].has_mask}

    # ---- parameters ----------------------------------------------------------------------------------
    def _adapter_param_ids(self) -> set[int]:
        ids = set()
        for _, layer in self.rosa_layers():
            for layer_name in layer.adapter_layer_names:
                ids.update(id(p) for p in getattr(layer, layer_name).parameters())
        for wrapper in modules_to_save_wrappers(self.model).values():
            ids.update(id(p) for p in wrapper.modules_to_save.parameters())
        return ids

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        adapter = self._adapter_param_ids()
        total = sum(p.numel() for p in self.parameters() if id(p) not in adapter)
        return trainable, total + trainable

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        name = self._active[0]
        lora = sum(l.lora_A[name].weight.numel() + l.lora_B[name].weight.numel()
                   for _, l in self.rosa_layers() if name in l.lora_A)
        sparse_n = sum(l.rosa_spa[name].nnz for _, l in self.rosa_layers() if name in l.rosa_spa)
        pending = ""
        if sparse_n == 0 and self.peft_config[name].density > 0:
            pending = " (sparse masks not set yet: the adapter is LoRA-only until set_masks)"
        print(f"trainable params: {trainable:,} (lora {lora:,} + sparse {sparse_n:,}) || all params: {total:,} "
              f"|| trainable%: {100 * trainable / max(1, total):.4f}{pending}")

    # ---- status --------------------------------------------------------------------------------------
    def get_layer_status(self) -> list[TunerLayerStatus]:
        out = []
        for name, layer in self.rosa_layers():
            grads = {}
            for adapter in layer.rosa_spa:
                flags = {p.requires_grad for ln in layer.adapter_layer_names
                         for key, mod in getattr(layer, ln).items() if key == adapter for p in mod.parameters()}
                grads[adapter] = flags.pop() if len(flags) == 1 else ("irregular" if flags else False)
            devices = {adapter: sorted({p.device.type for ln in layer.adapter_layer_names
                                        for key, mod in getattr(layer, ln).items() if key == adapter
                                        for p in mod.parameters()}) for adapter in layer.rosa_spa}
            out.append(TunerLayerStatus(
                name=name, module_type=f"rosa.{type(layer).__name__}", enabled=not layer.disable_adapters,
                active_adapters=layer.active_adapters, merged_adapters=list(layer.merged_adapters),
                requires_grad=grads, available_adapters=sorted(layer.rosa_spa), devices=devices))
        return out

    def get_model_status(self) -> TunerModelStatus:
        layers = self.get_layer_status()
        trainable, total = self.get_nb_trainable_parameters()

        def agree(values):
            values = [tuple(v) if isinstance(v, list) else v for v in values]
            if not values:
                return []
            first = values[0]
            if all(v == first for v in values):
                return list(first) if isinstance(first, tuple) else first
            return "irregular"

        grads: dict = {}
        for st in layers:
            for adapter, flag in st.requires_grad.items():
                grads[adapter] = flag if grads.get(adapter, flag) == flag else "irregular"
        devices: dict = {}
        for st in layers:
            for adapter, devs in st.devices.items():
                devices[adapter] = sorted(set(devices.get(adapter, [])) | set(devs))
        return TunerModelStatus(
            base_model_type=type(self.model).__name__, adapter_model_type=type(self).__name__,
            peft_types={k: c.peft_type for k, c in self.peft_config.items()},
            trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
            enabled=agree([st.enabled for st in layers]), active_adapters=agree([st.active_adapters for st in layers]),
            merged_adapters=agree([st.merged_adapters for st in layers]), requires_grad=grads,
            available_adapters=sorted(self.peft_config), devices=devices)

    # ---- state ---------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        name = adapter_name or self._active[0]
        out = {}
        for key, layer in self.rosa_layers():
            if name not in layer.rosa_spa:
                continue
            if name in layer.lora_A:
                out[f"{key}.lora_A.weight"] = _full(layer.lora_A[name].weight.detach())
                out[f"{key}.lora_B.weight"] = _full(layer.lora_B[name].weight.detach())
            sp = layer.rosa_spa[name]
            if sp.has_mask:
                out[f"{key}.rosa_spa.values"] = _full(sp.values.detach())
                out[f"{key}.rosa_spa.row_offsets"] = sp.row_offsets
                out[f"{key}.rosa_spa.col_indices"] = sp.col_indices
        out.update(modules_to_save_state_dict(self.model, name))
        return out

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers: Union[str, bool] = "auto",
                        is_main_process: bool = True, **kwargs) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` + ``README.md`` (a sub-folder per
        extra adapter, as PEFT). Only safetensors are written: ``safe_serialization=False`` is refused."""
        _reject("save_pretrained", kwargs)
        if safe_serialization is not True:
            raise ValueError("save_pretrained: safe_serialization=False is not supported; rosa-peft writes "
                             "safetensors only (never pickle)")
        if save_embedding_layers not in ("auto", False):
            raise ValueError(f"save_pretrained: save_embedding_layers={save_embedding_layers!r} is not supported; "
                             "target the embedding layer or list it in modules_to_save to save it")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"save_pretrained: selected_adapters names unknown adapter(s) {unknown}; "
                             f"have {sorted(self.peft_config)}")
        # every process gathers (sharded FSDP2 parameters are collected with a collective), one writes
        states = {name: self.adapter_state_dict(name) for name in names}
        if not is_main_process:
            return
        for name in names:
            target = save_directory if name == "default" or (len(names) == 1 and selected_adapters is None) \
                else os.path.join(save_directory, name)
            os.makedirs(target, exist_ok=True)
            atomic_save_safetensors(states[name], os.path.join(target, WEIGHTS_NAME),
                                    metadata={"format": "pt", "rosa_peft": "1"})
            config = self._config_as_saved(name)
            config.save_pretrained(target)
            modelcard.write_model_card(target, base_model=config.base_model_name_or_path, adapter_names=[name],
                                       configs={name: config.to_dict()})

    def _config_as_saved(self, name: str) -> RosaConfig:
        """The adapter's config, with exact per-layer ``density_pattern`` entries for layers whose installed
        mask holds more entries than the config's density gives (masks computed with another density, or
        one global budget): the saved config then describes the saved tensors, and loading checks pass."""
        config = self.peft_config[name]
        extra = {}
        for key, layer in self.rosa_layers():
            sp = layer.rosa_spa[name] if name in layer.rosa_spa else None
            if sp is None or not sp.has_mask:
                continue
            numel = layer.out_features * layer.in_features
            if sp.nnz > math.ceil(config.density_for(key) * numel):
                extra[rf"{re.escape(key)}"] = sp.nnz / numel
        if not extra:
            return config
        return dataclasses.replace(config, density_pattern={**extra, **config.density_pattern})

    def load_adapter(self, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     low_cpu_mem_usage: bool = False, config: Optional[RosaConfig] = None, **kwargs) -> None:
        """Add an adapter saved by ``save_pretrained`` (a local folder or a Hub id) under ``adapter_name``."""
        adapter_dir = _resolve(model_id, kwargs, "load_adapter")
        config = _load_config(adapter_dir, config, is_trainable, autocast_adapter_dtype)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        _check_base_name(self.model, config, os.path.join(adapter_dir, CONFIG_NAME))
        state = _read_adapter_file(adapter_dir, torch_device)
        _check_state_fits(self.model, config, state, os.path.join(adapter_dir, WEIGHTS_NAME))
        self._inject(adapter_name, config)
        self._load_state(state, adapter_name)
        self.set_adapter(self.active_adapter)

    def load_adapter_weights(self, adapter_dir: str, adapter_name: Optional[str] = None) -> None:
        """Overwrite an existing adapter's A, B, masks and sparse values from a saved directory."""
        name = adapter_name or self._active[0]
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; have {sorted(self.peft_config)}")
        state = _read_adapter_file(adapter_dir)
        _check_state_fits(self.model, self.peft_config[name], state, os.path.join(adapter_dir, WEIGHTS_NAME))
        self._load_state(state, name)

    def _load_state(self, state: dict, adapter_name: str) -> None:
        with torch.no_grad():
            for key, layer in self.rosa_layers():
                if adapter_name not in layer.rosa_spa:
                    continue
                if adapter_name in layer.lora_A:
                    layer.lora_A[adapter_name].weight.copy_(state[f"{key}.lora_A.weight"])
                    layer.lora_B[adapter_name].weight.copy_(state[f"{key}.lora_B.weight"])
                if f"{key}.rosa_spa.values" in state:
                    layer.load_sparse(adapter_name, state[f"{key}.rosa_spa.row_offsets"],
                                      state[f"{key}.rosa_spa.col_indices"], state[f"{key}.rosa_spa.values"])
            saved = {k: v for k, v in state.items() if _SAVE_PART in k}
            if saved:
                load_modules_to_save_state(self.model, saved, adapter_name)
        self.set_adapter(self.active_adapter)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[RosaConfig] = None,
                        autocast_adapter_dtype: bool = True, torch_device: Optional[str] = None,
                        low_cpu_mem_usage: bool = False, **kwargs) -> "RosaModel":
        """PEFT's ``PeftModel.from_pretrained``: wrap ``model`` and load the adapter from a folder or Hub id.
        ``config`` replaces the saved adapter_config.json; Hub keywords (``subfolder``, ``revision``,
        ``token``, ``cache_dir``, ``local_files_only``, ``force_download``) locate the files."""
        adapter_dir = _resolve(model_id, kwargs, "from_pretrained")
        config = _load_config(adapter_dir, config, is_trainable, autocast_adapter_dtype)
        _check_base_name(model, config, os.path.join(adapter_dir, CONFIG_NAME))
        state = _read_adapter_file(adapter_dir, torch_device)
        _check_state_fits(model, config, state, os.path.join(adapter_dir, WEIGHTS_NAME))
        self = cls(model, config, adapter_name)
        self._load_state(state, adapter_name)
        if not is_trainable:
            self.eval()
        return self

    # ---- merge / unload --------------------------------------------------------------------------------
    def _check_adapter_names(self, adapter_names) -> Optional[list]:
        if adapter_names is None:
            return None
        if isinstance(adapter_names, str):
            raise ValueError(f"adapter_names must be a list of names, got the string {adapter_names!r}")
        unknown = [n for n in adapter_names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; have {sorted(self.peft_config)}")
        return list(adapter_names)

    def merge_adapter(self, adapter_names: Optional[list] = None, safe_merge: bool = False) -> None:
        """Merge the given (default: active) adapters into the base weights; warns when some already are."""
        if isinstance(adapter_names, bool):  # the old positional form merge_adapter(safe_merge)
            adapter_names, safe_merge = None, adapter_names
        names = self._check_adapter_names(adapter_names)
        for _, layer in self.rosa_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.rosa_layers():
            layer.unmerge()

    def _unwrap(self, merge: bool, safe_merge: bool = False, adapter_names=None, progressbar: bool = False) -> nn.Module:
        names = self._check_adapter_names(adapter_names)
        layers = list(self.rosa_layers())
        replacements = {}
        model_dtype = _model_float_dtype(self.model) if merge else None
        if progressbar:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc="Unloading " + ("and merging " if merge else "") + "model")
        for key, layer in layers:
            layer._restore_base()
            if merge and layer.kind.supports_merged:
                layer.merge(safe_merge=safe_merge, adapter_names=names)
                replacements[key] = layer.base_layer
            elif merge:
                new_w = layer.merged_weight(names)
                if safe_merge and not torch.isfinite(new_w).all():
                    raise ValueError(f"{key}: NaN/inf in the merged weight")
                replacements[key] = _dense_linear_with(layer.base_layer, layer, new_w, model_dtype)
            else:
                replacements[key] = layer.base_layer
        for key, base in replacements.items():
            self.model.set_submodule(key, base)
        keep = None
        if merge:
            keep = (names or self._active)[0] if (names or self._active) else None
        unwrap_modules_to_save(self.model, keep)
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list] = None) -> nn.Module:
        """Fold W0 + S + s·B·A of the given (default: active) adapters into plain weights; return the bare model."""
        return self._unwrap(merge=True, safe_merge=safe_merge, adapter_names=adapter_names, progressbar=progressbar)

    def unload(self) -> nn.Module:
        """Remove the adapters and return the bare model (without merging, as PEFT's ``unload``)."""
        return self._unwrap(merge=False)

    # ---- weighted combination ----------------------------------------------------------------------------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "cat", **kwargs) -> None:
        """A new adapter whose delta is Σ wᵢ·(sᵢ·Bᵢ·Aᵢ + Sᵢ): LoRA factors concatenated along the rank
        (``combination_type="cat"``, exact), sparse parts summed over the union of the masks."""
        _reject("add_weighted_adapter", kwargs)
        if combination_type != "cat":
            raise ValueError(f"add_weighted_adapter: combination_type={combination_type!r} is not supported; "
                             "only 'cat' (exact) is")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if not adapters or len(adapters) != len(weights):
            raise ValueError("add_weighted_adapter needs one weight per adapter")
        self._check_adapter_names(adapters)
        configs = [self.peft_config[a] for a in adapters]
        if len({c.impl for c in configs}) > 1 or len({c.adapter_dtype for c in configs}) > 1:
            raise ValueError("add_weighted_adapter: the adapters differ in impl or adapter_dtype")
        if any(c.modules_to_save for c in configs):
            raise ValueError("add_weighted_adapter: adapters with modules_to_save cannot be combined")
        layers = [(k, l) for k, l in self.rosa_layers() if any(a in l.rosa_spa for a in adapters)]
        ranks = {k: sum(l.r.get(a, 0) for a in adapters) for k, l in layers}
        base = configs[0]
        unions = {k: self._union_mask(l, adapters) for k, l in layers}
        total = sum(l.out_features * l.in_features for _, l in layers)
        nnz = sum(int(m.sum()) for m in unions.values())
        new = dataclasses.replace(
            base, r=max(ranks.values()), lora_alpha=max(ranks.values()) or 1, use_rslora=False,
            target_modules=[k for k, _ in layers], exclude_modules=None, layers_to_transform=None,
            layers_pattern=None, rank_pattern={rf"{re.escape(k)}": v for k, v in ranks.items()},
            density=min(nnz / max(1, total), 0.999), density_pattern={}, init_lora_weights=True)
        self._inject(adapter_name, new)
        with torch.no_grad():
            for key, layer in layers:
                if layer.r[adapter_name]:
                    As, Bs = [], []
                    for a, w in zip(adapters, weights):
                        if layer.r.get(a, 0):
                            As.append(layer.lora_A[a].weight.float())
                            Bs.append(layer.lora_B[a].weight.float() * (w * layer.scaling[a]))
                    s_new = layer.scaling[adapter_name]
                    layer.lora_A[adapter_name].weight.copy_(torch.cat(As, 0))
                    layer.lora_B[adapter_name].weight.copy_(torch.cat(Bs, 1) / s_new)
                mask = unions[key]
                if mask.any():
                    dense = torch.zeros(mask.numel(), dtype=torch.float32, device=mask.device)
                    for a, w in zip(adapters, weights):
                        if a in layer.rosa_spa and layer.rosa_spa[a].has_mask:
                            sp = layer.rosa_spa[a]
                            dense.index_add_(0, sp.flat_indices(), sp.values.detach().float() * w)
                    layer.set_mask(adapter_name, mask)
                    sp_new = layer.rosa_spa[adapter_name]
                    sp_new.values.copy_(dense[sp_new.flat_indices()].to(sp_new.values.dtype))
        self.set_adapter(self.active_adapter)

    @staticmethod
    def _union_mask(layer: RosaLayer, adapters: list[str]) -> torch.Tensor:
        mask = torch.zeros(layer.out_features, layer.in_features, dtype=torch.bool, device=layer._device())
        for a in adapters:
            if a in layer.rosa_spa and layer.rosa_spa[a].has_mask:
                mask |= layer.rosa_spa[a].to_mask().to(mask.device)
        return mask


# ---- functional state dicts (PEFT's get_peft_model_state_dict / set_peft_model_state_dict) -----------------
def get_rosa_model_state_dict(model: RosaModel, state_dict: Optional[dict] = None,
                              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors with the keys of ``adapter_model.safetensors`` (no adapter name in them)."""
    if state_dict is not None:
        raise ValueError("get_rosa_model_state_dict: state_dict= is not supported; the adapter's tensors are "
                         "read from the model")
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; have {sorted(model.peft_config)}")
    return model.adapter_state_dict(adapter_name)


def set_rosa_model_state_dict(model: RosaModel, state_dict: dict, adapter_name: str = "default") -> None:
    """Load tensors in :func:`get_rosa_model_state_dict`'s layout into an existing adapter (checked first)."""
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; have {sorted(model.peft_config)}")
    _check_state_fits(model.model, model.peft_config[adapter_name], state_dict, "state_dict")
    model._load_state(state_dict, adapter_name)


def _model_float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype the model computes in outside its adapted Linears: the most common (by size) float dtype of
    the plain (not quantized) parameters that are neither RoSA adapter weights nor RoSA-adapted base weights
    (embeddings, norms, the output head, un-adapted Linears). None when there is no such parameter."""
    skip: set[int] = set()
    for _, module in model.named_modules():
        if isinstance(module, RosaLayer):
            skip.update(id(p) for p in module.parameters())
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if id(p) in skip or not p.is_floating_point() or type(p.data) is not torch.Tensor:
            continue
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _dense_linear_with(base: nn.Module, layer: RosaLayer, weight_fp32: torch.Tensor,
                       model_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A plain float Linear holding the merged weight of a (quantized) base that cannot be merged in place.

    Its dtype is the one the rest of the model computes in, so the merged model runs: the base's bias dtype
    (a 4-bit Linear keeps its bias in the original float dtype), else ``model_dtype`` (the model's other
    float parameters, see :func:`_model_float_dtype`), else the 4-bit layer's compute dtype. The compute
    dtype alone is wrong for e.g. an fp32 model quantized with a bf16 compute dtype: the merged Linears
    would then get bf16 inputs from fp32 norms and fail (or silently round the merge to bf16).
    """
    bias = getattr(base, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.is_floating_point():
        dtype = bias.dtype
    elif model_dtype is not None:
        dtype = model_dtype
    else:
        dtype = layer.kind.compute_dtype(base)
    new = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                    dtype=dtype, device=weight_fp32.device)
    with torch.no_grad():
        new.weight.copy_(weight_fp32.to(dtype))
        if new.bias is not None:
            new.bias.copy_(bias.detach().to(dtype))
    return new


_HUB_KEYS = ("subfolder", "revision", "token", "cache_dir", "local_files_only", "force_download")


def _resolve(model_id: str, kwargs: dict, verb: str) -> str:
    hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KEYS if k in kwargs}
    # PEFT keywords whose default is the only behaviour here: accepted at that value, refused otherwise
    for key, default in (("ephemeral_gpu_offload", False), ("key_mapping", None)):
        if key in kwargs and kwargs[key] == default:
            del kwargs[key]
    _reject(verb, kwargs)
    return hub.resolve_adapter_dir(model_id, **hub_kwargs)


def _load_config(adapter_dir: str, config: Optional[RosaConfig], is_trainable: bool,
                 autocast_adapter_dtype: bool) -> RosaConfig:
    if config is None:
        config = RosaConfig.from_pretrained(adapter_dir)
    elif not isinstance(config, RosaConfig):
        raise TypeError(f"config must be a RosaConfig, got {type(config).__name__}")
    else:
        config = dataclasses.replace(config)
    config.inference_mode = not is_trainable
    if not autocast_adapter_dtype:
        config.adapter_dtype = None  # keep the base weight's dtype for A, B and S
    return config


def _read_adapter_file(adapter_dir: str, device: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``; a file safetensors cannot read (empty, truncated,
    garbage) is a ValueError naming it, not a parser traceback."""
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    for required in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(adapter_dir, required)):
            raise FileNotFoundError(f"adapter directory {adapter_dir!r} has no {required}")
    try:
        return load_file(path, device=str(device) if device is not None else "cpu")
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors' SafetensorError (not exported under a stable name), OSError, ...
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: not a readable safetensors file ({detail})") from None


_FLOAT_PARTS = ("lora_A.weight", "lora_B.weight", "rosa_spa.values")
_INDEX_PARTS = ("rosa_spa.row_offsets", "rosa_spa.col_indices")
_SPARSE_PARTS = ("rosa_spa.values", "rosa_spa.row_offsets", "rosa_spa.col_indices")
# a sparse adapter drawn at random with the config's density (p = d per entry) may exceed the top-k count
# int(d·numel) by sampling noise; allow that many standard deviations over the whole model
_NNZ_SIGMAS = 6.0


def _nonfinite(tensor: torch.Tensor) -> Optional[str]:
    """'nan' / 'inf' when a float tensor holds one (the first kind found), else None."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    if torch.isnan(tensor).any():
        return "nan"
    if torch.isinf(tensor).any():
        return "inf"
    return None


def _check_state_fits(model: nn.Module, config: RosaConfig, state: dict, source: str) -> None:
    """Refuse, before anything changes, a state that does not describe exactly this config's adapter on
    ``model``: tensors of no target module, missing or extra parts, wrong shapes or dtypes, NaN/inf, a CSR
    structure that is not one, and more sparse entries than the config's density allows. ``source`` (the
    file, or ``"state_dict"``) starts every message, which also names the tensor's key or layer."""
    names = find_targets_for(model, config)
    name_set = set(names)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{source}: {key!r} is a {type(tensor).__name__}, not a tensor")
        if _SAVE_PART in key:
            continue  # modules_to_save: checked below
        part = next((p for p in _PARTS if key.endswith("." + p)), None)
        module_name = key[: -len(part) - 1] if part else None
        if part is None or module_name not in name_set:
            raise UserError(f"{source}: unexpected tensor {key!r}: no target module of the base model has it")
        found.setdefault(module_name, {})[part] = tensor
    for module_name in names:
        parts = found.get(module_name, {})
        module = model.get_submodule(module_name)
        out_f, in_f = _module_shape(module)
        a_in, b_out = (out_f, in_f) if isinstance(module, (nn.Embedding, RosaEmbedding)) else (in_f, out_f)
        r = config.rank_for(module_name)
        lora = [p for p in ("lora_A.weight", "lora_B.weight") if p in parts]
        if r == 0 and lora:
            raise UserError(f"{source}: unexpected tensor {module_name + '.' + lora[0]!r}: the config gives "
                             f"layer {module_name!r} rank 0")
        if r > 0:
            for p in ("lora_A.weight", "lora_B.weight"):
                if p not in parts:
                    raise UserError(f"{source}: missing tensor {module_name + '.' + p!r} (layer {module_name!r} "
                                     f"has rank {r} in the config)")
        sparse = [p for p in _SPARSE_PARTS if p in parts]
        if sparse and len(sparse) != len(_SPARSE_PARTS):
            lacking = next(p for p in _SPARSE_PARTS if p not in parts)
            raise UserError(f"{source}: missing tensor {module_name + '.' + lacking!r}: layer {module_name!r} "
                             f"has {module_name + '.' + sparse[0]!r} but a sparse adapter needs values, "
                             "row_offsets and col_indices")
        if sparse and config.density_for(module_name) == 0:
            raise UserError(f"{source}: unexpected sparse tensors for layer {module_name!r} "
                             f"({module_name + '.rosa_spa.values'!r}): the config gives it density 0")
        for part, tensor in parts.items():
            key = f"{module_name}.{part}"
            if part in _FLOAT_PARTS and not tensor.is_floating_point():
                raise UserError(f"{source}: {key!r} has dtype {tensor.dtype}, expected a floating-point dtype")
            if part in _INDEX_PARTS and (tensor.is_floating_point() or tensor.is_complex()
                                         or tensor.dtype == torch.bool):
                raise UserError(f"{source}: {key!r} has dtype {tensor.dtype}, expected an integer dtype")
            expected = {"lora_A.weight": (r, a_in), "lora_B.weight": (b_out, r),
                        "rosa_spa.row_offsets": (out_f + 1,)}.get(part)
            if part in ("rosa_spa.values", "rosa_spa.col_indices"):
                if tensor.dim() != 1:
                    raise UserError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, expected one dimension")
            elif expected is not None and tuple(tensor.shape) != expected:
                raise UserError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, the base model needs {expected}")
            bad = _nonfinite(tensor)
            if bad:
                raise UserError(f"{source}: {key!r} (layer {module_name!r}) holds {bad} values")
        if sparse:
            _check_csr(source, module_name, parts, out_f, in_f)
    _check_nnz_budget(source, config, {n: found[n] for n in names if "rosa_spa.values" in found.get(n, {})}, model)
    _check_modules_to_save_state(model, config, state, source)


def _check_csr(source: str, module_name: str, parts: dict, out_f: int, in_f: int) -> None:
    values, offsets, cols = (parts[p] for p in _SPARSE_PARTS)
    nnz = values.numel()
    where = f"{source}: layer {module_name!r}"
    if cols.numel() != nnz:
        raise UserError(f"{where}: {cols.numel()} col_indices for {nnz} values")
    if nnz >= out_f * in_f:
        raise UserError(f"{where}: the sparse adapter holds {nnz} entries of a {out_f}x{in_f} weight; "
                         "its density must be < 1")
    offsets = offsets.to(torch.int64)
    if int(offsets[0]) != 0 or int(offsets[-1]) != nnz or bool((offsets[1:] < offsets[:-1]).any()):
        raise UserError(f"{where}: row_offsets is not a CSR offset array for {nnz} values "
                         f"(it must start at 0, never decrease and end at {nnz})")
    if nnz:
        cols = cols.to(torch.int64)
        if int(cols.min()) < 0 or int(cols.max()) >= in_f:
            bad = int(cols.max()) if int(cols.max()) >= in_f else int(cols.min())
            raise UserError(f"{where}: col_indices holds column {bad} of a {in_f}-column weight")
        rows = torch.repeat_interleave(torch.arange(out_f, device=offsets.device), offsets.diff())
        if torch.unique(rows * in_f + cols.to(rows.device)).numel() != nnz:
            raise UserError(f"{where}: col_indices repeats a column within a row")


def _check_nnz_budget(source: str, config: RosaConfig, sparse: dict, model: nn.Module) -> None:
    """The sparse entries must fit the config's densities: Σ nnz ≤ Σ ceil(d·out·in) over the layers (top-k
    masks, per layer or one global budget over the layers, never exceed it), plus a margin of
    ``_NNZ_SIGMAS`` binomial standard deviations for masks drawn at random with those densities.
    A file with more entries comes from another config (pass ``config=`` with the right density)."""
    if not sparse:
        return
    allowed, variance, total, worst = 0, 0.0, 0, None
    for module_name, parts in sparse.items():
        out_f, in_f = _module_shape(model.get_submodule(module_name))
        numel, d = out_f * in_f, config.density_for(module_name)
        nnz = parts["rosa_spa.values"].numel()
        cap = math.ceil(d * numel)
        allowed += cap
        variance += numel * d * (1 - d)
        total += nnz
        excess = (nnz - cap) / max(cap, 1)
        if worst is None or excess > worst[0]:
            worst = (excess, module_name, nnz, d, out_f, in_f)
    if total > allowed + _NNZ_SIGMAS * math.sqrt(variance):
        _, module_name, nnz, d, out_f, in_f = worst
        raise UserError(f"{source}: the sparse adapter holds {total} entries, more than the config's density "
                         f"allows ({allowed}); e.g. layer {module_name!r} holds {nnz} of {out_f}x{in_f} for "
                         f"density {d:g} (the adapter was saved with another density; pass config= to match)")


def _check_modules_to_save_state(model: nn.Module, config: RosaConfig, state: dict, source: str) -> None:

    given = {k: v for k, v in state.items() if _SAVE_PART in k}
    expected: dict[str, torch.Tensor] = {}
    if config.modules_to_save:
        for name in find_modules_to_save(model, config.modules_to_save):
            module = model.get_submodule(name)
            original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            expected.update({f"{name}{SEP}{k}": v for k, v in original.state_dict().items()})
    extra = sorted(set(given) - set(expected))
    if extra:
        raise UserError(f"{source}: unexpected tensor {extra[0]!r}: no module of the config's modules_to_save "
                         f"({config.modules_to_save}) has it")
    missing = sorted(set(expected) - set(given))
    if missing:
        raise UserError(f"{source}: missing tensor {missing[0]!r} (modules_to_save {config.modules_to_save})")
    for key, tensor in given.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, the base model needs "
                             f"{tuple(expected[key].shape)}")
        bad = _nonfinite(tensor)
        if bad:
            raise UserError(f"{source}: {key!r} holds {bad} values")


def _base_names(name: str) -> set[str]:
    """The names a base model goes by, for a lenient comparison: the string itself, its last path component
    (a local copy or a Hub id's repo name), the repo of a Hub cache path (``models--org--repo/snapshots/...``)
    and the embedded default model's aliases, all lower-case."""

    text = str(name).strip().replace("\\", "/").rstrip("/")
    out = {text.lower()}
    parts = [p for p in text.split("/") if p]
    if parts:
        out.add(parts[-1].lower())
    for p in parts:
        if p.startswith("models--") and p.count("--") >= 2:
            out.add(p.split("--")[-1].lower())
    if text in _ALIASES:  # e.g. "smollm2-135m": the cached copy is ".../smollm2-135m-instruct", the Hub id
        out.add("smollm2-135m-instruct")  # "HuggingFaceTB/SmolLM2-135M-Instruct"
    if len(parts) >= 2 and parts[-2] == "snapshots":  # a commit hash says nothing about the model
        out.discard(parts[-1].lower())
    return out


def _check_base_name(model: nn.Module, config: RosaConfig, source: str) -> None:
    """Refuse an adapter saved for another base model, when both the adapter config and ``model`` name one."""
    saved = config.base_model_name_or_path
    have = _base_name_of(model)
    if not saved or not have or not isinstance(saved, str) or not isinstance(have, str):
        return
    if _base_names(saved) & _base_names(have):
        return
    raise UserError(f"{source}: the adapter was saved for base model {saved!r}, but the base model is {have!r}; "
                     "pass config= with base_model_name_or_path=None to load it anyway")


def get_rosa_model(model: nn.Module, config: RosaConfig, adapter_name: str = "default",
                   low_cpu_mem_usage: bool = False, **kwargs) -> RosaModel:
    """Freeze ``model`` and inject RoSA adapters per ``config`` (PEFT's ``get_peft_model``)."""
    _reject("get_rosa_model", kwargs)
    if not isinstance(config, RosaConfig):
        raise TypeError(f"config must be a RosaConfig, got {type(config).__name__}")
    return RosaModel(model, config, adapter_name)
