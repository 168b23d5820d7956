"""docs/results.md and results/: the committed study regenerates without training, byte for byte, and every
table line and number quoted in the document comes from the tables the runner wrote."""
import argparse
import os
import re
import shutil

import pytest
from conftest import REPO

from rosa_peft.study import command

ROOT = str(REPO)
STUDIES = [("configs/study-viggo.yaml", "results/study-viggo"), ("configs/study-sql.yaml", "results/study-sql")]
DOC = os.path.join(ROOT, "docs", "results.md")


def rosa_study(*argv):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args([str(a) for a in argv]))


@pytest.mark.parametrize("config, results", STUDIES)
def test_committed_study_regenerates_without_training(config, results, tmp_path, monkeypatch):
    from rosa_peft.study import runner
    from rosa_peft.train import run as train_run

    def no_training(*args, **kwargs):
        raise AssertionError("the committed study trained a cell")

    monkeypatch.setattr(train_run, "run_training", no_training)
    monkeypatch.setattr(runner, "run_cell_isolated", no_training)
    out = tmp_path / "out"
    shutil.copytree(os.path.join(ROOT, results), out)
    for name in ("results.md", "results.json"):
        (out / name).unlink()
    assert rosa_study(os.path.join(ROOT, config), "--output-dir", out, "--no-progress") == 0
    for name in ("results.md", "results.json"):
        with open(os.path.join(ROOT, results, name), "rb") as fh:
            assert (out / name).read_bytes() == fh.read(), name
    for name in ("results.png", "loss.png", "masks.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def _generated_lines():
    lines = set()
    for _, results in STUDIES:
        with open(os.path.join(ROOT, results, "results.md"), encoding="utf-8") as fh:
            lines.update(line.rstrip("\n") for line in fh)
    return lines


def _doc():
    with open(DOC, encoding="utf-8") as fh:
        return fh.read()


def test_doc_tables_are_copied_from_the_generated_tables():
    """Each ``<!-- from results/...md -->`` block of the document is a run of lines of that generated table."""
    doc = _doc()
    blocks = re.findall(r"<!-- from (results/[\w./-]+) -->\n(.*?)<!-- end -->", doc, flags=re.S)
    assert len(blocks) >= 4
    for source, block in blocks:
        with open(os.path.join(ROOT, source), encoding="utf-8") as fh:
            generated = fh.read()
        assert block.strip() and block in generated, f"the block from {source} is not in it verbatim"


def test_numbers_in_the_results_text_come_from_the_tables():
    """Every one-decimal number (e.g. "47.3") in the prose of the Results section appears in a generated table."""
    results = _doc().split("\n## Results", 1)[1]
    prose = "\n".join(line for line in results.splitlines() if not line.startswith("|"))
    tables = "\n".join(sorted(_generated_lines()))
    numbers = set(re.findall(r"(?<![\d.])\d+\.\d+(?![\d])", prose))
    assert len(numbers) > 10
    missing = sorted(n for n in numbers if not re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", tables))
    assert not missing, missing
