"""Tokenising examples the way the RoSA code does, a Dataset over them, and a padding collator.

* prompt and response are tokenised separately: the prompt with the tokenizer's special tokens,
  the response with ``add_special_tokens=False``; EOS is appended to the response if missing;
* labels are -100 on the prompt, so the loss is on the response only;
* an example whose prompt has ``max_seq_len`` tokens or more is dropped;
* a response that does not fit keeps its *last* tokens (as llm-foundry's collator does,
  ``target[-n:]``) and its final token is forced to EOS.

``build_dataset(..., cache=True)`` reuses an earlier encoding of the *same* examples (content-keyed: every
prompt and response, the tokenizer's full definition, ``max_seq_len`` and the encoding version), from
memory within a process and from ``$ROSA_PEFT_CACHE/tokenized/`` across runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from ..utils.checks import UserError, check_int
from ..utils.io import atomic_save_safetensors
from ..utils.model_loading import cache_dir
from .base import Example, Task, check_limit
from .registry import get_task

IGNORE_INDEX = -100
_ENCODING_VERSION = "1"  # bump whenever _encode changes what it produces: old cache entries are then ignored
_MEMORY_CACHE: Dict[str, tuple] = {}
_MEMORY_CACHE_SIZE = 8

logger = logging.getLogger(__name__)


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError("tokenizer has no eos_token_id; set tokenizer.eos_token before encoding")
    return int(eos)


def _ids(tokenizer, text: str, add_special_tokens: bool) -> List[int]:
    encoded = tokenizer(text, add_special_tokens=add_special_tokens)
    return list(encoded["input_ids"])


def _fields(example: Union[Example, Mapping[str, Any]]):
    if isinstance(example, Example):
        return example.prompt, example.response
    if isinstance(example, Mapping):
        for key in ("prompt", "response"):
            if not isinstance(example.get(key), str):
                raise UserError(f"example is missing a string {key!r} field: {dict(example)!r:.200}")
        return example["prompt"], example["response"]
    raise UserError(f"expected an Example or a mapping with prompt/response, got {type(example).__name__}")


def encode_example(tokenizer, example: Union[Example, Mapping[str, Any]],
                   max_seq_len: int) -> Optional[Dict[str, List[int]]]:
    """``{"input_ids", "attention_mask", "labels"}`` as lists, or None when the prompt is too long."""
    return _encode(tokenizer, example, max_seq_len)[0]


def _encode(tokenizer, example, max_seq_len: int):
    """``(features or None, response_was_truncated)``."""
    check_int("max_seq_len", max_seq_len, 2)
    prompt, response = _fields(example)
    eos = _eos_id(tokenizer)
    prompt_ids = _ids(tokenizer, prompt, add_special_tokens=True)
    response_ids = _ids(tokenizer, response, add_special_tokens=False)
    if not response_ids or response_ids[-1] != eos:
        response_ids.append(eos)
    if len(prompt_ids) >= max_seq_len:
        return None, False
    room = max_seq_len - len(prompt_ids)
    truncated = len(response_ids) > room
    if truncated:
        response_ids = response_ids[-room:]
        response_ids[-1] = eos
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}, truncated


class EncodedDataset(Dataset):
    """Encoded examples. ``n_total``, ``n_dropped`` (prompt too long) and ``n_truncated``
    (response cut to fit) say what happened during encoding."""

    def __init__(self, features: List[Dict[str, List[int]]], n_total: int, n_dropped: int,
                 n_truncated: int, examples: Optional[List[Example]] = None):
        self.features = features
        self.n_total = n_total
        self.n_dropped = n_dropped
        self.n_truncated = n_truncated
        self.examples = examples if examples is not None else []

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        return self.features[index]

    def __repr__(self) -> str:
        return (f"EncodedDataset(n={len(self)}, n_total={self.n_total}, n_dropped={self.n_dropped}, "
                f"n_truncated={self.n_truncated})")


def build_dataset(task_or_examples: Union[Task, str, Iterable[Example]], tokenizer, max_seq_len: int,
                  split: Optional[str] = None, limit: Optional[int] = None,
                  cache: Union[bool, str, "os.PathLike[str]"] = False) -> EncodedDataset:
    """Encode a task's split (a Task, or a task name for :func:`get_task`) or a list of examples.

    Dropped examples are counted in ``n_dropped`` and logged. ``split`` only applies to tasks.
    An empty result from a non-empty input raises ValueError (a too-small ``max_seq_len``).
    ``cache``: False (default) encodes afresh; True reuses an identical earlier encoding from memory or
    from ``$ROSA_PEFT_CACHE/tokenized``; a path uses that folder instead. The key covers every prompt and
    response, the tokenizer's full definition and ``max_seq_len``, so any change there encodes afresh.
    """
    if isinstance(task_or_examples, str):
        task_or_examples = get_task(task_or_examples)
    if isinstance(task_or_examples, Task):
        examples = task_or_examples.load(split=split, limit=limit)
        source = f"task {task_or_examples.name!r} split {task_or_examples.check_split(split)!r}"
    else:
        if split is not None:
            raise ValueError("split= only applies when a Task (or task name) is given, not a list of examples")
        examples = list(task_or_examples)
        if check_limit(limit) is not None:
            examples = examples[:limit]
        source = "examples"
    key = _cache_key(tokenizer, examples, max_seq_len) if cache else None
    hit = _cache_get(key, cache) if key else None
    if hit is not None:
        features, kept_index, n_truncated = hit
        kept = [_as_example(examples[i]) for i in kept_index]
    else:
        check_int("max_seq_len", max_seq_len, 2)
        features, kept, kept_index, prompt_lens = [], [], [], []
        n_truncated = 0
        for i, example in enumerate(examples):
            encoded, truncated = _encode(tokenizer, example, max_seq_len)
            if encoded is None:
                continue
            n_truncated += int(truncated)
            features.append(encoded)
            kept.append(_as_example(example))
            kept_index.append(i)
            prompt_lens.append(encoded["labels"].count(IGNORE_INDEX))
        if key:
            _cache_put(key, cache, features, kept_index, prompt_lens, n_truncated)
    n_dropped = len(examples) - len(features)
    if n_dropped or n_truncated:
        logger.warning("%s: dropped %d of %d examples (prompt >= %d tokens); truncated %d responses",
                       source, n_dropped, len(examples), max_seq_len, n_truncated)
    if examples and not features:
        raise UserError(f"{source}: all {len(examples)} examples were dropped because their prompt has "
                         f">= max_seq_len={max_seq_len} tokens; raise max_seq_len")
    return EncodedDataset(features, len(examples), n_dropped, n_truncated, kept)


def _as_example(example) -> Example:
    return example if isinstance(example, Example) else Example(*_fields(example))


def _tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides the tokenizer's output: its full definition (vocab, merges,
    normalizer, post-processor for fast tokenizers; the vocab for slow ones) and its special tokens."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
        h.update(repr(getattr(tokenizer, "init_kwargs", {})).encode())
    specials = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    h.update(json.dumps([specials, getattr(tokenizer, "eos_token_id", None),
                         getattr(tokenizer, "bos_token_id", None)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _cache_key(tokenizer, examples, max_seq_len) -> Optional[str]:
    try:
        h = hashlib.sha256(f"rosa_peft.tokenize/{_ENCODING_VERSION}/{max_seq_len!r}/".encode())
        h.update(_tokenizer_fingerprint(tokenizer).encode())
        for example in examples:
            prompt, response = _fields(example)
            for text in (prompt, response):
                b = text.encode("utf-8", "surrogatepass")
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
        return h.hexdigest()
    except ValueError:
        raise
    except Exception as exc:  # an unusual tokenizer we cannot fingerprint: no caching, never a wrong hit
        logger.debug("tokenization cache disabled: %s", exc)
        return None


def _cache_dir(cache) -> str:
    if cache is True:

        return os.path.join(str(cache_dir()), "tokenized")
    return os.fspath(cache)


def _cache_get(key: str, cache):
    if key in _MEMORY_CACHE:
        features, kept_index, n_truncated = _MEMORY_CACHE[key]
        return _copy_features(features), list(kept_index), n_truncated
    path = os.path.join(_cache_dir(cache), key + ".safetensors")
    if not os.path.isfile(path):
        return None
    try:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            ids, lens, plens, kept = (fh.get_tensor(k) for k in ("input_ids", "lengths", "prompt_lengths", "kept"))
        if meta.get("key") != key or int(lens.sum()) != ids.numel() or not (len(lens) == len(plens) == len(kept)):
            raise ValueError("inconsistent cache entry")
        features = []
        for row, p in zip(ids.split(lens.tolist()), plens.tolist()):
            row = row.tolist()
            features.append({"input_ids": row, "attention_mask": [1] * len(row),
                             "labels": [IGNORE_INDEX] * p + row[p:]})
        n_truncated = int(meta["n_truncated"])
    except Exception as exc:  # a damaged or foreign file: encode afresh (and overwrite it)
        logger.warning("ignoring unreadable tokenization cache entry %s: %s", path, exc)
        return None
    _remember(key, features, kept.tolist(), n_truncated)
    return features, kept.tolist(), n_truncated


def _remember(key, features, kept_index, n_truncated) -> None:
    if len(_MEMORY_CACHE) >= _MEMORY_CACHE_SIZE:
        _MEMORY_CACHE.pop(next(iter(_MEMORY_CACHE)))
    _MEMORY_CACHE[key] = (_copy_features(features), list(kept_index), n_truncated)


def _copy_features(features):
    return [{k: list(v) for k, v in f.items()} for f in features]


def _cache_put(key, cache, features, kept_index, prompt_lens, n_truncated) -> None:
    _remember(key, features, kept_index, n_truncated)
    folder = _cache_dir(cache)
    try:
        os.makedirs(folder, exist_ok=True)
        flat = [t for f in features for t in f["input_ids"]]
        atomic_save_safetensors(
            {"input_ids": torch.tensor(flat, dtype=torch.int64),
             "lengths": torch.tensor([len(f["input_ids"]) for f in features], dtype=torch.int64),
             "prompt_lengths": torch.tensor(prompt_lens, dtype=torch.int64),
             "kept": torch.tensor(kept_index, dtype=torch.int64)},
            os.path.join(folder, key + ".safetensors"),
            metadata={"key": key, "n_truncated": str(n_truncated), "version": _ENCODING_VERSION})
    except OSError as exc:  # a read-only cache dir only costs the next run the encoding time
        logger.warning("could not write the tokenization cache to %s: %s", folder, exc)


class Collator:
    """Right-pads a list of encoded examples into tensors.

    ``input_ids`` are padded with the pad id (EOS when the tokenizer has no pad token),
    ``attention_mask`` with 0 and ``labels`` with -100. Works as an HF Trainer ``data_collator``.

    Not ``transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=...)``:
    it gives the same batches only while ``tokenizer.padding_side == "right"`` and the tokenizer has a
    pad token. It pads on the tokenizer's side (left for tokenizers shipped or set with
    ``padding_side="left"``, as generation code does), and raises without a pad token; this collator
    always pads on the right and falls back to EOS.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: Optional[int] = None):
        check_int("pad_to_multiple_of", pad_to_multiple_of, 1, allow_none=True)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else _eos_id(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Collator got an empty batch")
        ids = [_as_list(f["input_ids"]) for f in features]
        length = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.tensor([x + [self.pad_id] * (length - len(x)) for x in ids], dtype=torch.long),
            "attention_mask": torch.tensor(
                [_as_list(f.get("attention_mask", [1] * len(x))) + [0] * (length - len(x))
                 for f, x in zip(features, ids)], dtype=torch.long),
        }
        if all("labels" in f for f in features):
            batch["labels"] = torch.tensor(
                [_as_list(f["labels"]) + [IGNORE_INDEX] * (length - len(x)) for f, x in zip(features, ids)],
                dtype=torch.long)
        return batch


def _as_list(values) -> List[int]:
    if isinstance(values, torch.Tensor):
        return values.tolist()
    return list(values)
