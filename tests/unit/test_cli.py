"""The `rosa` command line as documented: --version, a --help that imports neither torch nor transformers,
every option with help text and its default, one spelling per concept, typed YAML values, up-front
checks of optional packages, packaged recipe configs, and `--task jsonl` from train to eval."""
import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from rosa_peft.cli import SUBCOMMANDS, build_parser, main

from conftest import REPO
from conftest import make_tiny_llama, save_tiny_base


def _in_subprocess(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _rosa(capsys, *argv):
    """``rosa ARGV`` in-process: (exit status, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(load=name)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


# ---- --version / --help stay light -------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_import_neither_torch_nor_transformers(flag):
    out = _in_subprocess(
        "import sys, contextlib, io\n"
        "from rosa_peft.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        f"    rc = main([{flag!r}])\n"
        "print(repr(buf.getvalue()))\n"
        "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    text, status = out.strip().rsplit("\n", 1)
    assert status == "0 False False"
    import rosa_peft

    if flag == "--version":
        assert eval(text) == f"rosa {rosa_peft.__version__}\n"  # noqa: S307 - our own repr
    else:
        for name in SUBCOMMANDS:
            assert name in eval(text)  # noqa: S307


def test_package_import_is_lazy_and_keeps_every_public_name():
    out = _in_subprocess("import sys, rosa_peft\nprint('torch' in sys.modules, sorted(rosa_peft.__all__))")
    flag, names = out.split(" ", 1)
    assert flag == "False"
    import rosa_peft

    assert sorted(rosa_peft.__all__) == eval(names)  # noqa: S307
    for name in rosa_peft.__all__:
        assert getattr(rosa_peft, name) is not None, name
    from rosa_peft import RosaConfig, RosaModel, get_rosa_model  # noqa: F401
    from rosa_peft.model import RosaModel as Direct

    assert RosaModel is Direct
    with pytest.raises(AttributeError):
        rosa_peft.no_such_name  # noqa: B018


def test_rosa_without_a_command_prints_help_and_exits_2(capsys):
    rc, out, _ = _rosa(capsys)
    assert rc == 2 and "COMMAND" in out


# ---- every option documented, with its default --------------------------------------------------------
def _option_entries(help_text: str) -> list[str]:
    """The help entries of the options (an entry: its '  -' line plus the indented lines under it)."""
    entries, current = [], None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return [" ".join(part.strip() for part in entry) for entry in entries]


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_option_has_help_and_shows_its_default(command, capsys):
    rc, out, _ = _rosa(capsys, command, "--help")
    assert rc == 0
    entries = [e for e in _option_entries(out) if not e.startswith("-h, --help")]
    assert entries
    for entry in entries:
        assert "(default" in entry, entry
    sub = _subparser(command)
    for action in sub._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS:
            assert action.help and action.help.strip(), action.option_strings


def test_train_flags_come_from_train_options(capsys):
    from rosa_peft.options import flag_of
    from rosa_peft.train.run import TrainOptions

    _, out, _ = _rosa(capsys, "train", "--help")
    for f in dataclasses.fields(TrainOptions):
        if f.metadata.get("cli", True):
            assert flag_of(f) in out, f.name
    assert "--rank R, --r R" in out  # --r stays an alias (torchrun needs --rank)
    assert "--no-progress" in out and "--bf16" in out


# ---- one spelling per concept -------------------------------------------------------------------------
def _choices(command: str, flag: str):
    return next(a for a in _subparser(command)._actions if flag in a.option_strings).choices


def test_choices_are_identical_across_subcommands():
    assert tuple(_choices("train", "--dtype")) == tuple(_choices("eval", "--dtype")) == tuple(
        _choices("bench", "--dtype")) == ("float32", "bfloat16", "float16")
    assert tuple(_choices("train", "--quantize")) == tuple(_choices("eval", "--quantize")) == ("none", "nf4")
    assert tuple(_choices("train", "--quant-backend")) == tuple(_choices("eval", "--quant-backend"))


def test_one_spelling_per_concept():
    def flags(command):
        return {s for a in _subparser(command)._actions if a.help is not argparse.SUPPRESS for s in a.option_strings}

    train, demo, ev, bench = flags("train"), flags("demo"), flags("eval"), flags("bench")
    assert {"--rank", "--max-steps", "--batch-size", "--output-dir"} <= train & demo
    assert "--batch-size" not in ev and "--eval-batch-size" in ev  # generation batch is its own name
    assert {"--budget-rank", "--rosa-rank", "--output-dir"} <= bench and "--lora-rank" not in bench
    assert "--steps" not in demo and "--output" not in bench


@pytest.mark.parametrize("command, old, new_dest, value", [
    ("bench", "--lora-rank", "lora_rank", 4), ("bench", "--output", "output_dir", "d"),
    ("eval", "--batch-size", "eval_batch_size", 3), ("demo", "--steps", "max_steps", 5), ("demo", "--r", "r", 2),
])
def test_old_spellings_still_parse(command, old, new_dest, value, capsys):
    args = build_parser(load=command).parse_args([command, old, str(value)])
    assert getattr(args, new_dest) == value
    if old not in ("--r",):
        assert f"{old} is deprecated" in capsys.readouterr().err


def test_train_r_and_rank_are_one_option():
    for flag in ("--r", "--rank"):
        assert build_parser(load="train").parse_args(["train", flag, "4"]).r == 4


def test_bad_flag_is_one_line(capsys):
    rc, _, err = _rosa(capsys, "train", "--dtype", "int8")
    line = _one_error_line(err)
    assert rc == 2 and "--dtype" in line and "'int8'" in line and "usage:" not in err


# ---- YAML values: typed, one line naming file and key, before any model load -------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    import rosa_peft.utils.model_loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(rosa_peft.utils.model_loading, "load_model", refuse)


def _options(config=None, **flags):
    from rosa_peft.train.command import options_from_args

    return options_from_args(argparse.Namespace(config=str(config) if config else None, **flags))


def test_yaml_numeric_strings_become_numbers(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("lr: 2e-4\nlora_lr: 1.0e-3\nbudget: 1.2e6\nmax-steps: '20'\nlimit: 8\nbf16: true\n"
                   "target_modules: [q_proj, v_proj]\n")
    opts = _options(cfg)
    assert opts.lr == 2e-4 and isinstance(opts.lr, float) and opts.lora_lr == 1e-3
    assert opts.budget == 1_200_000 and isinstance(opts.budget, int)
    assert opts.max_steps == 20 and opts.limit == 8 and opts.bf16 is True
    assert opts.target_modules == ["q_proj", "v_proj"]


def test_yaml_layers_between_defaults_and_flags(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("max_steps: 5\ngrad_accum: 2\n")
    opts = _options(cfg, max_steps=7)
    assert (opts.max_steps, opts.grad_accum, opts.batch_size) == (7, 2, 1)


@pytest.mark.parametrize("yaml_text, needle", [
    ("lr: abc\n", "lr: expected a number, got 'abc'"),
    ("max_steps: 2.5\n", "max_steps: expected an integer, got 2.5"),
    ("budget: '1e6x'\n", "budget: expected an integer, got '1e6x'"),
    ("bf16: maybe\n", "bf16: expected true or false, got 'maybe'"),
    ("method: qlora\n", "method: expected one of rosa, lora, spa, fft, got 'qlora'"),
    ("grad_accum: null\n", "grad_accum: expected an integer, got null"),
    ("lr: .nan\n", "lr: expected a number, got nan"),
    ("no_such_key: 1\n", "unknown option(s) no_such_key"),
    ("- a list\n", "expected a mapping of option names to values"),
])
def test_bad_yaml_value_is_one_line_naming_file_and_key(tmp_path, capsys, no_model_load, yaml_text, needle):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml_text)
    out = tmp_path / "run"
    rc, _, err = _rosa(capsys, "train", "--config", cfg, "--output-dir", out)
    line = _one_error_line(err)
    assert rc == 2 and f"{cfg}: " in line and needle in line, line
    assert not out.exists()


def test_python_values_are_typed_too():
    from rosa_peft.train.run import TrainOptions

    assert TrainOptions(lr="3e-4").lr == 3e-4
    with pytest.raises(ValueError, match="seed: expected an integer, got 'x'"):
        TrainOptions(seed="x")


# ---- optional packages: named with their pip extra, before the model load --------------------------------
@pytest.fixture
def jsonl_files(tmp_path):
    rows = [{"question": f"What is {a} plus {b}?", "answer": str(a + b), "id": i}
            for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)])]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return train, test


def _hide(monkeypatch, *modules):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


@pytest.mark.parametrize("backend, package, extra", [("torchao", "torchao", "quant"), ("bnb", "bitsandbytes", "bnb")])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_missing_quant_package_is_named_with_its_extra(tmp_path, capsys, monkeypatch, no_model_load, jsonl_files,
                                                       command, backend, package, extra):
    _hide(monkeypatch, package)
    out = tmp_path / ("run" if command == "train" else "report.json")
    target = ["--output-dir", out] if command == "train" else ["--output", out]
    rc, _, err = _rosa(capsys, command, "--model", tmp_path / "base", "--task", "jsonl", "--data", jsonl_files[0],
                       "--quantize", "nf4", "--quant-backend", backend, *target)
    line = _one_error_line(err)
    assert rc == 2 and f"'{package}' package" in line and f"pip install 'rosa-peft[{extra}]'" in line, line
    assert not out.exists()


def test_missing_gguf_for_the_embedded_model(tmp_path, capsys, monkeypatch, no_model_load, jsonl_files):
    from rosa_peft.utils import model_loading as models

    monkeypatch.setattr(models, "default_model_converted", lambda: False)
    _hide(monkeypatch, "gguf")
    rc, _, err = _rosa(capsys, "train", "--task", "jsonl", "--data", jsonl_files[0], "--output-dir", tmp_path / "run")
    line = _one_error_line(err)
    assert rc == 2 and "'gguf' package" in line and "pip install 'rosa-peft[default-model]'" in line, line


@pytest.mark.parametrize("argv, needle", [
    (["--task", "jsonl"], "--task jsonl needs --data PATH"),
    (["--task", "sql-synth", "--data", "x.jsonl"], "--data is for --task jsonl"),
    (["--task", "jsonl", "--data", "missing.jsonl"], "file not found: missing.jsonl"),
    (["--dtype", "float16"], "--dtype float16 is not supported for training"),
    (["--mask-grad-steps", "0"], "mask_grad_steps"),  # the schedule is checked before the model loads
    (["--recipe", "paper", "--warmup-steps", "-1"], "warmup_steps must be >= 0, got -1"),
])
def test_train_input_errors(tmp_path, capsys, monkeypatch, no_model_load, argv, needle):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _rosa(capsys, "train", *argv, "--output-dir", tmp_path / "run")
    assert rc == 2 and needle in _one_error_line(err)
    assert os.listdir(tmp_path) == []


# ---- packaged recipes ------------------------------------------------------------------------------------------
def test_recipes_are_packaged_and_found_by_name(tmp_path, monkeypatch):
    from rosa_peft.options import find_config, packaged_configs, packaged_configs_dir

    names = packaged_configs()
    assert {"study-sql.yaml", "study-viggo.yaml", "viggo-gpu.yaml", "viggo-qrosa-gpu.yaml"} <= set(names)
    for name in names:  # the repository's configs/ is the packaged folder
        assert (REPO / "configs" / name).read_bytes() == (packaged_configs_dir() / name).read_bytes()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"rosa_peft.configs" = ["*.yaml"]' in pyproject
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names resolve to the packaged files
    assert find_config("viggo-gpu.yaml") == str(packaged_configs_dir() / "viggo-gpu.yaml")
    assert find_config("configs/study-sql.yaml").endswith(os.path.join("rosa_peft", "configs", "study-sql.yaml"))
    with pytest.raises(FileNotFoundError, match=r"packaged recipes \(.*viggo-gpu.yaml"):
        find_config("nope.yaml")
    for name in ("viggo-gpu.yaml", "viggo-qrosa-gpu.yaml"):
        text = (packaged_configs_dir() / name).read_text()
        assert text.startswith("# GPU-SCALE RECIPE")
        opts = _options(name)
        assert opts.task == "viggo" and opts.budget == 2_500_000 and opts.max_steps == 200
    assert _options("viggo-qrosa-gpu.yaml").quantize == "nf4"


# ---- jsonl: train -> eval end to end ------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_jsonl_train_then_eval(tmp_path, capsys, jsonl_files, smol_tokenizer):
    base = tmp_path / "base"
    save_tiny_base(base, smol_tokenizer)
    train, test = jsonl_files
    run = tmp_path / "run"
    fields = ["--prompt-field", "question", "--response-field", "answer"]
    rc, out, err = _rosa(capsys, "train", "--model", base, "--task", "jsonl", "--data", train, *fields,
                         "--method", "rosa", "--rank", 2, "--density", 0.05, "--warmup-steps", 1, "--max-steps", 3,
                         "--batch-size", 2, "--grad-accum", 1, "--lr-warmup-steps", 1, "--max-seq-len", 64,
                         "--no-progress", "--output-dir", run)
    assert rc == 0, err[-3000:]
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["task"] == "jsonl" and cfg["data"] == str(train) and cfg["train_examples"] == 6
    assert cfg["prompt_field"] == "question" and cfg["global_steps"] == 3

    report_path = tmp_path / "report.json"
    rc, out, err = _rosa(capsys, "eval", "--model", base, "--adapter", run, "--task", "jsonl", "--data", test,
                         *fields, "--eval-batch-size", 2, "--no-progress", "--output", report_path)
    assert rc == 0, err[-3000:]
    report = json.loads(report_path.read_text())
    summary = report["summary"]
    assert report["task"] == "jsonl" and summary["n"] == 3
    assert summary["primary_metric"] == "exact (stripped)" and summary["exact"] == summary["accuracy"]
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert math.isfinite(summary["loss"]) and summary["loss"] > 0
    assert report["protocol"]["loss"] is True and report["protocol"]["max_new_tokens"] >= 16
    for ex, gold in zip(report["examples"], ["3", "7", "11"]):
        assert ex["gold"] == gold and ex["prediction"] == ex["generation"].strip()
        assert ex["correct"] == (ex["prediction"] == gold)
    assert "loss" in out and "exact (stripped)" in out


# ---- a full disk: one line, exit 2, whether Python or torch's serializer reports it --------------------
@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 123 vs 456\n"
                 "PytorchStreamWriter failed writing file data/0: file write failed"),
])
def test_full_disk_is_one_line_exit_2(tmp_path, capsys, monkeypatch, error):
    import rosa_peft.train.command as train_command

    def full_disk(opts):
        raise error

    monkeypatch.setattr(train_command, "run_training", full_disk)
    rc, _, err = _rosa(capsys, "train", "--task", "sql-synth", "--output-dir", tmp_path / "run")
    line = _one_error_line(err)
    assert rc == 2 and ("No space left" in line or "disk full" in line), line


@pytest.mark.parametrize("error", [RuntimeError, ValueError])  # a ValueError outside the input checks too
def test_library_bugs_keep_their_traceback(tmp_path, monkeypatch, error):
    import rosa_peft.train.command as train_command

    def bug(opts):
        raise error("a library bug")

    monkeypatch.setattr(train_command, "run_training", bug)
    with pytest.raises(error, match="a library bug"):
        main(["train", "--task", "sql-synth", "--output-dir", str(tmp_path / "run")])


# ---- user errors are one line; a bug keeps its traceback ---------------------------------------------------
def test_user_error_from_anywhere_is_one_line(tmp_path, capsys, monkeypatch):
    import rosa_peft.train.command as train_command
    from rosa_peft.cli import UserError as CliUserError
    from rosa_peft.utils.checks import UserError

    assert CliUserError is UserError  # the old import path still works

    def bad_input(opts):
        raise UserError("--thing must be a positive integer, got 0")

    monkeypatch.setattr(train_command, "run_training", bad_input)
    rc, _, err = _rosa(capsys, "train", "--task", "sql-synth", "--output-dir", tmp_path / "run")
    assert rc == 2 and _one_error_line(err) == "rosa train: error: --thing must be a positive integer, got 0"


def test_user_error_classification():
    from rosa_peft import RosaConfig, cli, get_rosa_model
    from rosa_peft.options import coerce
    from rosa_peft.train.trainer import NonFiniteLossError

    def raised(exc):
        try:
            raise exc
        except Exception as caught:  # noqa: BLE001 - the traceback is what is tested
            return caught

    assert cli.user_error_message(raised(NonFiniteLossError("loss", float("nan"), 3))).startswith("non-finite loss")
    assert cli.user_error_message(raised(FileNotFoundError("no such file"))) == "no such file"
    assert cli.user_error_message(raised(ValueError("raised in a test module"))) is None
    assert cli.user_error_message(raised(KeyError("k"))) is None
    assert cli.user_error_message(raised(RuntimeError("a bug"))) is None
    with pytest.raises(ValueError) as info:  # an input check: one line
        coerce("lr", "abc", float)
    assert cli.user_error_message(info.value) == str(info.value)
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.05))
    with pytest.raises(ValueError) as info:  # API misuse inside the library (PEFT's ValueError): a bug, traceback
        model.delete_adapter("no-such-adapter")
    assert cli.user_error_message(info.value) is None
    with pytest.raises(ValueError) as info:  # a mask that does not fit the model: the user's input
        model.set_masks({"model.layers.0.self_attn.q_proj": torch.ones(3, 3, dtype=torch.bool)})
    assert cli.user_error_message(info.value) == str(info.value)


def test_no_progress_silences_the_libraries_bars_and_restores_them():
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from rosa_peft.cli import _progress_bars

    assert hf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
    with _progress_bars(False):  # rosa eval/train/study/bench --no-progress
        assert not hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
    assert hf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
    with pytest.raises(RuntimeError), _progress_bars(False):  # restored after an error too
        raise RuntimeError("boom")
    assert hf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
