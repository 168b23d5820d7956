"""Per-task evaluation protocols: the eval prompt, stop strings, token bounds and scoring.

| task | eval prompt | stop | new tokens | BOS | verdict |
|---|---|---|---|---|---|
| gsm8k (paper) | ``"Question: {q}\\nAnswer:"`` | ``:``, ``Question:``, ``Question`` | 256 | no | ``####`` answer == gold |
| gsm8k (strict / flexible) | same | ``Question:``, ``</s>``, ``<|im_end|>`` | 256 | no | harness filter == gold |
| viggo | the training prompt | newline | 128 | yes | exact MR (+ slot F1) |
| sql, sql-synth | the training prompt (``--sql-paper-prompt``: suffix doubled) | newline | 192 | yes | execution match when the example has tables, else exact |
| jsonl | the record's prompt field | none (EOS) | longest gold response + 16 | yes | exact match after strip; plus the mean response loss |

EOS always stops a row as well. BOS "yes" means the prompt is tokenised with the tokenizer's
special tokens, as in training; the GSM8K harness tokenises without them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import metrics
from .sql_exec import check_timeout, sql_execution_result

SQL_ANSWER_SUFFIX = "\n\n answer: "
GSM8K_PAPER_STOP = (":", "Question:", "Question")
GSM8K_HARNESS_STOP = ("Question:", "</s>", "<|im_end|>")


@dataclass
class EvalProtocol:
    """How one task is evaluated. Subclasses implement :meth:`prompt` and :meth:`score`."""

    task: str
    name: str
    stop: Tuple[str, ...]
    max_new_tokens: Optional[int]  # None: settled by prepare() from the data
    add_special_tokens: bool
    options: Dict[str, object] = field(default_factory=dict)

    def prompt(self, example) -> str:
        return example.prompt

    def prepare(self, tokenizer, examples: Sequence) -> None:
        """Settle what depends on the tokenizer or the data (called before generating)."""

    def score(self, example, generation: str) -> dict:
        raise NotImplementedError

    def summarize(self, records: Sequence[dict]) -> dict:
        n = len(records)
        correct = sum(bool(r["correct"]) for r in records)
        return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "primary_metric": "exact"}

    def describe(self) -> dict:
        return {"name": self.name, "stop": list(self.stop), "max_new_tokens": self.max_new_tokens,
                "add_special_tokens": self.add_special_tokens, **self.options}


class GSM8KProtocol(EvalProtocol):
    def prompt(self, example) -> str:
        question = example.meta.get("question", example.prompt)
        return f"Question: {question}\nAnswer:"

    def score(self, example, generation: str) -> dict:
        answer = example.meta.get("answer", example.response)
        pred, gold, ok = metrics.gsm8k_correct(generation, answer, self.options["gsm8k_protocol"])
        return {"prediction": pred, "gold": gold, "correct": ok}

    def summarize(self, records: Sequence[dict]) -> dict:
        out = super().summarize(records)
        out["primary_metric"] = f"acc ({self.options['gsm8k_protocol']})"
        out["no_answer"] = sum(r["prediction"] is None for r in records)
        return out


class ViGGOProtocol(EvalProtocol):
    def score(self, example, generation: str) -> dict:
        gold = example.meta.get("meaning_representation", example.response).strip()
        return {"prediction": metrics.viggo_extract(generation), "gold": gold,
                "correct": metrics.viggo_exact(generation, gold), "slot_f1": metrics.viggo_slot_f1(generation, gold)}

    def summarize(self, records: Sequence[dict]) -> dict:
        out = super().summarize(records)
        out["slot_f1"] = sum(r["slot_f1"] for r in records) / len(records) if records else 0.0
        return out


class SQLProtocol(EvalProtocol):
    def prompt(self, example) -> str:
        return example.prompt + (SQL_ANSWER_SUFFIX if self.options["sql_paper_prompt"] else "")

    def score(self, example, generation: str) -> dict:
        gold = example.meta.get("gold_sql", example.response).strip()
        pred = metrics.sql_extract(generation, paper=False)
        record = {"prediction": pred, "gold": gold, "exact": metrics.sql_exact(generation, gold),
                  "exact_nocase": metrics.sql_exact_nocase(generation, gold), "execution": None}
        tables = example.meta.get("tables")
        if tables:
            result = sql_execution_result(pred, gold, tables, example.meta.get("context"),
                                          case_insensitive=self.options["sql_case_insensitive"],
                                          timeout_s=self.options["sql_timeout_s"])
            record["execution"], record["exec_reason"] = result.match, result.reason
        record["correct"] = record["execution"] if tables else record["exact"]
        return record

    def summarize(self, records: Sequence[dict]) -> dict:
        out = super().summarize(records)
        n = len(records)
        executed = [r for r in records if r["execution"] is not None]
        out["exact"] = sum(r["exact"] for r in records) / n if n else 0.0
        out["exact_nocase"] = sum(r["exact_nocase"] for r in records) / n if n else 0.0
        out["n_executed"] = len(executed)
        if executed:
            out["execution"] = sum(r["execution"] for r in executed) / len(executed)
            out["gold_errors"] = sum(r["exec_reason"].startswith("gold:") for r in executed)
            out["pred_errors"] = sum(r["exec_reason"].startswith("pred:") for r in executed)
        out["primary_metric"] = ("execution" if len(executed) == n else "exact" if not executed
                                 else "execution where tables exist, else exact")
        return out


class JsonlProtocol(EvalProtocol):
    """Any prompt/response JSONL file: greedy generation, exact match after stripping whitespace, and
    the mean loss per response token (as training measures it)."""

    JSONL_MARGIN_TOKENS = 16

    def prepare(self, tokenizer, examples: Sequence) -> None:
        if self.max_new_tokens is None:  # longer than the longest gold answer cannot match exactly
            longest = max(len(tokenizer(e.response.strip(), add_special_tokens=False)["input_ids"]) for e in examples)
            self.max_new_tokens = longest + self.JSONL_MARGIN_TOKENS

    def score(self, example, generation: str) -> dict:
        prediction, gold = generation.strip(), example.response.strip()
        return {"prediction": prediction, "gold": gold, "correct": prediction == gold}

    def summarize(self, records: Sequence[dict]) -> dict:
        out = super().summarize(records)
        out["exact"] = out["accuracy"]
        out["primary_metric"] = "exact (stripped)"
        return out


PROTOCOL_TASKS = ("gsm8k", "viggo", "sql", "sql-synth")  # evaluable by name alone
FILE_PROTOCOL_TASKS = ("jsonl",)  # evaluable given a file (rosa eval --data PATH)


def get_protocol(task: str, gsm8k_protocol: str = "paper", sql_paper_prompt: bool = False,
                 sql_case_insensitive: bool = True, sql_timeout_s: float = 2.0,
                 stop: Optional[Sequence[str]] = None, max_new_tokens: Optional[int] = None,
                 max_seq_len: int = 512) -> EvalProtocol:
    """The protocol for ``task`` (a task name); ``stop`` / ``max_new_tokens`` override its defaults.

    ``max_seq_len`` bounds prompt + response tokens where a protocol also measures the loss (jsonl)."""
    key = str(task).strip().lower().replace("_", "-")
    if key == "gsm8k":
        metrics._check_protocol(gsm8k_protocol)
        paper = gsm8k_protocol == "paper"
        proto: EvalProtocol = GSM8KProtocol(
            key, f"gsm8k-{gsm8k_protocol}", GSM8K_PAPER_STOP if paper else GSM8K_HARNESS_STOP, 256, False,
            {"gsm8k_protocol": gsm8k_protocol})
    elif key == "viggo":
        proto = ViGGOProtocol(key, "viggo-paper", ("\n",), 128, True)
    elif key in ("sql", "sql-synth"):
        check_timeout(sql_timeout_s)  # finite and > 0: nan / inf would switch the guard off
        proto = SQLProtocol(key, "sql-paper-prompt" if sql_paper_prompt else "sql", ("\n",), 192, True,
                            {"sql_paper_prompt": bool(sql_paper_prompt),
                             "sql_case_insensitive": bool(sql_case_insensitive),
                             "sql_timeout_s": float(sql_timeout_s)})
    elif key == "jsonl":
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        proto = JsonlProtocol(key, "jsonl-exact", (), None, True, {"loss": True, "loss_max_seq_len": max_seq_len})
    else:
        raise ValueError(f"task {task!r} has no evaluation protocol; evaluable tasks: "
                         f"{', '.join(PROTOCOL_TASKS + FILE_PROTOCOL_TASKS)}")
    if stop is not None:
        proto.stop = tuple(stop)
    if max_new_tokens is not None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        proto.max_new_tokens = max_new_tokens
    return proto


def score_all(protocol: EvalProtocol, examples: Sequence, generations: Sequence[str],
              prompts: Sequence[str]) -> List[dict]:
    """One record per example: index, prompt, generation, prediction, gold, correct, extras."""
    records = []
    for i, (example, prompt, generation) in enumerate(zip(examples, prompts, generations)):
        records.append({"index": i, "prompt": prompt, "generation": generation,
                        **protocol.score(example, generation)})
    return records
