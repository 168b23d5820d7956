"""Mask files: save_masks / load_masks (safetensors; per layer the CSR indices of the kept entries).

Format "2" (written): per layer ``<name>.row_offsets`` (int32, out + 1) and ``<name>.col_indices`` (int16
where the layer has at most 32768 columns, else int32) -- the CSR layout the adapter stores -- with
the layer order and the (out, in) shapes in the metadata. Format "1" (and untagged files, read only):
one dense uint8 0/1 tensor per layer.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch
from safetensors import safe_open

from ..sparse import mask_to_csr
from ..utils.checks import UserError, is_int
from ..utils.io import atomic_save_safetensors

_FORMAT_KEY = "rosa_peft_masks"
_DENSE_FORMAT, _CSR_FORMAT = "1", "2"
_ROWS, _COLS = ".row_offsets", ".col_indices"


def save_masks(masks: Mapping[str, torch.Tensor], path: str) -> None:
    """Write {layer: bool (out, in) mask} to a safetensors file atomically, compactly: per layer the CSR
    indices of the kept entries (``row_offsets`` int32, ``col_indices`` int16/int32, ~2-4 bytes per kept
    entry), plus metadata with a format tag, the layer order and the shapes."""
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty dict {layer name: bool tensor}")
    tensors, shapes = {}, {}
    for name, m in masks.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"masks: layer names must be non-empty strings, got {name!r}")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ValueError(f"masks[{name!r}] must be a bool tensor, got "
                             f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
        if m.dim() != 2:
            raise ValueError(f"masks[{name!r}] must be 2-D (out, in), got shape {tuple(m.shape)}")
        index_dtype = "int16" if m.shape[1] - 1 <= torch.iinfo(torch.int16).max else "int32"
        rows, cols = mask_to_csr(m.detach().cpu(), index_dtype)
        tensors[name + _ROWS], tensors[name + _COLS] = rows, cols
        shapes[name] = list(m.shape)
    if len(tensors) != 2 * len(shapes):
        raise ValueError("masks: layer names collide once '.row_offsets' / '.col_indices' are appended")
    metadata = {"format": "pt", _FORMAT_KEY: _CSR_FORMAT, "order": json.dumps(list(shapes)),
                "shapes": json.dumps(shapes)}
    atomic_save_safetensors(tensors, os.fspath(path), metadata=metadata)


def _csr_masks(path: str, tensors: dict, metadata: dict, order: list) -> dict[str, torch.Tensor]:
    """The masks of a format-2 file, each CSR validated before it is expanded."""
    try:
        shapes = json.loads(metadata.get("shapes", ""))
    except ValueError:
        shapes = None
    if not isinstance(shapes, dict) or sorted(shapes) != sorted(order):
        raise UserError(f"masks file {path!r}: its 'shapes' metadata does not list the stored masks")
    out = {}
    for name in order:
        shape = shapes[name]
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(is_int(n) and n >= 0 for n in shape)):
            raise UserError(f"masks file {path!r}: mask {name!r} has no valid (out, in) shape in the metadata")
        n_out, n_in = shape
        rows, cols = tensors[name + _ROWS], tensors[name + _COLS]
        if rows.dtype != torch.int32 or cols.dtype not in (torch.int16, torch.int32) or rows.dim() != 1 or cols.dim() != 1:
            raise UserError(f"masks file {path!r}: mask {name!r} is not int32 row offsets + int16/int32 column indices")
        rows, cols = rows.to(torch.int64), cols.to(torch.int64)
        counts = rows.diff()
        if (rows.numel() != n_out + 1 or int(rows[0]) != 0 or int(rows[-1]) != cols.numel()
                or bool((counts < 0).any())):
            raise UserError(f"masks file {path!r}: mask {name!r} has inconsistent row offsets for shape {tuple(shape)}")
        row_of = torch.repeat_interleave(torch.arange(n_out), counts)
        flat = row_of * n_in + cols
        if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n_in or bool((flat.diff() <= 0).any())):
            raise UserError(f"masks file {path!r}: mask {name!r} has column indices out of range, unsorted or repeated")
        mask = torch.zeros(n_out * n_in, dtype=torch.bool)
        mask[flat] = True
        out[name] = mask.view(n_out, n_in)
    return out


def load_masks(path: str) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_masks` -- the compact CSR format, or the dense uint8 0/1 format
    of earlier versions: {layer: bool tensor} on the CPU, in the saved order, validated."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"masks file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise UserError(f"masks file {path!r} is not a readable safetensors file: {exc}") from exc
    tag = metadata.get(_FORMAT_KEY)
    if tag is not None and tag not in (_DENSE_FORMAT, _CSR_FORMAT):
        raise UserError(f"masks file {path!r} has format version {tag!r}; this rosa-peft reads "
                         f"{_DENSE_FORMAT!r} and {_CSR_FORMAT!r}")
    if not tensors:
        raise UserError(f"masks file {path!r} holds no masks")
    if tag == _CSR_FORMAT:
        stored = [k[: -len(_ROWS)] for k in tensors if k.endswith(_ROWS)]
        if sorted(tensors) != sorted([n + _ROWS for n in stored] + [n + _COLS for n in stored]):
            raise UserError(f"masks file {path!r}: every mask needs exactly a '.row_offsets' and a "
                             "'.col_indices' tensor")
    else:
        stored = list(tensors)
    order = stored
    if "order" in metadata:  # safetensors sorts keys: the saved order (the model's) is in the metadata
        try:
            order = json.loads(metadata["order"])
        except ValueError:
            order = None
        if not isinstance(order, list) or sorted(order) != sorted(stored):
            raise UserError(f"masks file {path!r}: its 'order' metadata does not list the stored masks")
    if tag == _CSR_FORMAT:
        return _csr_masks(path, tensors, metadata, order)
    out = {}
    for name in order:
        t = tensors[name]
        if t.dtype not in (torch.uint8, torch.bool):
            raise UserError(f"masks file {path!r}: tensor {name!r} has dtype {t.dtype}, not a mask (uint8 0/1)")
        if t.dtype == torch.uint8 and t.numel() and int(t.max()) > 1:
            raise UserError(f"masks file {path!r}: tensor {name!r} holds values other than 0 and 1")
        out[name] = t.to(torch.bool)
    return out
