"""RosaConfig: every knob of a RoSA adapter, validated on construction, JSON round trip."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .utils.checks import UserError, check_choice, check_fraction, check_int, is_int, is_real
from .utils.io import atomic_write_text

CONFIG_NAME = "adapter_config.json"
IMPLS = ("auto", "merged", "sp_add", "spmm")
ADAPTER_DTYPES = (None, "float32", "bfloat16", "float16", "float64")
BIAS = ("none",)
INIT_LORA_WEIGHTS = (True, False, "gaussian")
INDEX_DTYPES = ("int32", "int16")  # sparse column indices; int16 only where a weight has <= 32767 columns
# keys a saved adapter_config.json must state: their defaults would silently change what the adapter computes
REQUIRED_KEYS = ("r", "lora_alpha", "density", "target_modules")


@dataclass
class RosaConfig:
    """Configuration of a RoSA adapter (low-rank ``B·A`` plus sparse ``S`` on top of a frozen ``W``).

    Field names follow HF PEFT's ``LoraConfig`` where the meaning is the same.

    Args:
        r: LoRA rank (0 = sparse-only, "SpA").
        density: fraction of each target weight's entries in the sparse adapter, ``0 <= d < 1``
            (0 = LoRA-only). The mask itself comes from :func:`rosa_peft.compute_masks` or a file.
        lora_alpha: LoRA scaling numerator; scale ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
        lora_dropout: dropout probability on the LoRA branch input only.
        target_modules: list of names (exact or dotted-suffix match), a regex string (full match),
            or ``"all-linear"`` (every ``nn.Linear`` except the output head).
        exclude_modules: same forms as ``target_modules``; matches are never wrapped.
        rank_pattern / density_pattern: per-module overrides, keys are regexes matched against the
            end of the module name (as in PEFT).
        use_rslora: scale by ``lora_alpha / sqrt(r)``.
        init_lora_weights: ``True`` (A Kaiming-uniform, B = 0: identity at start), ``"gaussian"``
            (A normal(0, 1/r)), or ``False`` (B and S random too: a non-identity adapter, for tests).
        bias: only ``"none"`` is supported (biases stay frozen).
        adapter_dtype: dtype of A, B and the sparse values; ``None`` keeps the base weight's float dtype.
            The default ``"float32"`` matches PEFT's autocast of adapter weights.
        impl: ``"merged"`` keeps ``W0 + S`` inside the base weight (fast, float bases only),
            ``"sp_add"`` adds ``S`` into a temporary copy per call (the reference's path),
            ``"spmm"`` (4-bit bases only) runs the base's own 4-bit matmul plus an SpMM on S, never
            building a dense ``W + S``; ``"auto"`` picks per layer (``sp_add`` on 4-bit bases).
        index_dtype: ``"int32"`` or ``"int16"`` for the sparse column indices (int16 only where the
            weight has at most 32767 columns).
        layers_to_transform: layer index, or list of indices, to adapt (as in PEFT): a target module is
            kept only if its name has a ``.<layers_pattern>.<idx>.`` component with ``idx`` listed; names
            without such a component are dropped. ``None`` (or ``[]``) adapts every layer. Not allowed
            with a regex-string ``target_modules`` (``"all-linear"`` is fine).
        layers_pattern: name(s) of the module list holding the layers (``"layers"`` for Llama, ``"h"``
            for GPT-2), a string or list of strings, each a regex matched as one dotted component
            (PEFT semantics). ``None`` tries the common names ``layers``, ``h``, ``block``, ``blocks``,
            ``layer``. Only meaningful with ``layers_to_transform``.
        modules_to_save: module names (exact or dotted-suffix match, like ``target_modules``' list
            form) that are not adapted with LoRA/sparse weights: each adapter trains its own full copy
            of them instead (e.g. a classifier head), the original stays frozen. See
            :mod:`rosa_peft.modules_to_save`.
    """

    r: int = 8
    density: float = 0.0
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list, str]] = "all-linear"
    exclude_modules: Optional[Union[list, str]] = None
    rank_pattern: dict = field(default_factory=dict)
    density_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    bias: str = "none"
    adapter_dtype: Optional[str] = "float32"
    impl: str = "auto"
    index_dtype: str = "int32"
    base_model_name_or_path: Optional[str] = None
    peft_type: str = "ROSA"
    task_type: Optional[str] = "CAUSAL_LM"
    inference_mode: bool = False
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self):
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        check_int("r", self.r, minimum=0)
        check_fraction("density", self.density)
        for key, value in dict(self.rank_pattern).items():
            check_int(f"rank_pattern[{key!r}]", value, minimum=0)
        for key, value in dict(self.density_pattern).items():
            check_fraction(f"density_pattern[{key!r}]", value)
        if not is_real(self.lora_alpha) or self.lora_alpha <= 0:
            raise UserError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        check_fraction("lora_dropout", self.lora_dropout)
        check_choice("init_lora_weights", self.init_lora_weights, INIT_LORA_WEIGHTS)
        check_choice("bias", self.bias, BIAS, why=" (biases stay frozen)")
        check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        check_choice("impl", self.impl, IMPLS)
        check_choice("index_dtype", self.index_dtype, INDEX_DTYPES)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                if value != "all-linear":
                    try:
                        re.compile(value)
                    except re.error as exc:
                        raise UserError(f"{name} is not a valid regex: {value!r} ({exc})") from None
            elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise UserError(f"{name} must be a list of names, a regex string or 'all-linear', got {value!r}")
        if self.target_modules is None or self.target_modules == []:
            raise UserError("target_modules must name at least one module (or be 'all-linear')")
        self._check_layers_and_modules_to_save()

    def _check_layers_and_modules_to_save(self) -> None:
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        if isinstance(self.layers_pattern, tuple):
            self.layers_pattern = list(self.layers_pattern)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save) if isinstance(self.modules_to_save, set) \
                else list(self.modules_to_save)
        ltt = self.layers_to_transform
        if ltt is not None:
            values = ltt if isinstance(ltt, list) else [ltt]
            if not all(is_int(v) and v >= 0 for v in values):
                raise UserError(f"layers_to_transform must be an integer >= 0 or a list of them, got {ltt!r}")
        lp = self.layers_pattern
        if lp is not None:
            values = lp if isinstance(lp, list) else [lp]
            if not values or not all(isinstance(v, str) and v for v in values):
                raise UserError(f"layers_pattern must be a non-empty string or a non-empty list of them, got {lp!r}")
            for v in values:
                try:
                    re.compile(v)
                except re.error as exc:
                    raise UserError(f"layers_pattern is not a valid regex: {v!r} ({exc})") from None
            if ltt is None:
                raise UserError("layers_pattern is set but layers_to_transform is not: give both (as in PEFT)")
        regex_targets = isinstance(self.target_modules, str) and self.target_modules != "all-linear"
        if regex_targets and ltt is not None:
            raise UserError("layers_to_transform cannot be used when target_modules is a regex string "
                            f"({self.target_modules!r}); give a list of names or 'all-linear'")
        mts = self.modules_to_save
        if mts is not None and not (isinstance(mts, list) and all(isinstance(v, str) and v for v in mts)):
            raise UserError(f"modules_to_save must be a list of non-empty module names, got {mts!r}")

    # ---- per-module values ---------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        return int(_pattern_lookup(self.rank_pattern, module_name, self.r))

    def density_for(self, module_name: str) -> float:
        return float(_pattern_lookup(self.density_pattern, module_name, self.density))

    def scaling_for(self, module_name: str) -> float:
        r = self.rank_for(module_name)
        if r == 0:
            return 1.0
        return self.lora_alpha / (math.sqrt(r) if self.use_rslora else r)

    # ---- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Optional[str] = None) -> "RosaConfig":
        """A config from its ``to_dict`` form. ``source`` (the file it was read from) marks a saved
        config: that one must then state every key in :data:`REQUIRED_KEYS` (a missing ``lora_alpha``
        would otherwise silently scale the adapter by the default), and errors name the file."""
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise UserError(f"{where}must hold a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{where}unknown RosaConfig field(s): {', '.join(unknown)}")
        if source is not None:
            missing = [k for k in REQUIRED_KEYS if k not in data]
            if missing:
                raise UserError(f"{where}missing key {missing[0]!r}"
                                + (f" (and {', '.join(map(repr, missing[1:]))})" if len(missing) > 1 else ""))
        if data.get("peft_type", "ROSA") != "ROSA":
            raise UserError(f"{where}peft_type must be 'ROSA', got {data.get('peft_type')!r}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            if not source:
                raise
            raise UserError(f"{where}{exc}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str) -> None:
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string() + "\n")

    @classmethod
    def from_pretrained(cls, directory: str) -> "RosaConfig":
        path = os.path.join(directory, CONFIG_NAME) if os.path.isdir(directory) else directory
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
        return cls.from_dict(data, source=path)


def _pattern_lookup(pattern: dict, module_name: str, default):
    """PEFT-style override lookup: the first key whose regex matches the end of the name."""
    for key, value in pattern.items():
        if re.search(rf"(^|\.){key}$", module_name):
            return value
    return default
