"""Export for serving: fold a loaded RoSA adapter into its base and save a plain transformers model.

:func:`export_merged` takes a :class:`~rosa_peft.model.RosaModel` (base + adapter, as loaded) and writes a
folder that ``transformers.AutoModelForCausalLM.from_pretrained`` reads without rosa_peft (and that
vLLM / TGI / llama.cpp's converter accept): ``config.json``, ``model.safetensors`` (sharded for big
models), the tokenizer and ``export_info.json``. The folder is written into a staging directory beside
the target and renamed only once it is complete and checked, so a failure leaves nothing behind.

The check, on the logits of a few token ids (tolerances relative to the largest logit, set by the least
precise dtype involved, :data:`RELATIVE_TOLERANCE`): *merge*, the merged model against the unmerged
adapter, in the dtype the merge is computed in; *save*, the folder re-loaded with plain transformers
holds bit for bit the tensors of the model it was saved from; *export*, the re-loaded folder's logits
against the unmerged adapter (``max_abs_diff``), enforced unless a ``dtype`` cast rounded the weights
(that rounding is the user's choice: reported).

4-bit (NF4) bases are merged de-quantised: ``W_deq + S + s·B·A`` is stored dense, as are the 4-bit layers
the adapter does not touch. ``requantize=True`` rounds the merged weights to NF4 again (QRoSA's
:func:`~rosa_peft.bases.quantize.merge_and_requantize`, which warns) and stores the rounded values dense:
the difference to the unmerged adapter is then the re-quantization error, reported but not enforced.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch
from torch import nn

from . import __version__
from .bases import QUANT_KINDS, resolve_base_kind
from .bases.quantize import dense_weight, is_quantized, merge_and_requantize
from .utils.checks import UserError
from .utils.io import default_file_mode, staged_directory

EXPORT_INFO = "export_info.json"
# max |merged - unmerged| allowed, as a fraction of max(1, max |unmerged logit|), per least precise dtype
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class MergeCheckError(RuntimeError):
    """A step of the export check failed: the merged or re-loaded logits are off, or a tensor was not saved."""


def export_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``dtype`` (a name such as ``"bf16"`` / ``"bfloat16"``, or a torch dtype) as a torch float dtype."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in RELATIVE_TOLERANCE):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    raise UserError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")


def check_output_dir(output_dir: str) -> str:
    """``output_dir`` as an absolute path; FileExistsError unless it is absent or an empty directory."""
    path = os.path.abspath(os.path.expanduser(output_dir))
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise FileExistsError(f"output directory {output_dir} exists and is not empty; export into a new one")
    return path


def check_token_ids(vocab_size: int, length: int = 16, seed: int = 0) -> torch.Tensor:
    """``(1, length)`` token ids drawn reproducibly from the whole vocabulary (the check's input)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=generator)


@torch.no_grad()
def _logits(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=token_ids.to(device), use_cache=False)
    return out.logits.float().cpu()


def _float_dtypes(model: nn.Module) -> set:
    """Every float dtype the model's weights hold or compute in (4-bit layers: their compute dtype)."""
    found = {p.dtype for p in model.parameters() if p.is_floating_point() and type(p.data) is torch.Tensor}
    for module in model.modules():
        kind = resolve_base_kind(module)
        if kind is not None and kind.name in QUANT_KINDS:
            found.add(kind.compute_dtype(module))
    return {d for d in found if d in RELATIVE_TOLERANCE}


def tolerance_for(dtypes) -> float:
    """The relative tolerance of the least precise of ``dtypes`` (float32's when there are none)."""
    return max((RELATIVE_TOLERANCE[d] for d in dtypes if d in RELATIVE_TOLERANCE),
               default=RELATIVE_TOLERANCE[torch.float32])


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Replace every 4-bit Linear of ``model`` by a plain ``nn.Linear`` of its de-quantised weight in
    ``dtype`` (its bias keeps its values); returns the names replaced."""
    names = [name for name, module in model.named_modules() if name and is_quantized(module)]
    for name in names:
        old = model.get_submodule(name)
        bias = getattr(old, "bias", None)
        weight = dense_weight(old, torch.float32)
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device)
        with torch.no_grad():
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias.detach())
        new.requires_grad_(False)
        model.set_submodule(name, new)
    return names


def _plain_float_dtype(model: nn.Module) -> torch.dtype:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


def _reload(directory: str, device: torch.device) -> nn.Module:
    """The exported folder loaded with plain transformers (no rosa_peft class involved)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype="auto").to(device).eval()


