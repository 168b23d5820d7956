"""ViGGO in the RoSA direction (utterance -> meaning representation): the task, its metrics, its protocol.

The prompt is the paper's instruction (three sentences joined by single spaces, no period after
``'specifier']``), then the target sentence; the response is ``meaning_representation``.
RoSA trains on ``train`` and evaluates on ``validation`` with the same prompt: generation stops at a
newline (at most 128 new tokens), the verdict is the paper's exact match of the meaning
representation, and the slot F1 is reported too.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import List, Sequence, Tuple

from ._files import get_field
from .base import Example, FileTask
from .protocol import EvalProtocol, mean

FUNCTIONS = ["inform", "request", "give_opinion", "confirm", "verify_attribute", "suggest",
             "request_explanation", "recommend", "request_attribute"]
ATTRIBUTES = ["name", "exp_release_date", "release_year", "developer", "esrb", "rating", "genres",
              "player_perspective", "has_multiplayer", "platforms", "available_on_steam",
              "has_linux_release", "has_mac_release", "specifier"]

INSTRUCTION = (
    "Given a target sentence construct the underlying meaning representation of the input sentence "
    "as a single function with attributes and attribute values. "
    "This function should describe the target string accurately and the function must be one of the "
    f"following {FUNCTIONS}. "
    f"The attributes must be one of the following: {ATTRIBUTES}"
)

PROMPT_TEMPLATE = INSTRUCTION + "\n\n### Target sentence:\n{target}\n\n### Meaning representation:\n"


def viggo_prompt(target: str) -> str:
    """The exact RoSA ViGGO prompt for one target sentence."""
    return PROMPT_TEMPLATE.format(target=target)


VIGGO_MARKER = "### Meaning representation:\n"
_VIGGO_DA = re.compile(r"^\s*([A-Za-z_]+)\s*\(")
_VIGGO_SLOT = re.compile(r"([A-Za-z_]+)\s*\[([^\]]*)\]")


def viggo_extract(text: str) -> str:
    """The predicted meaning representation, as RoSA's ``viggo_eval.py`` reads it.

    With the marker present (prompt + generation), the first line after its first occurrence;
    otherwise ``text`` is taken to be the generation alone and its first line is used. Stripped.
    """
    index = text.find(VIGGO_MARKER)
    if index >= 0:
        text = text[index + len(VIGGO_MARKER):]
    return text.split("\n", 1)[0].strip()


def viggo_exact(pred: str, gold: str) -> bool:
    """The paper's metric: exact string match of the first line after the marker, both stripped."""
    return viggo_extract(pred) == gold.strip()


def viggo_slots(mr: str) -> List[Tuple[str, str]]:
    """``[("da", act), (attribute, value), ...]`` from ``act(attr[v1, v2], ...)``.

    A list-valued attribute gives one pair per value, so neither the order of the attributes nor
    the order of values inside a list matters. Values keep their case; whitespace is stripped.
    """
    items: List[Tuple[str, str]] = []
    match = _VIGGO_DA.match(mr)
    if match:
        items.append(("da", match.group(1)))
    for attr, value in _VIGGO_SLOT.findall(mr):
        parts = [v.strip() for v in value.split(",")] if value.strip() else [""]
        items.extend((attr, v) for v in parts)
    return items


def viggo_slot_f1(pred: str, gold: str) -> float:
    """F1 between the multisets of dialogue act + attribute=value pairs (1.0 when both are empty)."""
    p, g = Counter(viggo_slots(viggo_extract(pred))), Counter(viggo_slots(gold.strip()))
    if not p and not g:
        return 1.0
    overlap = sum((p & g).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(g.values())
    return 2 * precision * recall / (precision + recall)


class ViGGOProtocol(EvalProtocol):
    """The training prompt (with special tokens), stop at a newline, 128 new tokens; exact MR + slot F1."""

    @classmethod
    def for_task(cls, task: str, **_) -> "ViGGOProtocol":
        return cls(task, "viggo-paper", ("\n",), 128, True)

    def score(self, example, generation: str) -> dict:
        gold = example.meta.get("meaning_representation", example.response).strip()
        return {"prediction": viggo_extract(generation), "gold": gold,
                "correct": viggo_exact(generation, gold), "slot_f1": viggo_slot_f1(generation, gold)}

    def summarize(self, records: Sequence[dict]) -> dict:
        out = super().summarize(records)
        out["slot_f1"] = mean(records, "slot_f1")
        return out


class ViGGOTask(FileTask):
    name = "viggo"
    description = "video-game utterance -> meaning representation (train 5,103 / validation 714 / test 1,083)"
    splits = ("train", "validation", "test")
    train_split = "train"
    eval_split = "validation"
    subdir = "viggo"
    files = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
    hf_id = "GEM/viggo"
    protocol = ViGGOProtocol
    table_columns = (("Exact match (%)", "accuracy"), ("Slot F1 (%)", "slot_f1"))
    # a small model rarely gets a whole meaning representation right: slot F1 is the graded comparison
    paired_fields = (("accuracy", "correct"), ("slot_f1", "slot_f1"))

    def convert(self, record: dict, source: str, lineno: int, split: str) -> Example:
        target = get_field(record, "target", source, lineno)
        mr = get_field(record, "meaning_representation", source, lineno)
        meta = {"meaning_representation": mr, "target": target}
        if isinstance(record.get("gem_id"), str):
            meta["gem_id"] = record["gem_id"]
        return Example(prompt=viggo_prompt(target), response=mr, meta=meta)
