"""RosaModel: wrap a model with RoSA adapters; save/load, masks, merge, unload, several adapters.

The verbs follow HF PEFT's ``PeftModel`` so a PEFT user recognises them: ``get_rosa_model``,
``print_trainable_parameters``, ``save_pretrained`` / ``from_pretrained``, ``disable_adapter``,
``merge_and_unload``, ``unload``, ``add_adapter`` / ``set_adapter`` / ``delete_adapter``.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import torch
from torch import nn

from .config import CONFIG_NAME, RosaConfig
from .io import atomic_save_safetensors
from .layer import RosaLinear
from .targets import find_targets

WEIGHTS_NAME = "adapter_model.safetensors"
_PARTS = ("lora_A.weight", "lora_B.weight", "rosa_spa.values", "rosa_spa.row_offsets", "rosa_spa.col_indices")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class RosaModel(nn.Module):
    """A transformers (or any torch) model with RoSA adapters injected in place."""

    def __init__(self, model: nn.Module, config: RosaConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, RosaConfig] = {}
        self.active_adapter = adapter_name
        self._inject(adapter_name, config)
        # HF Trainer reads forward's signature to pick dataset columns: expose the base model's.
        self.__dict__["forward"] = functools.update_wrapper(functools.partial(type(self).forward, self), model.forward)

    # ---- injection -----------------------------------------------------------------------------------
    def _inject(self, adapter_name: str, config: RosaConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        names = find_targets(self.model, config.target_modules, config.exclude_modules)  # validates first
        layers = [self.model.get_submodule(n) for n in names]
        for name, module in zip(names, layers):
            r = config.rank_for(name)
            if r > min(module.in_features, module.out_features):
                raise ValueError(f"rank {r} for {name!r} exceeds min(in, out) = {min(module.in_features, module.out_features)}")
            if config.index_dtype == "int16" and module.in_features > 32768:
                raise ValueError(f"index_dtype='int16' cannot address the {module.in_features} columns of {name!r}")
        if not self.peft_config:  # first adapter: freeze the base model
            for p in self.model.parameters():
                p.requires_grad_(False)
        for name, module in zip(names, layers):
            if isinstance(module, RosaLinear):
                module.update_layer(adapter_name, config)
            else:
                _set_submodule(self.model, name, RosaLinear(module, adapter_name, config, module_name=name))
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)

    def rosa_layers(self) -> Iterator[tuple[str, RosaLinear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, RosaLinear):
                yield name, module

    # ---- pass-through ----------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.model

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs):
        kw = {"use_reentrant": False}
        kw.update(gradient_checkpointing_kwargs or {})
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)
        if kw.get("use_reentrant") and hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()

    # ---- adapters ----------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: RosaConfig) -> None:
        self._inject(adapter_name, config)

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; have {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        trainable = not self.peft_config[adapter_name].inference_mode
        for _, layer in self.rosa_layers():
            layer.set_adapter(adapter_name, trainable=trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; have {sorted(self.peft_config)}")
        for _, layer in self.rosa_layers():
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model: in the ``merged`` implementation W0 is restored in place meanwhile."""
        layers = [layer for _, layer in self.rosa_layers()]
        previous = [layer.disable_adapters for layer in layers]
        try:
            for layer in layers:
                layer.disable_adapters = True
                layer._sync_base()
            yield
        finally:
            for layer, prev in zip(layers, previous):
                layer.disable_adapters = prev
                layer._sync_base()

    # ---- masks -----------------------------------------------------------------------------------------
    def set_masks(self, masks: dict[str, torch.Tensor], adapter_name: Optional[str] = None) -> None:
        """Install sparse masks: {module name: bool tensor of the weight's shape}. Validated before any change."""
        name = adapter_name or self.active_adapter
        layers = dict(self.rosa_layers())
        unknown = sorted(set(masks) - set(layers))
        if unknown:
            raise ValueError(f"masks name modules that carry no RoSA adapter: {', '.join(unknown[:5])}"
                             f"{' ...' if len(unknown) > 5 else ''}")
        for key, mask in masks.items():
            shape = (layers[key].out_features, layers[key].in_features)
            if tuple(mask.shape) != shape:
                raise ValueError(f"mask for {key!r} has shape {tuple(mask.shape)}, the weight is {shape}")
        for key, mask in masks.items():
            layers[key].set_mask(name, mask)
        self.set_adapter(self.active_adapter)

    def get_masks(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        name = adapter_name or self.active_adapter
        return {k: layer.rosa_spa[name].to_mask() for k, layer in self.rosa_layers()
                if name in layer.rosa_spa and layer.rosa_spa[name].has_mask}

    # ---- parameters ----------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for n, p in self.named_parameters() if ".rosa_spa." not in n and ".lora_" not in n)
        return trainable, total + trainable

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        name = self.active_adapter
        lora = sum(l.lora_A[name].weight.numel() + l.lora_B[name].weight.numel()
                   for _, l in self.rosa_layers() if name in l.lora_A)
        sparse_n = sum(l.rosa_spa[name].nnz for _, l in self.rosa_layers() if name in l.rosa_spa)
        pending = ""
        if sparse_n == 0 and self.peft_config[name].density > 0:
            pending = " (sparse masks not set yet: the adapter is LoRA-only until set_masks)"
        print(f"trainable params: {trainable:,} (lora {lora:,} + sparse {sparse_n:,}) || all params: {total:,} "
              f"|| trainable%: {100 * trainable / max(1, total):.4f}{pending}")

    # ---- state ---------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        name = adapter_name or self.active_adapter
        out = {}
        for key, layer in self.rosa_layers():
            if name not in layer.rosa_spa:
                continue
            if name in layer.lora_A:
                out[f"{key}.lora_A.weight"] = layer.lora_A[name].weight.detach()
                out[f"{key}.lora_B.weight"] = layer.lora_B[name].weight.detach()
            sp = layer.rosa_spa[name]
            if sp.has_mask:
                out[f"{key}.rosa_spa.values"] = sp.values.detach()
                out[f"{key}.rosa_spa.row_offsets"] = sp.row_offsets
                out[f"{key}.rosa_spa.col_indices"] = sp.col_indices
        return out

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None, **_) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (a sub-folder per extra adapter)."""
        for name in selected_adapters or list(self.peft_config):
            target = save_directory if name == "default" or len(self.peft_config) == 1 and not selected_adapters \
                else os.path.join(save_directory, name)
            os.makedirs(target, exist_ok=True)
            atomic_save_safetensors(self.adapter_state_dict(name), os.path.join(target, WEIGHTS_NAME),
                                    metadata={"format": "pt", "rosa_peft": "1"})
            self.peft_config[name].save_pretrained(target)

    def load_adapter(self, adapter_dir: str, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Add an adapter saved by ``save_pretrained`` under ``adapter_name``."""
        config = RosaConfig.from_pretrained(adapter_dir)
        config.inference_mode = not is_trainable
        state = _read_adapter_file(adapter_dir)
        _check_state_fits(self.model, config, state, adapter_dir)
        self._inject(adapter_name, config)
        self._load_state(state, adapter_name)

    def load_adapter_weights(self, adapter_dir: str, adapter_name: Optional[str] = None) -> None:
        """Overwrite an existing adapter's A, B, masks and sparse values from a saved directory."""
        name = adapter_name or self.active_adapter
        state = _read_adapter_file(adapter_dir)
        _check_state_fits(self.model, self.peft_config[name], state, adapter_dir)
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
        self.set_adapter(self.active_adapter)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str, adapter_name: str = "default",
                        is_trainable: bool = False, **_) -> "RosaModel":
        config = RosaConfig.from_pretrained(adapter_dir)
        state = _read_adapter_file(adapter_dir)
        _check_state_fits(model, config, state, adapter_dir)
        config.inference_mode = not is_trainable
        self = cls(model, config, adapter_name)
        self.peft_config.pop(adapter_name)
        for _, layer in self.rosa_layers():
            layer.delete_adapter(adapter_name)
        self.load_adapter(adapter_dir, adapter_name, is_trainable)
        if not is_trainable:
            self.eval()
        return self

    # ---- merge / unload --------------------------------------------------------------------------------
    def merge_adapter(self, safe_merge: bool = False) -> None:
        for _, layer in self.rosa_layers():
            layer.merge(self.active_adapter, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in self.rosa_layers():
            layer.unmerge()

    def _unwrap(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        replacements = {}
        for key, layer in list(self.rosa_layers()):
            layer.unmerge()
            if merge and self.active_adapter in layer.rosa_spa:
                new_w = layer.merged_weight(self.active_adapter)
                if safe_merge and not torch.isfinite(new_w).all():
                    raise ValueError(f"{key}: NaN/inf in the merged weight")
                replacements[key] = (layer, new_w)
            else:
                replacements[key] = (layer, None)
        for key, (layer, new_w) in replacements.items():
            layer._restore_base()
            base = layer.base_layer
            if new_w is not None:
                base = _dense_linear_with(base, layer, new_w)
            _set_submodule(self.model, key, base)
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Fold W0 + S + s·B·A into plain Linear weights and return the bare model."""
        return self._unwrap(merge=True, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Remove the adapters and return the bare model with W0 restored bit for bit."""
        return self._unwrap(merge=False)


def _dense_linear_with(base: nn.Module, layer: RosaLinear, weight_fp32: torch.Tensor) -> nn.Module:
    if layer.kind.supports_merged:
        with torch.no_grad():
            base.weight.copy_(weight_fp32.to(base.weight.dtype))
        return base
    # quantized base: hand back a plain float Linear holding the de-quantised merged weight
    dtype = layer.kind.compute_dtype(base)
    new = nn.Linear(layer.in_features, layer.out_features, bias=getattr(base, "bias", None) is not None,
                    dtype=dtype, device=weight_fp32.device)
    with torch.no_grad():
        new.weight.copy_(weight_fp32.to(dtype))
        if new.bias is not None:
            new.bias.copy_(base.bias.detach().to(dtype))
    return new


def _read_adapter_file(adapter_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    for required in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(adapter_dir, required)):
            raise FileNotFoundError(f"adapter directory {adapter_dir!r} has no {required}")
    return load_file(path)


def _check_state_fits(model: nn.Module, config: RosaConfig, state: dict, adapter_dir: str) -> None:
    """Every tensor in the file must belong to a target module of the right shape (nothing changes otherwise)."""
    names = set(find_targets(model, config.target_modules, config.exclude_modules))
    for key, tensor in state.items():
        part = next((p for p in _PARTS if key.endswith("." + p)), None)
        module_name = key[: -len(part) - 1] if part else None
        if part is None or module_name not in names:
            raise ValueError(f"{adapter_dir}: tensor {key!r} does not fit the base model (no such target module)")
        module = model.get_submodule(module_name)
        in_f, out_f = module.in_features, module.out_features
        r = config.rank_for(module_name)
        expected = {"lora_A.weight": (r, in_f), "lora_B.weight": (out_f, r), "rosa_spa.row_offsets": (out_f + 1,)}.get(part)
        if expected is not None and tuple(tensor.shape) != expected:
            raise ValueError(f"{adapter_dir}: {key!r} has shape {tuple(tensor.shape)}, the base model needs {expected}")
        if part == "rosa_spa.col_indices" and tensor.numel() and int(tensor.max()) >= in_f:
            raise ValueError(f"{adapter_dir}: {key!r} indexes column {int(tensor.max())} of a {in_f}-column weight")
    for module_name in names:
        if config.rank_for(module_name) > 0 and f"{module_name}.lora_A.weight" not in state:
            raise ValueError(f"{adapter_dir}: no LoRA weights for target module {module_name!r}")


def get_rosa_model(model: nn.Module, config: RosaConfig, adapter_name: str = "default") -> RosaModel:
    """Freeze ``model`` and inject RoSA adapters per ``config`` (PEFT's ``get_peft_model``)."""
    if not isinstance(config, RosaConfig):
        raise TypeError(f"config must be a RosaConfig, got {type(config).__name__}")
    return RosaModel(model, config, adapter_name)
