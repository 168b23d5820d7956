"""Sparse masks for RoSA: score every target weight, keep the top entries, save / load the masks.

Criteria: ``fisher`` (mean over micro-batches of dW⊙dW — the paper's default), ``grad`` (|mean dW|),
``magnitude`` (|W0|, de-quantised for 4-bit bases) and ``random`` (seeded uniform scores). Gradient
scores come from hooks (:class:`GradientCollector`), selection from :func:`select_masks`. See
docs/masks.md.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
import zlib
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

from .io import atomic_save_safetensors
from .masks_collector import GradientCollector, distributed_world, named_rosa_layers
from .masks_select import BUDGETS, Selector, check_budget, resolve_densities, select_masks, top_k_masks

CRITERIA = ("fisher", "grad", "magnitude", "random")
_FORMAT_KEY, _FORMAT_VALUE = "rosa_peft_masks", "1"

__all__ = ["CRITERIA", "BUDGETS", "GradientCollector", "compute_masks", "select_masks", "top_k_masks",
           "magnitude_scores", "random_scores", "save_masks", "load_masks"]


# ---- scores that need no data --------------------------------------------------------------------
@torch.no_grad()
def magnitude_scores(layer, adapter_name: Optional[str] = None) -> torch.Tensor:
    """|W0| of a RosaLinear in float32 (float64 for float64 bases), on the weight's device.

    W0 is the frozen base weight: de-quantised for 4-bit bases, and with the pretrained values put
    back at the mask positions when the ``merged`` implementation holds W0 + S in the base weight.
    """
    if layer.merged_adapters:
        raise ValueError(f"{layer.module_name!r}: adapters are merged into the base weight; unmerge before "
                         "computing magnitude scores")
    dtype = torch.float64 if layer.kind.compute_dtype(layer.base_layer) == torch.float64 else torch.float32
    scores = layer.base_weight(dtype).abs_()
    return scores


def random_scores(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """Uniform [0, 1) float32 scores on the CPU from a generator seeded by (seed, layer name): the same
    for a layer whatever the other layers or the grouping are."""
    layer_seed = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)
    return torch.rand(shape, generator=torch.Generator().manual_seed(layer_seed))


# ---- helpers for compute_masks -------------------------------------------------------------------
def _check_int(field: str, value, allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return value


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _on(t: torch.Tensor, device) -> torch.Tensor:
    return t if device is None else t.to(device)


def _batch_iter(batches):
    return iter(batches()) if callable(batches) else iter(batches)


def _to_device(batch, device):
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _loss_of(model, batch, loss_fn, index: int) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        if not isinstance(batch, Mapping):
            raise TypeError(f"micro-batch {index} is a {type(batch).__name__}: batches must be dicts of model "
                            "inputs (with labels), or pass loss_fn(model, batch)")
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError(f"micro-batch {index}: the model output has no loss; the batches need 'labels' "
                             "(or pass loss_fn(model, batch))")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"micro-batch {index}: the loss must be a scalar tensor, got "
                         f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(f"micro-batch {index}: the loss is not finite ({float(loss)})")
    return loss.reshape(())


@contextlib.contextmanager
def _scoring_state(model, adapter: str):
    """Train mode, the adapter active, every parameter frozen, a forked RNG; afterwards modes, flags, grads
    and adapter as before."""
    params = list(model.parameters())
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in params]
    grads = [(p, p.grad) for p in params]
    previous = model.active_adapter
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        if adapter != previous:
            model.set_adapter(adapter)
        model.train()
        # Scoring needs only dO of each scored layer (reached through the collector's zero-leaf taps), never
        # a parameter gradient: with every parameter frozen, backward skips the LoRA / sparse / bias grads
        # (and the dropout-mask recomputation they need). Forward values and dO are unchanged.
        for p in params:
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            yield
    finally:
        if model.active_adapter != previous:
            model.set_adapter(previous)
        for p, f in flags:
            p.requires_grad_(f)
        for p, g in grads:
            p.grad = g
        for m, t in modes:
            m.training = t


def _score_pass(model, collector, batches, num_batches, loss_fn, seed, bar) -> int:
    torch.manual_seed(seed)  # the same dropout draws on every pass
    device = _model_device(model)
    count = 0
    it = _batch_iter(batches)
    while num_batches is None or count < num_batches:
        try:
            batch = next(it)
        except StopIteration:
            break
        loss = _loss_of(model, _to_device(batch, device), loss_fn, count)
        before = collector.num_batches
        if loss.requires_grad and collector.taps():
            torch.autograd.grad(loss, collector.taps(), allow_unused=True)
            collector.flush()
        if collector.num_batches == before:
            raise ValueError(f"micro-batch {count}: the loss does not depend on any scored RoSA layer "
                             f"(e.g. {next(iter(collector.layers))!r})")
        count += 1
        bar.update(1)
    return count


# ---- the entry point ----------------------------------------------------------------------------
def compute_masks(
    model,
    batches: Union[Iterable, Callable[[], Iterable], None] = None,
    criterion: str = "fisher",
    density: Union[float, Mapping[str, float], None] = None,
    num_batches: Optional[int] = None,
    budget: str = "per_layer",
    adapter_name: Optional[str] = None,
    max_layers_per_pass: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    *,
    loss_fn: Optional[Callable] = None,
    device="cpu",
    process_group=None,
    sync: Optional[bool] = None,
) -> dict[str, torch.Tensor]:
    """Masks {layer name: bool (out, in) on the CPU} for every RoSA layer of ``adapter_name``.

    ``batches``: micro-batches (dicts of model inputs with labels; ``loss = model(**batch).loss``, or
    ``loss_fn(model, batch)``), an iterable or a callable returning one; each is one forward + backward.
    Needed by ``fisher`` / ``grad`` only; ``num_batches`` caps how many are used per pass. ``density``:
    None = the adapter config's ``density_for(name)``, else a float or {name: float}. ``budget``:
    ``per_layer`` (k = int(d·numel) per layer) or ``global``. ``max_layers_per_pass``: score at most this
    many layers per pass over the batches (accumulator RAM ≈ 4 bytes × Σ numel of one group; the
    batches must then yield the same micro-batches on every pass). ``device``: where accumulators live
    (None = on the layer's device). Scoring runs in train mode with the RNG seeded from ``seed``; the
    model's modes, parameter grads, requires_grad flags and active adapter are restored afterwards.

    Several processes (DDP): ``sync=None`` (default) all-reduces the gradient statistics over
    ``process_group`` (default: the world) whenever ``torch.distributed`` is initialised with more than
    one process, so each rank scores its own share of the micro-batches and every rank then selects
    from the same global mean — identical masks everywhere. ``sync=False`` keeps each rank's scores
    local. ``magnitude`` and ``random`` need no exchange (every rank has the same weights and seed).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    check_budget(budget)
    if not hasattr(model, "rosa_layers") or not hasattr(model, "peft_config"):
        raise TypeError(f"model must be a RosaModel (from get_rosa_model), got {type(model).__name__}")
    adapter = adapter_name or model.active_adapter
    if adapter not in model.peft_config:
        raise ValueError(f"adapter_name: unknown adapter {adapter!r}; have {sorted(model.peft_config)}")
    num_batches = _check_int("num_batches", num_batches)
    if sync is None:
        sync = distributed_world(process_group) > 1
    elif sync and distributed_world(process_group) == 1:
        sync = False  # one process: nothing to exchange
    max_layers_per_pass = _check_int("max_layers_per_pass", max_layers_per_pass)
    layers = {n: l for n, l in named_rosa_layers(model) if adapter in l.rosa_spa}
    if not layers:
        raise ValueError(f"no RoSA layer carries adapter {adapter!r}")
    if density is None:
        config = model.peft_config[adapter]
        density = {n: config.density_for(n) for n in layers}
    densities = resolve_densities(density, list(layers))
    selector = Selector({n: (l.out_features, l.in_features) for n, l in layers.items()}, densities, budget)
    names = selector.needs_scores
    if not names or (budget == "global" and selector.total == 0):
        raise ValueError("the densities select no weight entry in any layer (set RosaConfig(density=...) or pass density=)")
    step = max_layers_per_pass or len(names)
    groups = [names[i:i + step] for i in range(0, len(names), step)]

    if criterion == "magnitude":
        for group in (groups if budget == "global" else [[n] for n in names]):
            selector.add({n: _on(magnitude_scores(layers[n], adapter), device) for n in group})
        return selector.result(device="cpu")
    if criterion == "random":
        for group in (groups if budget == "global" else [[n] for n in names]):
            selector.add({n: _on(random_scores(n, (layers[n].out_features, layers[n].in_features), seed), device)
                          for n in group})
        return selector.result(device="cpu")

    if batches is None:
        raise ValueError(f"criterion {criterion!r} needs batches (micro-batches of model inputs with labels)")
    if isinstance(batches, Mapping) or isinstance(batches, (str, bytes)):
        raise TypeError("batches must be an iterable of micro-batches (or a callable returning one), not a single batch")
    if len(groups) > 1 and not callable(batches) and iter(batches) is batches:
        raise ValueError("max_layers_per_pass needs several passes over the batches: pass a list or a callable "
                         "returning a fresh iterator, not a one-shot iterator")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("loss_fn must be a callable loss_fn(model, batch) -> scalar loss")
    known = [x for x in (num_batches, len(batches) if hasattr(batches, "__len__") else None) if x is not None]
    total = len(groups) * min(known) if known else None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="scoring masks", unit="batch", disable=not progress)
    first_count = None
    try:
        with _scoring_state(model, adapter):
            for i, group in enumerate(groups):
                with GradientCollector(model, criterion, device=device, layers=group) as collector:
                    collector.tap_all = True
                    count = _score_pass(model, collector, batches, num_batches, loss_fn, seed, bar)
                if count == 0:
                    raise ValueError("batches yielded no micro-batch")
                if first_count is None:
                    first_count = count
                elif count != first_count:
                    raise ValueError(f"batches yielded {first_count} micro-batches on the first pass but {count} on "
                                     f"pass {i + 1}: with max_layers_per_pass they must be the same on every pass")
                lost = collector.missing()
                if lost:
                    warnings.warn(f"mask scoring: no gradient reached {len(lost)} layer(s), e.g. {lost[0]!r}; "
                                  "their scores are zero", stacklevel=2)
                if sync:
                    collector.all_reduce(process_group)
                selector.add(collector.scores(release=True))
    finally:
        bar.close()
    return selector.result(device="cpu")


