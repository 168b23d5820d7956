"""Evaluation: batched greedy generation, the RoSA task protocols and metrics, ``rosa eval``.

>>> from rosa_peft.eval import evaluate, write_report
>>> report = evaluate(model, tokenizer, "viggo", data_dir="data", limit=50)   # doctest: +SKIP
>>> report["summary"]["accuracy"]                                             # doctest: +SKIP

``model`` may be a RosaModel (unmerged), a merged model or any HF causal LM. See docs/evaluation.md.
"""
from .generate import generate, truncate_at_stop
from .loading import check_adapter_dir, load_for_eval
from .metrics import (
    gsm8k_extract,
    gsm8k_gold,
    sql_exact,
    sql_execution_match,
    sql_execution_result,
    sql_extract,
    viggo_exact,
    viggo_slot_f1,
)
from .protocols import EvalProtocol, get_protocol
from .runner import evaluate, format_summary, load_examples, write_report

__all__ = [
    "generate", "truncate_at_stop", "evaluate", "load_examples", "write_report", "format_summary",
    "get_protocol", "EvalProtocol", "load_for_eval", "check_adapter_dir",
    "gsm8k_extract", "gsm8k_gold", "viggo_exact", "viggo_slot_f1", "sql_extract", "sql_exact",
    "sql_execution_match", "sql_execution_result",
]
