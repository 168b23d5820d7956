"""GSM8K: the task in the RoSA training format, its answer extraction and its evaluation protocol.

Training: prompt = the raw question, response = the full answer, which keeps its ``<<calc>>``
annotations and the final ``#### N`` line. Evaluation (lm-evaluation-harness style) needs the full
gold answer, kept in ``meta["answer"]``; its prompt is ``"Question: {q}\\nAnswer:"``, the prompt is
tokenised without special tokens and at most 256 tokens are generated.

Scoring has three protocols (``--gsm8k-protocol``):

* ``"paper"``: what RoSA reported (lm-evaluation-harness at commit 2c18e367, zero-shot). The first
  ``#### (\\-?[0-9\\.\\,]+)`` match, commas removed, compared as a string with the gold parsed the same
  way. A generation without ``####`` is wrong. The generation itself is cut at ``":"``, ``"Question:"``
  or ``"Question"`` (:data:`GSM8K_PAPER_STOP`), so a colon ends the answer.
* ``"strict"``: today's harness ``strict-match`` filter (same regex, first match).
* ``"flexible"``: today's harness ``flexible-extract`` filter: the *last* number-like match of
  ``(-?[$0-9.,]{2,})|(-?[0-9]+)``.

``strict`` and ``flexible`` stop at :data:`GSM8K_HARNESS_STOP`, then normalise both sides as the
harness's ``exact_match`` does: case is ignored, ``,`` and ``$`` and everything up to ``#### `` are
removed, and a trailing ``.`` is dropped.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple

from ..utils.checks import UserError
from ._files import get_field
from .base import Example, FileTask
from .protocol import EvalProtocol

GSM8K_PROTOCOLS = ("paper", "strict", "flexible")
GSM8K_PAPER_STOP = (":", "Question:", "Question")
GSM8K_HARNESS_STOP = ("Question:", "</s>", "<|im_end|>")

_GSM_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM_IGNORE = (re.compile(r"(?s).*#### "), re.compile(r","), re.compile(r"\$"), re.compile(r"\.$"))


def _check_protocol(protocol: str) -> str:
    if protocol not in GSM8K_PROTOCOLS:
        raise UserError(f"unknown gsm8k protocol {protocol!r}; use one of {', '.join(GSM8K_PROTOCOLS)}")
    return protocol


def _harness_normalize(text: str) -> str:
    """The current harness's exact_match normalisation (ignore_case + regexes_to_ignore)."""
    for pattern in _GSM_IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def gsm8k_extract(text: str, protocol: str = "paper") -> Optional[str]:
    """The final answer in a GSM8K generation, or None when the protocol finds none."""
    _check_protocol(protocol)
    if protocol == "paper":
        match = _GSM_STRICT.search(text)
        return match.group(1).replace(",", "") if match else None
    if protocol == "strict":
        match = _GSM_STRICT.search(text)
        return _harness_normalize(match.group(1)) if match else None
    matches = _GSM_FLEXIBLE.findall(text)
    if not matches:
        return None
    groups = [g for g in matches[-1] if g]
    return _harness_normalize(groups[0].strip()) if groups else None


def gsm8k_gold(answer: str, protocol: str = "paper") -> Optional[str]:
    """The gold answer from a GSM8K ``answer`` field (worked solution ending in ``#### N``)."""
    _check_protocol(protocol)
    if protocol == "paper":
        return gsm8k_extract(answer, "paper")
    return _harness_normalize(answer)


def gsm8k_correct(generation: str, answer: str, protocol: str = "paper") -> Tuple[Optional[str], Optional[str], bool]:
    """``(prediction, gold, correct)``; a missing prediction is always wrong."""
    pred, gold = gsm8k_extract(generation, protocol), gsm8k_gold(answer, protocol)
    return pred, gold, pred is not None and gold is not None and pred == gold


class GSM8KProtocol(EvalProtocol):
    """``"Question: {q}\\nAnswer:"``, no special tokens, 256 new tokens; the answer after ``####``
    (or the harness filter) equals the gold."""

    @classmethod
    def for_task(cls, task: str, gsm8k_protocol: str = "paper", **_) -> "GSM8KProtocol":
        _check_protocol(gsm8k_protocol)
        stop = GSM8K_PAPER_STOP if gsm8k_protocol == "paper" else GSM8K_HARNESS_STOP
        return cls(task, f"gsm8k-{gsm8k_protocol}", stop, 256, False, {"gsm8k_protocol": gsm8k_protocol})

    def prompt(self, example) -> str:
        question = example.meta.get("question", example.prompt)
        return f"Question: {question}\nAnswer:"

    def score(self, example, generation: str) -> dict:
        answer = example.meta.get("answer", example.response)
        pred, gold, ok = gsm8k_correct(generation, answer, self.options["gsm8k_protocol"])
        return {"prediction": pred, "gold": gold, "correct": ok}

    def summarize(self, records: Sequence[dict]) -> dict:
        out = super().summarize(records)
        out["primary_metric"] = f"acc ({self.options['gsm8k_protocol']})"
        out["no_answer"] = sum(r["prediction"] is None for r in records)
        return out


class GSM8KTask(FileTask):
    name = "gsm8k"
    description = "grade-school math word problems (train 7,473 / test 1,319)"
    splits = ("train", "test")
    train_split = "train"
    eval_split = "test"
    subdir = "gsm8k"
    files = {"train": "train.jsonl", "test": "test.jsonl"}
    hf_id = "openai/gsm8k"
    hf_config = "main"
    protocol = GSM8KProtocol

    def convert(self, record: dict, source: str, lineno: int, split: str) -> Example:
        question = get_field(record, "question", source, lineno)
        answer = get_field(record, "answer", source, lineno)
        return Example(prompt=question, response=answer, meta={"answer": answer, "question": question})