# ---- files -----------------------------------------------------------------------------------------
# Format "2" (written): per layer ``<name>.row_offsets`` (int32, out + 1) and ``<name>.col_indices`` (int16
# where the layer has at most 32768 columns, else int32) -- the CSR layout the adapter stores -- with
# the layer order and the (out, in) shapes in the metadata. Format "1" (and untagged files, read only):
# one dense uint8 0/1 tensor per layer.
_DENSE_FORMAT, _CSR_FORMAT = _FORMAT_VALUE, "2"
_ROWS, _COLS = ".row_offsets", ".col_indices"


def save_masks(masks: Mapping[str, torch.Tensor], path: str) -> None:
    """Write {layer: bool (out, in) mask} to a safetensors file atomically, compactly: per layer the CSR
    indices of the kept entries (``row_offsets`` int32, ``col_indices`` int16/int32, ~2-4 bytes per kept
    entry), plus metadata with a format tag, the layer order and the shapes."""
    from .sparse import mask_to_csr

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
        raise ValueError(f"masks file {path!r}: its 'shapes' metadata does not list the stored masks")
    out = {}
    for name in order:
        shape = shapes[name]
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise ValueError(f"masks file {path!r}: mask {name!r} has no valid (out, in) shape in the metadata")
        n_out, n_in = shape
        rows, cols = tensors[name + _ROWS], tensors[name + _COLS]
        if rows.dtype != torch.int32 or cols.dtype not in (torch.int16, torch.int32) or rows.dim() != 1 or cols.dim() != 1:
            raise ValueError(f"masks file {path!r}: mask {name!r} is not int32 row offsets + int16/int32 column indices")
        rows, cols = rows.to(torch.int64), cols.to(torch.int64)
        counts = rows.diff()
        if (rows.numel() != n_out + 1 or int(rows[0]) != 0 or int(rows[-1]) != cols.numel()
                or bool((counts < 0).any())):
            raise ValueError(f"masks file {path!r}: mask {name!r} has inconsistent row offsets for shape {tuple(shape)}")
        row_of = torch.repeat_interleave(torch.arange(n_out), counts)
        flat = row_of * n_in + cols
        if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n_in or bool((flat.diff() <= 0).any())):
            raise ValueError(f"masks file {path!r}: mask {name!r} has column indices out of range, unsorted or repeated")
        mask = torch.zeros(n_out * n_in, dtype=torch.bool)
        mask[flat] = True
        out[name] = mask.view(n_out, n_in)
    return out


