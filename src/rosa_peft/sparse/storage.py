"""Sparse adapter storage: trainable values at fixed (row, col) positions of a weight, CSR layout.

``row_offsets`` (int32, ``out + 1``) and ``col_indices`` (int32 by default, int16 only where the
weight has at most 32767 columns) are buffers and are saved with the adapter; per-nnz row labels and
flat positions are derived on demand and cached (never saved).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import INDEX_DTYPES
from ..utils.checks import check_choice
from ..utils.device import is_sharded

INT16_MAX = torch.iinfo(torch.int16).max
SHARDED_MASK_FIX = ("masks must be installed before sharding: compute_masks works on the sharded model, then "
                    "build the model again, set_masks and fully_shard it (docs/training.md, FSDP2)")


def index_dtype_for(n_cols: int, requested: str = "int32") -> torch.dtype:
    check_choice("index_dtype", requested, INDEX_DTYPES)
    if requested == "int16":
        if n_cols - 1 > INT16_MAX:
            raise ValueError(
                f"index_dtype='int16' cannot address {n_cols} columns (int16 holds at most {INT16_MAX + 1}); use 'int32'"
            )
        return torch.int16
    return torch.int32


def mask_to_csr(mask: torch.Tensor, index_dtype: str = "int32") -> tuple[torch.Tensor, torch.Tensor]:
    """Bool mask (out, in) -> (row_offsets int32 [out+1], col_indices [nnz]) sorted row-major."""
    if mask.dim() != 2:
        raise ValueError(f"a sparse mask must be 2-D (out, in), got shape {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order
    return coords_to_csr(rows, cols, tuple(mask.shape), index_dtype, _sorted_unique=True)


def coords_to_csr(
    rows: torch.Tensor,
    cols: torch.Tensor,
    shape: tuple[int, int],
    index_dtype: str = "int32",
    _sorted_unique: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) coordinate lists -> CSR (row_offsets int32, col_indices). Duplicates are an error."""
    out_f, in_f = shape
    rows = torch.as_tensor(rows).reshape(-1).to(torch.int64)
    cols = torch.as_tensor(cols).reshape(-1).to(torch.int64)
    if rows.numel() != cols.numel():
        raise ValueError(f"rows and cols differ in length ({rows.numel()} vs {cols.numel()})")
    if rows.numel():
        if int(rows.min()) < 0 or int(rows.max()) >= out_f:
            raise ValueError(f"row index out of range for a weight of shape {shape}")
        if int(cols.min()) < 0 or int(cols.max()) >= in_f:
            raise ValueError(f"column index out of range for a weight of shape {shape}")
    if not _sorted_unique:
        flat = rows * in_f + cols
        flat_sorted = torch.unique(flat, sorted=True)
        if flat_sorted.numel() != flat.numel():
            raise ValueError("duplicate (row, col) positions in a sparse mask")
        rows, cols = flat_sorted // in_f, flat_sorted % in_f
    counts = torch.bincount(rows, minlength=out_f)
    row_offsets = torch.zeros(out_f + 1, dtype=torch.int64, device=rows.device)
    row_offsets[1:] = torch.cumsum(counts, 0)
    if rows.numel() > torch.iinfo(torch.int32).max:
        raise ValueError("more than 2**31 - 1 non-zeros in one layer is not supported")
    return row_offsets.to(torch.int32), cols.to(index_dtype_for(in_f, index_dtype))


