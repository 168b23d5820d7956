"""Sparse adapter storage and the ops RoSA needs, behind one dispatch point."""
from .dispatch import add_into, choose, explain, gather_from, register, sddmm, spmm, spmm_t, write_into
from .storage import SparseAdapter, coords_to_csr, index_dtype_for, mask_to_csr

__all__ = [
    "SparseAdapter",
    "add_into",
    "choose",
    "coords_to_csr",
    "explain",
    "gather_from",
    "index_dtype_for",
    "mask_to_csr",
    "register",
    "sddmm",
    "spmm",
    "spmm_t",
    "write_into",
]