def load_masks(path: str) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_masks` -- the compact CSR format, or the dense uint8 0/1 format
    of earlier versions: {layer: bool tensor} on the CPU, in the saved order, validated."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"masks file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"masks file {path!r} is not a readable safetensors file: {exc}") from exc
    tag = metadata.get(_FORMAT_KEY)
    if tag is not None and tag not in (_DENSE_FORMAT, _CSR_FORMAT):
        raise ValueError(f"masks file {path!r} has format version {tag!r}; this rosa-peft reads "
                         f"{_DENSE_FORMAT!r} and {_CSR_FORMAT!r}")
    if not tensors:
        raise ValueError(f"masks file {path!r} holds no masks")
    if tag == _CSR_FORMAT:
        stored = [k[: -len(_ROWS)] for k in tensors if k.endswith(_ROWS)]
        if sorted(tensors) != sorted([n + _ROWS for n in stored] + [n + _COLS for n in stored]):
            raise ValueError(f"masks file {path!r}: every mask needs exactly a '.row_offsets' and a "
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
            raise ValueError(f"masks file {path!r}: its 'order' metadata does not list the stored masks")
    if tag == _CSR_FORMAT:
        return _csr_masks(path, tensors, metadata, order)
    out = {}
    for name in order:
        t = tensors[name]
        if t.dtype not in (torch.uint8, torch.bool):
            raise ValueError(f"masks file {path!r}: tensor {name!r} has dtype {t.dtype}, not a mask (uint8 0/1)")
        if t.dtype == torch.uint8 and t.numel() and int(t.max()) > 1:
            raise ValueError(f"masks file {path!r}: tensor {name!r} holds values other than 0 and 1")
        out[name] = t.to(torch.bool)
    return out
