"""The reference implementation's (peft-rosa) adapter format, read and written, and the conversion to and from ours.

A peft-rosa adapter directory holds PEFT's ``adapter_config.json`` (``peft_type`` ``"ROSA"``, density ``d``,
``rosa_dtype``, ``rank_pattern`` / ``density_pattern`` / ``alpha_pattern``) and ``adapter_model.safetensors``
(or a ``.bin``) whose keys are ``base_model.model.<module>.rosa_A.weight`` (r, in), ``.rosa_B.weight``
(out, r) and the sparse adapter's CSR: ``.rosa_spa.values`` (nnz), ``.rosa_spa.row_offs`` (int32, out + 1),
``.rosa_spa.col_idx`` (int16, nnz) and ``.rosa_spa.row_idx`` (int16, out: the rows by descending nnz, for the
kernels' load balancing). Its mask file is a ``torch.save`` of ``{module name: bool (out, in) mask}`` (or a
directory of ``<name>.mask`` files, each ``{"name", "mask"}``); it is read with ``weights_only=True``.

Everything is read and checked in memory first; the output directory is written in a staging directory and
appears whole or not at all. Errors in the input are :class:`UserError` lines naming the file or layer.
Only Linear layers convert (no embeddings, biases or ``modules_to_save``); see docs/migration.md.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn

from .config import CONFIG_NAME, RosaConfig
from .utils.checks import UserError
from .utils.io import (atomic_save_safetensors, atomic_write_bytes, atomic_write_text, read_json_object,
                       staged_directory)

WEIGHTS_NAME = "adapter_model.safetensors"  # the same file name in both formats
REF_WEIGHTS_BIN = "adapter_model.bin"
REF_PREFIX = "base_model.model."  # PEFT's state-dict prefix (the adapter name itself is stripped)
REF_MASK_PREFIX = "model."  # the reference names masks after the modules of its tuner (model = the HF model)
REF_MASKS_NAME = "masks.pt"
INT16_DIM = torch.iinfo(torch.int16).max + 1  # int16 indices address dimensions of at most 32768
_REF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_REF_DTYPE_NAME = {v: k for k, v in _REF_DTYPES.items()}
_A, _B = "rosa_A.weight", "rosa_B.weight"
_VALUES, _ROWS, _COLS, _ROW_IDX = "rosa_spa.values", "rosa_spa.row_offs", "rosa_spa.col_idx", "rosa_spa.row_idx"
_DERIVED = ("rosa_spa.row_idx", "rosa_spa.tr_perm", "rosa_spa.tr_row_offs", "rosa_spa.tr_row_idx",
            "rosa_spa.tr_col_idx")  # recomputed from the CSR, never needed to convert
_REF_PARTS = (_A, _B, _VALUES, _ROWS, _COLS) + _DERIVED
_OUR_PARTS = ("lora_A.weight", "lora_B.weight", "rosa_spa.values", "rosa_spa.row_offsets", "rosa_spa.col_indices")


@dataclass
class LayerAdapter:
    """One Linear layer's adapter in neither format: ``B·A`` scaled by the config, plus ``S`` in CSR.

    ``a`` (r, in) / ``b`` (out, r) are None when r = 0; ``values`` / ``row_offsets`` (int64, out + 1) /
    ``col_indices`` (int64, sorted within each row) are None without a sparse part."""

    name: str
    out_features: int
    in_features: int
    a: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    row_offsets: Optional[torch.Tensor] = None
    col_indices: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return 0 if self.a is None else self.a.shape[0]

    @property
    def nnz(self) -> int:
        return 0 if self.values is None else self.values.numel()

    def mask(self) -> torch.Tensor:
        mask = torch.zeros(self.out_features * self.in_features, dtype=torch.bool)
        if self.values is not None:
            mask[_rows_of(self.row_offsets) * self.in_features + self.col_indices] = True
        return mask.view(self.out_features, self.in_features)


def _rows_of(row_offsets: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(row_offsets.numel() - 1), row_offsets.diff())


# ---- the reference's per-layer settings ----------------------------------------------------------------
def reference_layer_settings(config: Mapping, module_name: str) -> tuple[int, float, float]:
    """``(r, d, lora_alpha)`` the reference gives ``module_name``: the *first* key of ``rank_pattern``,
    ``density_pattern`` and ``alpha_pattern`` (in that order) for which ``.*\\.{key}$`` matches the name picks
    the entry of every pattern (a pattern without that key gives the global value)."""
    patterns = [dict(config.get(k) or {}) for k in ("rank_pattern", "density_pattern", "alpha_pattern")]
    key = next((k for p in patterns for k in p if re.match(rf".*\.{k}$", module_name)), None)
    r, d, alpha = config["r"], config["d"], config["lora_alpha"]
    if key is None:
        return r, d, alpha
    return patterns[0].get(key, r), patterns[1].get(key, d), patterns[2].get(key, alpha)


def reference_nnz(density: float, shape: tuple[int, int]) -> int:
    """The number of sparse values the reference allocates for a layer: ``int(d · out · in)``."""
    return int(density * shape[0] * shape[1])


def _exact_density(nnz: int, numel: int) -> float:
    """A density ``d`` with ``int(d · numel) == nnz`` (the reference allocates exactly that many values)."""
    d = nnz / numel
    while int(d * numel) < nnz:
        d = math.nextafter(d, 2.0)
    while int(d * numel) > nnz:
        d = math.nextafter(d, -1.0)
    return d


# ---- reading --------------------------------------------------------------------------------------------
def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path, device="cpu")
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors' and the unpickler's own error types: the file is bad, not our code
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: not a readable adapter weights file ({detail})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UserError(f"{path}: does not hold a dict of named tensors")
    return tensors


def read_reference_masks(path: str) -> dict[str, torch.Tensor]:
    """The reference's masks: one ``torch.save`` file ``{name: bool mask}``, or a directory of ``*.mask`` files
    (``{"name": name, "mask": mask}`` each), read with ``weights_only=True`` (no code runs)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".mask"))
        if not files:
            raise UserError(f"masks directory {path!r} holds no '*.mask' files")
        entries = []
        for f in files:
            data = _load_mask_object(os.path.join(path, f))
            if not (isinstance(data, dict) and isinstance(data.get("name"), str) and "mask" in data):
                raise UserError(f"{os.path.join(path, f)}: not a reference mask file (a dict with 'name' and 'mask')")
            entries.append((data["name"], data["mask"]))
    elif os.path.isfile(path):
        data = _load_mask_object(path)
        if not isinstance(data, dict) or not data:
            raise UserError(f"masks file {path!r}: not a non-empty dict {{module name: bool mask}}")
        entries = list(data.items())
    else:
        raise FileNotFoundError(f"masks file {path!r} does not exist")
    out = {}
    for name, mask in entries:
        if not isinstance(name, str) or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or (
                mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all())):
            raise UserError(f"masks {path!r}: entry {name!r} is not a 2-D bool (or 0/1) mask")
        out[name] = mask.to(torch.bool)
    return out


