"""The scoring functions of the built-in tasks in one namespace (each lives in its task's module).

GSM8K (:mod:`rosa_peft.tasks.gsm8k`: the ``paper``, ``strict`` and ``flexible`` protocols), ViGGO
(:mod:`rosa_peft.tasks.viggo`), SQL exact match (:mod:`rosa_peft.tasks.sql`) and SQL execution match
(:mod:`rosa_peft.tasks.sqlexec`, the sqlite sandbox). Pure functions on strings, except execution match.
"""
from __future__ import annotations

from ..tasks.gsm8k import GSM8K_PROTOCOLS, gsm8k_correct, gsm8k_extract, gsm8k_gold
from ..tasks.sql import sql_exact, sql_exact_nocase, sql_extract, sql_normalize
from ..tasks.sqlexec import sql_execution_match, sql_execution_result
from ..tasks.viggo import VIGGO_MARKER, viggo_exact, viggo_extract, viggo_slot_f1, viggo_slots

__all__ = [
    "GSM8K_PROTOCOLS", "gsm8k_extract", "gsm8k_gold", "gsm8k_correct",
    "VIGGO_MARKER", "viggo_extract", "viggo_exact", "viggo_slots", "viggo_slot_f1",
    "sql_extract", "sql_exact", "sql_normalize", "sql_exact_nocase",
    "sql_execution_match", "sql_execution_result",
]