class SparseAdapter(nn.Module):
    """Trainable values at the positions of a fixed mask over an (out, in) weight."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, device=None, index_dtype: str = "int32"):
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.index_dtype = index_dtype
        index_dtype_for(in_features, index_dtype)  # validate early
        self.values = nn.Parameter(torch.zeros(0, dtype=dtype, device=device))
        self.register_buffer("row_offsets", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("col_indices", torch.zeros(0, dtype=index_dtype_for(in_features, index_dtype), device=device))
        self._cache: dict = {}

    # ---- construction ----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def has_mask(self) -> bool:
        return self.values.numel() > 0

    def set_mask(self, mask: torch.Tensor, init_values: Optional[torch.Tensor] = None) -> None:
        """Replace the mask (bool tensor of the weight's shape); values restart at zero (or ``init_values``)."""
        if tuple(mask.shape) != self.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the weight shape {self.shape}")
        row_offsets, col_indices = mask_to_csr(mask.to(self.row_offsets.device), self.index_dtype)
        self._install(row_offsets, col_indices, init_values)

    def set_csr(self, row_offsets: torch.Tensor, col_indices: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Install a stored CSR structure (e.g. from an adapter file) after checking it fits the weight."""
        row_offsets = row_offsets.to(torch.int64).reshape(-1)
        col_indices = col_indices.reshape(-1)
        if row_offsets.numel() != self.out_features + 1:
            raise ValueError(
                f"row_offsets has {row_offsets.numel()} entries, expected out_features + 1 = {self.out_features + 1}"
            )
        nnz = col_indices.numel()
        if int(row_offsets[0]) != 0 or int(row_offsets[-1]) != nnz or bool((row_offsets[1:] < row_offsets[:-1]).any()):
            raise ValueError("row_offsets is not a valid CSR offset array for the stored column indices")
        if nnz and (int(col_indices.min()) < 0 or int(col_indices.max()) >= self.in_features):
            raise ValueError(f"column index out of range for a weight with {self.in_features} columns")
        if values is not None and values.numel() != nnz:
            raise ValueError(f"{values.numel()} sparse values for {nnz} mask positions")
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=row_offsets.device), row_offsets.diff())
        coords_to_csr(rows, col_indices.to(torch.int64), self.shape, self.index_dtype)  # rejects duplicates
        self._install(
            row_offsets.to(torch.int32),
            col_indices.to(index_dtype_for(self.in_features, self.index_dtype)),
            values,
        )

    def _install(self, row_offsets, col_indices, init_values) -> None:
        if is_sharded(self.values):
            # FSDP2 owns this Parameter: a new one would be swapped back for its (empty) shard at every
            # forward, and the sparse part would silently neither run nor train
            raise RuntimeError(f"the sparse values are sharded (FSDP2 fully_shard); {SHARDED_MASK_FIX}")
        device = self.values.device
        self.row_offsets = row_offsets.to(device)
        self.col_indices = col_indices.to(device)
        nnz = col_indices.numel()
        data = torch.zeros(nnz, dtype=self.values.dtype, device=device)
        if init_values is not None:
            data.copy_(init_values.reshape(-1))
        if self.values.numel() == 0:
            # the first mask: the same Parameter object with the new data, so an optimizer built before the
            # masks (over the trainable parameters, the empty values included) holds it and trains it from
            # here; the empty values never had a gradient, so no optimizer has state for them
            self.values.data = data
            self.values.grad = None
        else:
            # replacing values: a new Parameter, so no optimizer applies its state for the old positions to
            # the new ones (build the optimizer again after a re-mask)
            self.values = nn.Parameter(data, requires_grad=self.values.requires_grad)
        self._cache = {}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``load_state_dict`` of a different mask (another nnz) installs that structure instead of failing
        on the size mismatch; the values become a new Parameter (as with :meth:`set_mask`)."""
        keys = [prefix + k for k in ("values", "row_offsets", "col_indices")]
        if all(k in state_dict for k in keys):
            values, row_offsets, col_indices = (state_dict[k] for k in keys)
            if values.shape != self.values.shape or col_indices.shape != self.col_indices.shape:
                with torch.no_grad():
                    self.set_csr(row_offsets, col_indices, values.to(self.values.dtype))
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- derived index views (cached per device) ---------------------------------------------------
    def _cached(self, key: str, fn):
        # versions too: load_state_dict copies a new structure into the same buffers in place
        full_key = (key, self.row_offsets.device, self.row_offsets.data_ptr(), self.col_indices.data_ptr(),
                    self.row_offsets._version, self.col_indices._version)
        hit = self._cache.get(full_key)
        if hit is None:
            self._cache = {k: v for k, v in self._cache.items() if k[2:] == full_key[2:]}
            hit = fn()
            self._cache[full_key] = hit
        return hit

    def row_indices(self) -> torch.Tensor:
        """int64 row of every non-zero."""
        return self._cached(
            "rows",
            lambda: torch.repeat_interleave(
                torch.arange(self.out_features, device=self.row_offsets.device), self.row_offsets.to(torch.int64).diff()
            ),
        )

    def flat_indices(self) -> torch.Tensor:
        """int64 position of every non-zero in the flattened (row-major) weight."""
        return self._cached("flat", lambda: self.row_indices() * self.in_features + self.col_indices.to(torch.int64))

    def to_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.out_features * self.in_features, dtype=torch.bool, device=self.values.device)
        mask[self.flat_indices()] = True
        return mask.view(self.shape)

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.values.dtype
        dense = torch.zeros(self.out_features * self.in_features, dtype=dtype, device=self.values.device)
        dense[self.flat_indices()] = self.values.detach().to(dtype)
        return dense.view(self.shape)

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.out_features * self.in_features)
        return f"shape={self.shape}, nnz={self.nnz}, density={density:.4%}, index_dtype={self.index_dtype}"
