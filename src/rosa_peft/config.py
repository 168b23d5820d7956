"""RosaConfig: every knob of a RoSA adapter, validated on construction, JSON round trip."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .io import atomic_write_text

CONFIG_NAME = "adapter_config.json"
IMPLS = ("auto", "merged", "sp_add")
ADAPTER_DTYPES = (None, "float32", "bfloat16", "float16", "float64")
BIAS = ("none",)


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
            ``"sp_add"`` adds ``S`` into a temporary copy per call (the reference's path, and the
            only one for quantized bases); ``"auto"`` picks per layer.
        index_dtype: ``"int32"`` or ``"int16"`` for the sparse column indices (int16 only where the
            weight has at most 32767 columns).
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

    def __post_init__(self):
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        _check_rank("r", self.r)
        _check_density("density", self.density)
        for key, value in dict(self.rank_pattern).items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in dict(self.density_pattern).items():
            _check_density(f"density_pattern[{key!r}]", value)
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ValueError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        if self.bias not in BIAS:
            raise ValueError(f"bias must be 'none' (biases stay frozen), got {self.bias!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.index_dtype not in ("int32", "int16"):
            raise ValueError(f"index_dtype must be 'int32' or 'int16', got {self.index_dtype!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                if value != "all-linear":
                    try:
                        re.compile(value)
                    except re.error as exc:
                        raise ValueError(f"{name} is not a valid regex: {value!r} ({exc})") from None
            elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"{name} must be a list of names, a regex string or 'all-linear', got {value!r}")
        if self.target_modules is None or self.target_modules == []:
            raise ValueError("target_modules must name at least one module (or be 'all-linear')")

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
    def from_dict(cls, data: dict[str, Any]) -> "RosaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RosaConfig field(s): {', '.join(unknown)}")
        if data.get("peft_type", "ROSA") != "ROSA":
            raise ValueError(f"peft_type must be 'ROSA', got {data.get('peft_type')!r}")
        return cls(**data)

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
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data)


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _check_density(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _pattern_lookup(pattern: dict, module_name: str, default):
    """PEFT-style override lookup: the first key whose regex matches the end of the name."""
    for key, value in pattern.items():
        if re.search(rf"(^|\.){key}$", module_name):
            return value
    return default