def _load_mask_object(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler refuses anything but tensors and plain containers
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: not a readable torch mask file ({detail})") from None


def _mask_for(masks: dict, name: str, source: str) -> Optional[torch.Tensor]:
    hits = [k for k in masks if k == name or k.endswith("." + name)]
    if len(hits) > 1:
        raise UserError(f"{source}: masks {hits} all match layer {name!r}")
    return masks[hits[0]] if hits else None


def _canonical_csr(where: str, values, row_offsets, cols, out_f: int, in_f: int):
    """Check a CSR structure and sort each row's columns (values follow): int64 offsets and columns."""
    if row_offsets.dim() != 1 or row_offsets.numel() != out_f + 1:
        raise UserError(f"{where}: row offsets have shape {tuple(row_offsets.shape)}, expected ({out_f + 1},)")
    if row_offsets.is_floating_point() or cols.is_floating_point():
        raise UserError(f"{where}: row offsets and column indices must be integers")
    offsets, cols, nnz = row_offsets.to(torch.int64), cols.reshape(-1).to(torch.int64), values.numel()
    if cols.numel() != nnz:
        raise UserError(f"{where}: {cols.numel()} column indices for {nnz} values")
    if int(offsets[0]) != 0 or int(offsets[-1]) != nnz or bool((offsets.diff() < 0).any()):
        raise UserError(f"{where}: row offsets are not a CSR offset array for {nnz} values")
    if nnz and int(cols.min()) < 0:
        raise UserError(f"{where}: negative column index {int(cols.min())} (an int16 overflow: the layer has "
                        f"{in_f} columns, int16 addresses at most {INT16_DIM})")
    if nnz and int(cols.max()) >= in_f:
        raise UserError(f"{where}: column index {int(cols.max())} of a {in_f}-column weight")
    flat = _rows_of(offsets) * in_f + cols
    order = torch.argsort(flat, stable=True)
    if bool((flat[order].diff() == 0).any()):
        raise UserError(f"{where}: a column repeats within a row")
    return values.reshape(-1)[order], offsets, cols[order]


def read_reference_adapter(src_dir: str, masks: Optional[str] = None,
                           shapes: Optional[Mapping[str, tuple[int, int]]] = None) -> tuple[dict, list[LayerAdapter]]:
    """``(config dict, layers)`` of a peft-rosa adapter directory, every tensor checked.

    ``masks`` (the reference's mask file or directory) fills in the sparse structure where the adapter has
    none and must agree with it elsewhere; it also gives the column count of rank-0 layers. ``shapes``
    ({module: (out, in)}, e.g. from the base model) is the other source of that column count."""
    src_dir = os.fspath(src_dir)
    config_path = os.path.join(src_dir, CONFIG_NAME)
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"reference adapter directory {src_dir!r} does not exist")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"reference adapter directory {src_dir!r} has no {CONFIG_NAME}")
    try:
        config = read_json_object(config_path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if config.get("peft_type") != "ROSA":
        raise UserError(f"{config_path}: peft_type is {config.get('peft_type')!r}, not 'ROSA' (not a peft-rosa adapter)")
    if "d" not in config and "density" in config:
        raise UserError(f"{config_path}: a rosa-peft adapter (it has 'density', not the reference's 'd'), "
                        "not a peft-rosa one; convert it the other way (--to reference)")
    for key in ("r", "d", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise UserError(f"{config_path}: missing or non-numeric {key!r}")
    for key, supported in (("bias", "none"), ("fan_in_fan_out", False)):
        if config.get(key, supported) != supported:
            raise UserError(f"{config_path}: {key}={config[key]!r} is not supported by the conversion "
                            f"(only {supported!r})")
    if config.get("modules_to_save"):
        raise UserError(f"{config_path}: modules_to_save {config['modules_to_save']} is not converted")
    weights = next((os.path.join(src_dir, f) for f in (WEIGHTS_NAME, REF_WEIGHTS_BIN)
                    if os.path.isfile(os.path.join(src_dir, f))), None)
    if weights is None:
        raise FileNotFoundError(f"reference adapter directory {src_dir!r} has no {WEIGHTS_NAME} or {REF_WEIGHTS_BIN}")
    tensors = _load_tensors(weights)
    mask_of = read_reference_masks(masks) if masks is not None else {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        part = next((p for p in _REF_PARTS if key.endswith("." + p)), None)
        if part is None or not key.startswith(REF_PREFIX):
            raise UserError(f"{weights}: tensor {key!r} is not part of a RoSA Linear adapter "
                            "(embeddings, biases and modules_to_save are not converted)")
        grouped.setdefault(key[len(REF_PREFIX): -len(part) - 1], {})[part] = tensor
    if not grouped:
        raise UserError(f"{weights}: holds no adapter tensors")
    layers = [_reference_layer(weights, name, parts, mask_of, shapes, masks)
              for name, parts in sorted(grouped.items())]
    used = {n for layer in layers for n in mask_of if n == layer.name or n.endswith("." + layer.name)}
    stray = sorted(set(mask_of) - used)
    if stray:
        raise UserError(f"masks {masks!r}: mask {stray[0]!r} belongs to no layer with a sparse adapter in {weights}")
    return config, layers


def _reference_layer(source: str, name: str, parts: dict, mask_of: dict, shapes: Optional[Mapping],
                     masks: Optional[str]) -> LayerAdapter:
    where = f"{source}: layer {name!r}"
    if shapes is not None and name not in shapes:
        raise UserError(f"{where}: not an nn.Linear of the base model (only Linear adapters are converted)")
    shapes = shapes or {}
    a, b = parts.get(_A), parts.get(_B)
    if (a is None) != (b is None):
        raise UserError(f"{where}: has {'rosa_A' if a is not None else 'rosa_B'} without "
                        f"{'rosa_B' if a is not None else 'rosa_A'}")
    sparse = [p for p in (_VALUES, _ROWS, _COLS) if p in parts]
    if sparse and len(sparse) != 3:
        raise UserError(f"{where}: a sparse adapter needs values, row_offs and col_idx; it has only {sparse}")
    for key in (_A, _B, _VALUES):
        t = parts.get(key)
        if t is not None and (not t.is_floating_point() or not bool(torch.isfinite(t).all())):
            raise UserError(f"{where}: {key} is not a finite floating-point tensor")
    if a is not None and (a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]):
        raise UserError(f"{where}: rosa_A {tuple(a.shape)} and rosa_B {tuple(b.shape)} are not (r, in) and (out, r)")
    mask = _mask_for(mask_of, name, f"masks {masks!r}")
    out_f = b.shape[0] if b is not None else (parts[_ROWS].numel() - 1 if _ROWS in parts else None)
    in_f = a.shape[1] if a is not None else None
    for guess, what in ((tuple(mask.shape) if mask is not None else None, "mask"), (shapes.get(name), "base model")):
        if guess is not None:
            out_f = guess[0] if out_f is None else out_f
            in_f = guess[1] if in_f is None else in_f
            if (out_f, in_f) != tuple(guess):
                raise UserError(f"{where}: the {what} has shape {tuple(guess)}, the adapter ({out_f}, {in_f})")
    if in_f is None and "rosa_spa.tr_row_offs" in parts:
        in_f = parts["rosa_spa.tr_row_offs"].numel() - 1
    if out_f is None or in_f is None:
        raise UserError(f"{where}: rank 0, so the adapter does not store the layer's column count; pass the "
                        "reference's mask file (--masks) or the base model (--base)")
    layer = LayerAdapter(name, int(out_f), int(in_f), a, b)
    if sparse:
        values, offsets, cols = parts[_VALUES], parts[_ROWS], parts[_COLS]
        if offsets.numel() == out_f + 1 and int(offsets[-1]) == 0 and values.numel() > 0:  # the mask was never set
            if mask is None:
                if bool((values != 0).any()):
                    raise UserError(f"{where}: non-zero sparse values but no sparse structure (the mask was never "
                                    "set); pass the reference's mask file (--masks)")
                return layer  # an all-zero sparse adapter adds nothing: it is dropped
            if int(mask.sum()) != values.numel():
                raise UserError(f"{where}: the mask keeps {int(mask.sum())} entries, the adapter holds "
                                f"{values.numel()} sparse values")
            rows, cols = mask.nonzero(as_tuple=True)
            offsets = torch.zeros(out_f + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=out_f), 0)
        layer.values, layer.row_offsets, layer.col_indices = _canonical_csr(where, values, offsets, cols, out_f, in_f)
        if mask is not None and not torch.equal(layer.mask(), mask):
            raise UserError(f"{where}: the mask in {masks!r} differs from the adapter's sparse structure")
    elif mask is not None:
        raise UserError(f"masks {masks!r}: layer {name!r} has a mask but no sparse adapter in {source}")
    return layer


def read_rosa_adapter(src_dir: str, shapes: Optional[Mapping[str, tuple[int, int]]] = None
                      ) -> tuple[RosaConfig, list[LayerAdapter]]:
    """``(RosaConfig, layers)`` of one of our adapter directories (``save_pretrained``), every tensor checked;
    ``shapes`` ({module: (out, in)}) gives the column count of rank-0 layers."""
    src_dir = os.fspath(src_dir)
    weights = os.path.join(src_dir, WEIGHTS_NAME)
    for required in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(src_dir, required)):
            raise FileNotFoundError(f"adapter directory {src_dir!r} has no {required}")
    try:
        raw = read_json_object(os.path.join(src_dir, CONFIG_NAME))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if "d" in raw and "density" not in raw:
        raise UserError(f"{os.path.join(src_dir, CONFIG_NAME)}: a peft-rosa adapter (it has the reference's 'd', "
                        "not 'density'); convert it the other way (--to rosa)")
    config = RosaConfig.from_dict(raw, source=os.path.join(src_dir, CONFIG_NAME))
    tensors = _load_tensors(weights)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        part = next((p for p in _OUR_PARTS if key.endswith("." + p)), None)
        if part is None:
            raise UserError(f"{weights}: tensor {key!r} is not part of a RoSA Linear adapter "
                            "(modules_to_save are not converted)")
        grouped.setdefault(key[: -len(part) - 1], {})[part] = tensor
    if not grouped:
        raise UserError(f"{weights}: holds no adapter tensors")
    layers = []
    for name, parts in sorted(grouped.items()):
        renamed = {_A: parts.get("lora_A.weight"), _B: parts.get("lora_B.weight"), _VALUES: parts.get("rosa_spa.values"),
                   _ROWS: parts.get("rosa_spa.row_offsets"), _COLS: parts.get("rosa_spa.col_indices")}
        layers.append(_reference_layer(weights, name, {k: v for k, v in renamed.items() if v is not None}, {},
                                       shapes, None))
    return config, layers