def export_merged(rosa_model, output_dir: str, tokenizer=None, dtype: Union[str, torch.dtype, None] = None,
                  requantize: bool = False, check: bool = True, token_ids: Optional[torch.Tensor] = None,
                  info: Optional[dict] = None, max_shard_size: str = "5GB") -> dict:
    """Merge ``rosa_model``'s active adapter, save a plain model (+ ``tokenizer``) to ``output_dir``.

    ``output_dir`` must be absent or empty (FileExistsError otherwise, before anything changes).
    ``dtype`` casts the saved weights (default: the dtype the merged model computes in). ``check`` runs
    the merge / save / export checks of the module docstring on ``token_ids`` (default:
    :func:`check_token_ids`) and raises :class:`MergeCheckError` when one fails (nothing is written then).
    ``requantize``: see the module docstring. ``info`` entries go into ``export_info.json``.
    ``rosa_model`` is consumed: its modules become the merged model. Returns what ``export_info.json``
    holds (``check``: ``merge_max_abs_diff``, ``max_abs_diff``, their tolerances, ...).
    """
    path = check_output_dir(output_dir)
    target_dtype = export_dtype(dtype)
    quantized = any(is_quantized(m) for m in rosa_model.get_base_model().modules())
    if requantize and not any(is_quantized(layer) for _, layer in rosa_model.rosa_layers()):
        raise UserError("requantize needs an adapter on a 4-bit (NF4) base; this base is not quantized")
    rosa_model.eval()
    if check and token_ids is None:
        token_ids = check_token_ids(rosa_model.get_base_model().get_input_embeddings().num_embeddings)
    reference = _logits(rosa_model, token_ids) if check else None
    merge_tolerance = None if requantize else tolerance_for(_float_dtypes(rosa_model))
    device = next(rosa_model.parameters()).device
    merged = merge_and_requantize(rosa_model) if requantize else rosa_model.merge_and_unload()
    dequantized = dequantize_linears(merged, _plain_float_dtype(merged))
    merge_step = None
    if check:  # before anything is written: a wrong merge fails fast
        merge_step = _Step("merge", reference, _logits(merged, token_ids), merge_tolerance)
        merge_step.enforce(output_dir)
    merged_dtype = _plain_float_dtype(merged)
    if target_dtype is not None:
        merged.to(target_dtype)
    saved_dtype = _plain_float_dtype(merged)
    record = {"format": "rosa-peft merged export", "rosa_peft_version": __version__, **(info or {}),
              "dtype": str(saved_dtype).replace("torch.", ""),
              "merge": "re-quantized to NF4, stored dense" if requantize else
                       ("de-quantized (4-bit base), exact" if quantized else "exact"),
              "dequantized_layers": len(dequantized), "check": None}
    with staged_directory(path, overwrite=os.path.isdir(path)) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for entry in os.scandir(tmp):  # transformers writes the weights 0600: give them a plain file's mode
            if entry.is_file(follow_symlinks=False):
                os.chmod(entry.path, default_file_mode())
        if check:
            reloaded = _reload(tmp, device)
            tensors = compare_state_dicts(merged.state_dict(), reloaded.state_dict(), output_dir)
            # the cast's rounding is the user's choice: then the exported logits are reported, not enforced
            exact = saved_dtype == merged_dtype and not requantize
            final = _Step("export", reference, _logits(reloaded, token_ids), merge_tolerance if exact else None)
            record["check"] = {"reference": "the unmerged adapter", "token_ids": int(token_ids.numel()),
                               "max_abs_logit": float(reference.abs().max()), **merge_step.report(),
                               "saved_tensors_reloaded_bit_for_bit": tensors,
                               "max_abs_diff": final.report()["export_max_abs_diff"],
                               "tolerance": final.tolerance}
            final.enforce(output_dir)
        with open(os.path.join(tmp, EXPORT_INFO), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(record, indent=2, default=str) + "\n")
    return record


def compare_state_dicts(saved: dict, reloaded: dict, output_dir: str) -> int:
    """The number of tensors; MergeCheckError unless ``reloaded`` holds the same names and bit-identical
    tensors as ``saved`` (a weight transformers did not find, and so initialised, differs)."""
    missing, extra = sorted(set(saved) - set(reloaded)), sorted(set(reloaded) - set(saved))
    if missing or extra:
        raise MergeCheckError(f"save check failed: re-loading lost {missing[:3]} / added {extra[:3]}; nothing was "
                              f"written to {output_dir}")
    for name, tensor in saved.items():
        other = reloaded[name]
        if other.dtype != tensor.dtype or not torch.equal(other.to(tensor.device), tensor):
            raise MergeCheckError(f"save check failed: {name} differs after re-loading the saved folder; nothing "
                                  f"was written to {output_dir}")
    return len(saved)


class _Step:
    """Logits after a step of the export against those before it; a ``None`` tolerance only reports.

    ``merge``: the merged model (in the dtype the merge was computed in) against the unmerged adapter
    (``requantize``: the NF4 rounding is expected, so not enforced). ``export``: the saved folder
    re-loaded by transformers against the unmerged adapter (enforced when no ``dtype`` cast rounded it)."""

    def __init__(self, name: str, before: torch.Tensor, after: torch.Tensor, tolerance: Optional[float]):
        self.name = name
        self.scale = max(1.0, float(before.abs().max()))
        self.diff = (after - before).abs().max()
        self.tolerance = None if tolerance is None else tolerance * self.scale

    def report(self) -> dict:
        return {f"{self.name}_max_abs_diff": float(self.diff), f"{self.name}_tolerance": self.tolerance}

    def enforce(self, output_dir: str) -> None:
        if not torch.isfinite(self.diff):
            raise MergeCheckError(f"{self.name} check failed: the logits are not finite; nothing was written to "
                                  f"{output_dir}")
        if self.tolerance is not None and float(self.diff) > self.tolerance:
            raise MergeCheckError(f"{self.name} check failed: max |logit difference| {float(self.diff):.3g} exceeds "
                                  f"the tolerance {self.tolerance:.3g} (max |logit| {self.scale:.3g}); nothing was "
                                  f"written to {output_dir}")


__all__ = ["EXPORT_INFO", "MergeCheckError", "check_output_dir", "check_token_ids", "compare_state_dicts",
           "dequantize_linears", "export_dtype", "export_merged", "tolerance_for"]
