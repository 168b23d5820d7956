"""modules_to_save: train a full per-adapter copy of chosen modules (e.g. a classifier head) instead of adapting them.

One job: the :class:`ModulesToSaveWrapper` that holds a frozen original plus one trainable copy per
adapter, and the helpers a model uses to find, wrap, save, load and unwrap such modules. Semantics
follow HF PEFT's ``modules_to_save``: the active adapter's copy runs in ``forward``; with adapters
disabled, or for an adapter that has no copy here, the original runs.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
from torch import nn

from .utils.checks import UserError

SEP = ".modules_to_save."


class ModulesToSaveWrapper(nn.Module):
    """A frozen ``original_module`` plus a trainable full copy of it per adapter (``modules_to_save[name]``).

    Attributes the wrapper lacks (``weight``, ``in_features``, ...) are read from the module that
    ``forward`` would run: the active adapter's copy, else the original (as in PEFT).
    """

    def __init__(self, original_module: nn.Module, adapter_name: str, module_name: Optional[str] = None):
        super().__init__()
        if isinstance(original_module, ModulesToSaveWrapper):
            raise TypeError("cannot wrap a ModulesToSaveWrapper in another one; call update() on it instead")
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.module_name = module_name or type(original_module).__name__
        self._active_adapters: list[str] = []
        self._disable_adapters = False
        self.original_module.requires_grad_(False)
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    # ---- adapters -----------------------------------------------------------------------------------
    def update(self, adapter_name: str) -> None:
        """Add a trainable deep copy of the original for ``adapter_name`` (kept as is if it already exists)."""
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter name must be a non-empty string, got {adapter_name!r}")
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        _set_trainable(self.modules_to_save[adapter_name], True)
        self.original_module.requires_grad_(False)

    def set_adapter(self, adapter_names: Union[str, list[str]], trainable: bool = True) -> None:
        """Activate adapter(s); only the active copy is trainable (if ``trainable``), the original never is."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        with_copy = [n for n in names if n in self.modules_to_save]
        if len(with_copy) > 1:
            raise ValueError(f"modules_to_save {self.module_name!r}: only one active adapter may have a copy "
                             f"of it, got {with_copy}")
        for name, module in self.modules_to_save.items():
            _set_trainable(module, trainable and name in with_copy)
        self.original_module.requires_grad_(False)
        self._active_adapters = names

    def set_requires_grad(self, adapter_names: Union[str, list[str]], requires_grad: bool = True) -> None:
        """PEFT's: the named adapters' copies (those that exist) get ``requires_grad``; the original never."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name in self.modules_to_save:
                _set_trainable(self.modules_to_save[name], requires_grad)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> Optional[str]:
        """The active adapter that has a copy here, else the first active one (None when none is)."""
        with_copy = [n for n in self._active_adapters if n in self.modules_to_save]
        return with_copy[0] if with_copy else (self._active_adapters[0] if self._active_adapters else None)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop the adapter's copy (a no-op for an adapter without one) and deactivate it."""
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self._active_adapters = [n for n in self._active_adapters if n != adapter_name]

    def enable_adapters(self, enabled: bool) -> None:
        """``False`` runs the original module; the copies keep their weights (and the original stays frozen)."""
        self._disable_adapters = not bool(enabled)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        self._disable_adapters = bool(value)

    # ---- forward ------------------------------------------------------------------------------------
    def _current(self) -> nn.Module:
        if not self._disable_adapters:
            for name in self._active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        names = self.__dict__.get("_batch_adapter_names")
        if names is None or self._disable_adapters or not args:
            return self._current()(*args, **kwargs)
        return self._mixed_batch_forward(names, *args, **kwargs)

    def _mixed_batch_forward(self, names: list, x: torch.Tensor, *args, **kwargs):
        """Each sample through its adapter's copy (the original for ``"__base__"`` or an adapter without
        one), as PEFT's mixed adapter batches; samples are grouped per module and put back in order."""
        n = x.shape[0]
        if len(names) != n:
            if not names or n % len(names):
                raise ValueError(f"adapter_names has {len(names)} entries for a batch of {n}")
            names = [a for a in names for _ in range(n // len(names))]
        parts, order = [], []
        for name in dict.fromkeys(names):
            idx = [i for i, a in enumerate(names) if a == name]
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            parts.append(module(x[idx], *args, **kwargs))
            order.extend(idx)
        out = torch.cat(parts, 0)
        inverse = torch.empty(n, dtype=torch.long, device=out.device)
        inverse[torch.tensor(order, device=out.device)] = torch.arange(n, device=out.device)
        return out.index_select(0, inverse)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of the wrapper itself
        except AttributeError:
            pass
        # Guard against recursion while the instance is half-built (unpickling, deepcopy, __init__).
        own = ("original_module", "modules_to_save", "_active_adapters", "_disable_adapters", "module_name")
        if name in own or name.startswith("__") or "_modules" not in self.__dict__:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        modules = self.__dict__["_modules"]
        target = modules.get("original_module")
        if not self.__dict__.get("_disable_adapters", False):
            copies = modules.get("modules_to_save")
            for adapter in self.__dict__.get("_active_adapters", []):
                if copies is not None and adapter in copies:
                    target = copies[adapter]
                    break
        if target is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return getattr(target, name)

    def extra_repr(self) -> str:
        return (f"module={self.module_name!r}, adapters={list(self.modules_to_save)}, "
                f"active={self._active_adapters}, disabled={self._disable_adapters}")

    # ---- state ----------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The state dict of ``adapter_name``'s copy (detached tensors, shared storage)."""
        return dict(self._copy(adapter_name).state_dict())

    def load_adapter_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Load ``adapter_name``'s copy; strict: missing, extra or misshapen keys raise before any change."""
        module = self._copy(adapter_name)
        _check_state(module.state_dict(), state, f"modules_to_save {self.module_name!r} (adapter {adapter_name!r})")
        with torch.no_grad():
            module.load_state_dict(state, strict=True)

    def unwrap(self, adapter_name: Optional[str] = None) -> nn.Module:
        """The module to put back in the model: ``adapter_name``'s copy if it has one, else the original."""
        if adapter_name is not None and adapter_name in self.modules_to_save:
            return self.modules_to_save[adapter_name]
        return self.original_module

    def _copy(self, adapter_name: str) -> nn.Module:
        if adapter_name not in self.modules_to_save:
            raise ValueError(f"modules_to_save {self.module_name!r} has no copy for adapter {adapter_name!r}; "
                             f"have {list(self.modules_to_save)}")
        return self.modules_to_save[adapter_name]


def _set_trainable(module: nn.Module, on: bool) -> None:
    for p in module.parameters():
        if p.is_floating_point() or p.is_complex():  # integer (quantized) storage cannot take gradients
            p.requires_grad_(on)


def _check_state(expected: dict, state: dict, what: str) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = ([f"missing keys {missing}"] if missing else []) + ([f"unexpected keys {extra}"] if extra else [])
        raise UserError(f"{what}: {'; '.join(parts)}")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{what}: {key!r} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{what}: {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")


# ---- helpers a model calls ---------------------------------------------------------------------------


def _under(name: str, roots) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def modules_to_save_wrappers(model: nn.Module) -> dict[str, ModulesToSaveWrapper]:
    """Every wrapper in ``model`` by module name (relative to ``model``), in module order."""
    out: dict[str, ModulesToSaveWrapper] = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and not _under(name, out):
            out[name] = module
    return out


def find_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Module names matched by ``names`` (exact name or dotted suffix), in module order.

    An already wrapped module is returned under its wrapper's name. A key matching nothing, a
    module inside an existing wrapper, or matches nested in one another raise
    :class:`~rosa_peft.utils.checks.UserError`.
    """
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"modules_to_save must be a list of non-empty module names, got {names!r}")
    wrappers = modules_to_save_wrappers(model)
    inner = [f"{w}.original_module" for w in wrappers] + [f"{w}.modules_to_save" for w in wrappers]
    found: list[str] = []
    for key in names:
        hits, hidden = [], []
        for name, _ in model.named_modules():
            if not name or not (name == key or name.endswith("." + key)):
                continue
            (hidden if _under(name, inner) else hits).append(name)
        if not hits:
            owners = sorted({w for w in wrappers for h in hidden if _under(h, [w])})
            where = f" outside a modules_to_save wrapper (only inside {owners})" if hidden else ""
            raise UserError(f"modules_to_save entry {key!r} matches no module of the model{where}")
        found.extend(h for h in hits if h not in found)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    found.sort(key=order.__getitem__)
    for name in found:
        inside = [other for other in found if other != name and name.startswith(other + ".")]
        if inside:
            raise UserError(f"modules_to_save: {name!r} is inside {inside[0]!r}, which is also listed; list one of them")
        holds = [w for w in wrappers if w != name and w.startswith(name + ".")]
        if holds:
            raise UserError(f"modules_to_save: {name!r} contains the existing wrapper {holds[0]!r}")
    return found


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> list[str]:
    """Give ``adapter_name`` a trainable copy of each module matched by ``names``; returns the wrapper names.

    A plain module is replaced by a :class:`ModulesToSaveWrapper` (its original frozen); an existing
    wrapper gets a copy for the new adapter via :meth:`ModulesToSaveWrapper.update`.
    """
    found = find_modules_to_save(model, names)  # validates before any change
    for name in found:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        else:
            model.set_submodule(name, ModulesToSaveWrapper(module, adapter_name, module_name=name))
    return found


def modules_to_save_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{"<module>.modules_to_save.<param>": tensor}`` for every copy ``adapter_name`` has."""
    out = {}
    for name, wrapper in modules_to_save_wrappers(model).items():
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.adapter_state_dict(adapter_name).items():
                out[f"{name}{SEP}{key}"] = tensor
    return out


def load_modules_to_save_state(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Inverse of :func:`modules_to_save_state_dict`: validates every key and shape, then loads.

    Every key must be ``"<wrapper>.modules_to_save.<param>"`` for a wrapper holding a copy for
    ``adapter_name``, and each such copy must be given in full.
    """
    wrappers = {n: w for n, w in modules_to_save_wrappers(model).items() if adapter_name in w.modules_to_save}
    per_wrapper: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, tensor in state.items():
        owner = next((n for n in wrappers if key.startswith(n + SEP)), None)
        if owner is None:
            stray.append(key)
        else:
            per_wrapper.setdefault(owner, {})[key[len(owner) + len(SEP):]] = tensor
    if stray:
        raise UserError(f"modules_to_save state for adapter {adapter_name!r}: key(s) "
                         f"{sorted(stray)[:5]}{' ...' if len(stray) > 5 else ''} name no wrapped module "
                         f"with a copy for it (have {sorted(wrappers)})")
    for name, wrapper in wrappers.items():
        _check_state(wrapper.adapter_state_dict(adapter_name), per_wrapper.get(name, {}),
                     f"modules_to_save {name!r} (adapter {adapter_name!r})")
    for name, sub in per_wrapper.items():
        wrappers[name].load_adapter_state(adapter_name, sub)


def unwrap_modules_to_save(model: nn.Module, adapter_name: Optional[str] = None) -> list[str]:
    """Replace every wrapper by ``adapter_name``'s copy where it has one, else by the original; returns the names."""
    wrappers = modules_to_save_wrappers(model)
    for name, wrapper in wrappers.items():
        model.set_submodule(name, wrapper.unwrap(adapter_name))
    return list(wrappers)
