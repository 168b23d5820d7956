"""study.runner's file checks: a cell record that is not one, or holds a non-finite number, is refused on
load with one line naming the file and the field (the CLI prints it and exits 2)."""
import json

import pytest

from rosa_peft.cli import user_error_message
from rosa_peft.study.runner import CELL_FORMAT, read_cell


def _write(path, record):
    path.write_text(json.dumps(record))
    return str(path)


def test_read_cell_refuses_non_finite_numbers_naming_the_field(tmp_path):
    good = {"format": CELL_FORMAT, "train": {"train_loss": 0.5}, "eval": {"summary": {"accuracy": 0.25}}}
    assert read_cell(_write(tmp_path / "ok.json", good)) == good
    for bad, field in (({"train": {"train_loss": float("nan")}}, "train.train_loss"),
                       ({"eval": {"summary": {"accuracy": float("inf")}}}, "eval.summary.accuracy"),
                       ({"eval": {"per_seed": [0.1, float("-inf")]}}, "eval.per_seed.1")):
        path = _write(tmp_path / "bad.json", {**good, **bad})  # json.dumps writes the bare NaN / Infinity tokens
        with pytest.raises(ValueError) as exc:
            read_cell(path)
        assert user_error_message(exc.value) == f"{path}: {field} is not a finite number"


def test_read_cell_refuses_another_format(tmp_path):
    path = _write(tmp_path / "x.json", {"format": "something-else"})
    with pytest.raises(ValueError) as exc:
        read_cell(path)
    assert "not a study cell record" in user_error_message(exc.value)
