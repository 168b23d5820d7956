"""``rosa export``: merge a RoSA adapter into its base model and save a plain transformers model for serving.

    rosa export --adapter RUN_DIR --output merged/ [--dtype bf16] [--model BASE] [--quantize nf4 [--requantize]]

The base, its quantization and the adapter load as ``rosa eval`` loads them (:func:`.loading.load_for_eval`,
unmerged); :func:`rosa_peft.export.export_merged` merges, checks the logits and writes the folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..options import QUANT_BACKENDS, QUANTIZE, check_optional_dependencies
from ..utils.checks import UserError
from ..utils.io import read_json_object
from .loading import check_adapter_dir, load_for_eval

EXPORT_DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
RUN_CONFIG = "run_config.json"  # what ``rosa train`` records beside the adapter (its --quantize, ...)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="RoSA adapter / rosa train run directory (default: none, required)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="where the merged model goes: a new or empty directory, written complete or not at all "
                        "(default: none, required)")
    p.add_argument("--model", default=None, help="base model: HF id or local path (default: the adapter's "
                                                 "base_model_name_or_path, else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, choices=EXPORT_DTYPES,
                   help="dtype of the saved weights (default: float32, the dtype the merge is computed in)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE,
                   help="nf4: the adapter was trained on a 4-bit base; it is merged de-quantized (default: the "
                        "run's run_config.json, else none)")
    p.add_argument("--quant-backend", default=None, choices=QUANT_BACKENDS,
                   help="package doing --quantize (default: the run's, else torchao)")
    p.add_argument("--requantize", action="store_true",
                   help="with a 4-bit base: round the merged weights to NF4 again (stored dense; differs from the "
                        "unmerged adapter by the rounding, which is reported, not checked)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing the exported model's logits with the unmerged adapter's (default: compare)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")


def _run_defaults(adapter_dir: str) -> dict:
    """``quantize`` / ``quant_backend`` recorded by ``rosa train`` in the run directory (empty if none)."""
    path = os.path.join(adapter_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        return {}
    recorded = read_json_object(path)
    return {k: recorded[k] for k in ("quantize", "quant_backend") if isinstance(recorded.get(k), str)}


def base_model_of(adapter_dir: str, model: Optional[str]) -> Optional[str]:
    """``model``, else the adapter's ``base_model_name_or_path`` (None: the embedded default model)."""
    if model:
        return model
    name = read_json_object(os.path.join(adapter_dir, "adapter_config.json")).get("base_model_name_or_path")
    return name if isinstance(name, str) and name else None


def tokenizer_dir(adapter_dir: str) -> Optional[str]:
    """The tokenizer saved with the adapter (``rosa train`` writes ``RUN_DIR/tokenizer``), if any."""
    for candidate in (os.path.join(adapter_dir, "tokenizer"), adapter_dir):
        if os.path.isfile(os.path.join(candidate, "tokenizer_config.json")):
            return candidate
    return None


def run(args: argparse.Namespace) -> int:
    from ..export import MergeCheckError, check_output_dir, export_merged

    adapter = check_adapter_dir(args.adapter)
    check_output_dir(args.output)
    recorded = _run_defaults(adapter)
    quantize = args.quantize or recorded.get("quantize", "none")
    backend = args.quant_backend or recorded.get("quant_backend", "torchao")
    if args.requantize and quantize == "none":
        raise UserError("--requantize needs a 4-bit base (--quantize nf4, or a run trained with it)")
    model_name = base_model_of(adapter, args.model)
    check_optional_dependencies(model_name, quantize, backend)
    device = None if args.device == "auto" else args.device
    model, tokenizer, info = load_for_eval(model_name, adapter, dtype="float32", device=device, merge=False,
                                           quantize=None if quantize == "none" else quantize, quant_backend=backend)
    saved_tokenizer = tokenizer_dir(adapter)
    if saved_tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(saved_tokenizer)
    info = {"source_adapter": adapter, "base_model": info["model"], "quantize": info["quantize"],
            "tokenizer": saved_tokenizer or info["model"]}
    try:
        record = export_merged(model, args.output, tokenizer=tokenizer, dtype=args.dtype,
                               requantize=args.requantize, check=args.check, info=info)
    except MergeCheckError as exc:
        print(f"rosa export: {exc}", file=sys.stderr)
        return 1
    check = record["check"]
    if check is None:
        verdict = "not checked (--no-check)"
    else:
        merge = f"{check['merge_max_abs_diff']:.3g} " + (
            "(NF4 rounding, not checked)" if check["merge_tolerance"] is None else f"<= {check['merge_tolerance']:.3g}")
        export = f"{check['max_abs_diff']:.3g} " + (
            "(rounded by the cast / NF4, not checked)" if check["tolerance"] is None else f"<= {check['tolerance']:.3g}")
        verdict = (f"max |logit difference| to the unmerged adapter: merge {merge}, saved folder {export}; "
                   f"{check['saved_tensors_reloaded_bit_for_bit']} tensors re-loaded bit for bit")
    print(f"exported {record['merge']} merge ({record['dtype']}) to {os.path.abspath(args.output)}: {verdict}")
    return 0