def shapes_of(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of every ``nn.Linear`` of ``model`` (the layers both formats adapt)."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


# ---- writing --------------------------------------------------------------------------------------------
def _check_out_dir(src_dir: str, out_dir: str, overwrite: bool) -> None:
    if os.path.abspath(src_dir) == os.path.abspath(out_dir):
        raise UserError(f"the output directory {out_dir!r} is the input directory")
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"output directory {out_dir!r} already exists (pass --overwrite to replace it)")


def convert_reference_to_rosa(src_dir: str, out_dir: str, masks: Optional[str] = None,
                              base_model: Optional[nn.Module] = None, overwrite: bool = False) -> RosaConfig:
    """Convert a peft-rosa adapter directory (plus, optionally, its mask file) into one of ours that
    ``RosaModel.from_pretrained(base, out_dir)`` loads, computing the same layer outputs.

    Per-layer ranks and densities become exact ``rank_pattern`` / ``density_pattern`` entries; a per-layer
    ``alpha_pattern`` (which our config has no field for) is folded into ``B``. Returns the written config."""
    _check_out_dir(src_dir, out_dir, overwrite)
    ref, layers = read_reference_adapter(src_dir, masks, shapes_of(base_model) if base_model is not None else None)
    r, d, alpha, rslora = int(ref["r"]), float(ref["d"]), float(ref["lora_alpha"]), bool(ref.get("use_rslora", False))
    rank_pattern, density_pattern, tensors = {}, {}, {}
    for layer in layers:
        key = re.escape(layer.name)
        if layer.rank != r:
            rank_pattern[key] = layer.rank
        numel = layer.out_features * layer.in_features
        if layer.nnz > math.ceil(d * numel) or (d == 0 and layer.nnz):
            density_pattern[key] = layer.nnz / numel
        if layer.a is not None:
            _, _, layer_alpha = reference_layer_settings(ref, layer.name)
            b = layer.b
            if float(layer_alpha) != alpha:  # s_ref / s_ours = alpha_layer / lora_alpha (same r, same rsLoRA)
                b = (b.to(torch.float64) * (float(layer_alpha) / alpha)).to(torch.promote_types(b.dtype, torch.float32))
            tensors[f"{layer.name}.lora_A.weight"] = layer.a.contiguous()
            tensors[f"{layer.name}.lora_B.weight"] = b.contiguous()
        if layer.values is not None:
            tensors[f"{layer.name}.rosa_spa.values"] = layer.values.contiguous()
            tensors[f"{layer.name}.rosa_spa.row_offsets"] = layer.row_offsets.to(torch.int32)
            tensors[f"{layer.name}.rosa_spa.col_indices"] = layer.col_indices.to(torch.int32)
    try:
        config = RosaConfig(r=r, density=d, lora_alpha=alpha, lora_dropout=float(ref.get("lora_dropout") or 0.0),
                            target_modules=[layer.name for layer in layers], rank_pattern=rank_pattern,
                            density_pattern=density_pattern, use_rslora=rslora, init_lora_weights=True,
                            base_model_name_or_path=ref.get("base_model_name_or_path"),
                            task_type=ref.get("task_type") or "CAUSAL_LM", inference_mode=True)
    except ValueError as exc:
        raise UserError(f"{os.path.join(src_dir, CONFIG_NAME)}: {exc}") from None
    with staged_directory(out_dir, overwrite=overwrite) as tmp:
        atomic_save_safetensors(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt", "rosa_peft": "1"})
        config.save_pretrained(tmp)
    return config


def _reference_pattern_key(name: str, names: list[str]) -> str:
    """A key the reference's ``.*\\.{key}$`` rule matches for ``name`` and for no other converted layer."""
    if "." not in name:
        raise UserError(f"layer {name!r}: the reference's patterns cannot address a top-level module")
    key = re.escape(name.split(".", 1)[1])
    clash = [n for n in names if n != name and re.match(rf".*\.{key}$", n)]
    if clash:
        raise UserError(f"layer {name!r}: no per-layer pattern key of the reference tells it from {clash[0]!r}")
    return key


def convert_rosa_to_reference(src_dir: str, out_dir: str, base_model: Optional[nn.Module] = None,
                              rosa_dtype: Optional[str] = None, write_masks: bool = False,
                              overwrite: bool = False) -> dict:
    """Convert one of our adapter directories into a peft-rosa one (the reverse of
    :func:`convert_reference_to_rosa`), refusing a layer whose rows or columns int16 cannot address.

    ``rosa_dtype`` (``bf16`` / ``fp16`` / ``fp32``) is the dtype of the written tensors; by default that of
    the adapter (float64 becomes fp32). ``write_masks`` adds the reference's mask file ``masks.pt`` (a
    ``torch.save`` dict; point ``mask_load_path`` at it to keep training). Returns the written config."""
    _check_out_dir(src_dir, out_dir, overwrite)
    if rosa_dtype is not None and rosa_dtype not in _REF_DTYPES:
        raise UserError(f"rosa_dtype must be one of {sorted(_REF_DTYPES)}, got {rosa_dtype!r}")
    config, layers = read_rosa_adapter(src_dir, shapes_of(base_model) if base_model is not None else None)
    for layer in layers:
        for size, what in ((layer.out_features, "rows"), (layer.in_features, "columns")):
            if size > INT16_DIM:
                raise UserError(f"layer {layer.name!r}: its {size} {what} do not fit the reference's int16 indices "
                                f"(at most {INT16_DIM}); this adapter cannot be converted")
    floats = {t.dtype for layer in layers for t in (layer.a, layer.b, layer.values) if t is not None}
    if rosa_dtype is None:
        rosa_dtype = _REF_DTYPE_NAME[floats.pop()] if len(floats) == 1 and floats <= set(_REF_DTYPE_NAME) else "fp32"
    dtype = _REF_DTYPES[rosa_dtype]
    names = [layer.name for layer in layers]
    r, d = int(config.r), float(config.density)
    rank_pattern, density_pattern, tensors = {}, {}, {}
    for layer in layers:
        layer_d = _exact_density(layer.nnz, layer.out_features * layer.in_features) if layer.nnz else 0.0
        if layer.rank != r or reference_nnz(d, (layer.out_features, layer.in_features)) != layer.nnz:
            key = _reference_pattern_key(layer.name, names)
            rank_pattern[key], density_pattern[key] = layer.rank, layer_d
        prefix = REF_PREFIX + layer.name
        if layer.a is not None:
            tensors[f"{prefix}.{_A}"] = layer.a.to(dtype).contiguous()
            tensors[f"{prefix}.{_B}"] = layer.b.to(dtype).contiguous()
        if layer.values is not None:
            offsets = layer.row_offsets.to(torch.int32)
            tensors[f"{prefix}.{_VALUES}"] = layer.values.to(dtype).contiguous()
            tensors[f"{prefix}.{_ROWS}"] = offsets
            tensors[f"{prefix}.{_COLS}"] = layer.col_indices.to(torch.int16)
            tensors[f"{prefix}.{_ROW_IDX}"] = torch.argsort(-offsets.diff(), stable=True).to(torch.int16)
    ref = {
        "peft_type": "ROSA", "auto_mapping": None, "base_model_name_or_path": config.base_model_name_or_path,
        "revision": None, "task_type": config.task_type, "inference_mode": True,
        "r": r, "d": d, "target_modules": names, "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout, "impl": "auto", "spa_store_transpose": True, "spa_num_grads": 1,
        "grad_acc_mode": "mean_squared", "mask_load_path": None, "mask_save_path": None, "rosa_dtype": rosa_dtype,
        "terminate_after_mask_generation": False, "schedule": "default", "fan_in_fan_out": False, "bias": "none",
        "use_rslora": config.use_rslora, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": rank_pattern,
        "density_pattern": density_pattern, "alpha_pattern": {}, "megatron_config": None,
        "megatron_core": "megatron.core", "loftq_config": {},
    }
    with staged_directory(out_dir, overwrite=overwrite) as tmp:
        atomic_save_safetensors(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        atomic_write_text(os.path.join(tmp, CONFIG_NAME), json.dumps(ref, indent=2, sort_keys=True) + "\n")
        if write_masks:
            buffer = io.BytesIO()
            torch.save({REF_MASK_PREFIX + layer.name: layer.mask() for layer in layers if layer.values is not None},
                       buffer)
            atomic_write_bytes(os.path.join(tmp, REF_MASKS_NAME), buffer.getvalue())
    return ref
