"""Answer extraction and scoring for GSM8K, ViGGO and SQL: pure functions on strings.

GSM8K has three protocols:

* ``"paper"``: what RoSA reported (lm-evaluation-harness at commit 2c18e367, zero-shot). The first
  ``#### (\\-?[0-9\\.\\,]+)`` match, commas removed, compared as a string with the gold parsed the same
  way. A generation without ``####`` is wrong. The generation itself is cut at ``":"``, ``"Question:"``
  or ``"Question"`` (see :mod:`rosa_peft.eval.protocols`), so a colon ends the answer.
* ``"strict"``: today's harness ``strict-match`` filter (same regex, first match).
* ``"flexible"``: today's harness ``flexible-extract`` filter: the *last* number-like match of
  ``(-?[$0-9.,]{2,})|(-?[0-9]+)``.

``strict`` and ``flexible`` then normalise both sides as the harness's ``exact_match`` does: case is
ignored, ``,`` and ``$`` and everything up to ``#### `` are removed, and a trailing ``.`` is dropped.

SQL execution match lives in :mod:`rosa_peft.eval.sql_exec` and is re-exported here.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import List, Optional, Tuple

from .sql_exec import sql_execution_match, sql_execution_result

__all__ = [
    "GSM8K_PROTOCOLS", "gsm8k_extract", "gsm8k_gold", "gsm8k_correct",
    "VIGGO_MARKER", "viggo_extract", "viggo_exact", "viggo_slots", "viggo_slot_f1",
    "sql_extract", "sql_exact", "sql_normalize", "sql_exact_nocase",
    "sql_execution_match", "sql_execution_result",
]

GSM8K_PROTOCOLS = ("paper", "strict", "flexible")

_GSM_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM_IGNORE = (re.compile(r"(?s).*#### "), re.compile(r","), re.compile(r"\$"), re.compile(r"\.$"))


def _check_protocol(protocol: str) -> str:
    if protocol not in GSM8K_PROTOCOLS:
        raise ValueError(f"unknown gsm8k protocol {protocol!r}; use one of {', '.join(GSM8K_PROTOCOLS)}")
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


# ---- ViGGO ------------------------------------------------------------------------------------------
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


# ---- SQL --------------------------------------------------------------------------------------------
_SQL_PAPER = re.compile(r"SELECT (.*)")
_SQL_ANY = re.compile(r"\bselect\b.*", re.IGNORECASE)


def sql_extract(text: str, paper: bool = True) -> str:
    """The predicted query: from the first ``SELECT`` to the end of its line, stripped; ``""`` if none.

    ``paper=True`` is RoSA's ``re.search('SELECT (.*)', decoded).group(0)`` (uppercase ``SELECT``
    followed by a space); ``paper=False`` also accepts lowercase/mixed-case ``select``.
    """
    match = (_SQL_PAPER if paper else _SQL_ANY).search(text)
    return match.group(0).strip() if match else ""


def sql_exact(pred: str, gold: str) -> bool:
    """RoSA's SQL metric: the paper-extracted query equals the stripped gold, case-sensitively."""
    return sql_extract(pred, paper=True) == gold.strip()


def sql_normalize(sql: str) -> str:
    """Lowercase, single spaces, no trailing ``;`` (for the case-insensitive exact variant)."""
    return " ".join(sql.strip().rstrip(";").split()).lower()


def sql_exact_nocase(pred: str, gold: str) -> bool:
    """Exact match after :func:`sql_normalize` on both sides (the mock-table gold is lowercased)."""
    return sql_normalize(sql_extract(pred, paper=False)) == sql_normalize(gold)
