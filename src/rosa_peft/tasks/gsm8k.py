"""GSM8K in the RoSA training format: prompt = the raw question, response = the full answer.

The answer keeps its ``<<calc>>`` annotations and the final ``#### N`` line. Evaluation
(lm-evaluation-harness style) needs the full gold answer, kept in ``meta["answer"]``.
"""
from __future__ import annotations

from .base import Example, FileTask
from ._files import get_field


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

    def convert(self, record: dict, source: str, lineno: int, split: str) -> Example:
        question = get_field(record, "question", source, lineno)
        answer = get_field(record, "answer", source, lineno)
        return Example(prompt=question, response=answer, meta={"answer": answer, "question": question})
