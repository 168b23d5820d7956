"""`rosa bench`: structure of the outputs, equal budgets, ratios vs PEFT LoRA, --explain, bad input.

Small shapes only and no timed assertions: the numbers themselves are not checked, only how they
are computed and reported.
"""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from rosa_peft.bench import methods as M
from rosa_peft.bench.ops import bench_shape
from rosa_peft.bench.shapes import PRESETS, build_model, resolve_preset
from rosa_peft.bench.step import StepResult, add_ratios, run_step_suite
from rosa_peft.cli import main

HAVE_PEFT = importlib.util.find_spec("peft") is not None
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="peft not installed")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared machine: one thread avoids waiting on a descheduled sibling thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _shapes(preset):
    return {f"layers.0.{n}": (o, i) for n, o, i in preset.linear_shapes()}


def _expected_counts(b: M.Budget) -> dict:
    """Trainable parameters of each adapter method, from the shapes alone."""
    lora_r = sum(b.rosa_rank * (o + i) for o, i in b.shapes.values())
    numel = {n: o * i for n, (o, i) in b.shapes.items()}
    return {
        "peft-lora": b.target,
        "lora": b.target,
        "peft-shira": sum(b.lora_rank * (o + i) for o, i in b.shapes.values()),
        "rosa-merged": lora_r + sum(b.nnz(b.rosa_density).values()),
        "spa": sum(b.nnz(b.spa_density).values()),
        "peft-supra": lora_r + sum(int(v * b.rosa_density) for v in numel.values()),
    }


@pytest.mark.parametrize("preset", ["llama2-7b", "smollm2-135m", "tiny"])
def test_equal_budget_within_two_percent(preset):
    b = M.Budget.for_shapes(_shapes(PRESETS[preset]), 16, 8)
    assert b.target == sum(16 * (o + i) for o, i in b.shapes.values())
    for method, count in _expected_counts(b).items():
        assert abs(count / b.target - 1) <= 0.02, (preset, method, count, b.target)


def test_llama_7b_budget_matches_the_documented_configuration():
    b = M.Budget.for_shapes(_shapes(PRESETS["llama2-7b"]), 16, 8)
    assert b.target == 1_249_280
    assert b.rosa_density == pytest.approx(0.0031, abs=5e-5)


@needs_peft
def test_built_models_have_equal_trainable_parameters():
    preset = resolve_preset("tiny")
    template = build_model(preset, torch.float32)
    budget = M.budget_for(template, 16, 8)
    counts = {}
    for method in ("peft-lora", "peft-shira", "peft-supra", "lora", "spa", "rosa-merged", "rosa-sp_add"):
        model, params = M.build(method, lambda: build_model(preset, torch.float32), budget)
        counts[method] = M.trainable_count(model)
        assert sum(p.numel() for p in params) == counts[method]
    for method, count in counts.items():
        assert abs(count / budget.target - 1) <= 0.02, (method, count, budget.target)
    fft, _ = M.build("fft", lambda: build_model(preset, torch.float32), budget)
    assert M.trainable_count(fft) == sum(p.numel() for p in fft.parameters())


def test_budget_rejects_bad_ranks():
    shapes = _shapes(PRESETS["tiny"])
    with pytest.raises(ValueError, match="--rosa-rank"):
        M.Budget.for_shapes(shapes, 8, 8)
    with pytest.raises(ValueError, match="--budget-rank"):
        M.Budget.for_shapes(shapes, 0, 0)


def test_ratio_column_is_relative_to_peft_lora():
    rows = [StepResult("lora", "ours", 10, median_s=3.0, peak_mb=110.0),
            StepResult("peft-lora", "PEFT LoRA", 10, median_s=2.0, peak_mb=100.0),
            StepResult("peft-shira", "SHiRA", 10, median_s=5.0)]
    add_ratios(rows)
    assert rows[1].ratio_to_lora == 1.0 and rows[1].mem_ratio_to_lora == 1.0
    assert rows[0].ratio_to_lora == pytest.approx(1.5)
    assert rows[0].mem_ratio_to_lora == pytest.approx(1.1)
    assert rows[2].ratio_to_lora == pytest.approx(2.5) and rows[2].mem_ratio_to_lora is None
    no_ref = [StepResult("lora", "ours", 10, median_s=3.0)]
    add_ratios(no_ref)
    assert no_ref[0].ratio_to_lora is None


@needs_peft
def test_step_suite_structure_and_ratios():
    results, budget, profiles = run_step_suite(
        resolve_preset("tiny"), ["peft-lora", "lora", "rosa-merged"], dtype=torch.float32, tokens=16,
        repeats=2, warmup=1, progress=False, profile=("rosa-merged",))
    by = {r.method: r for r in results}
    assert set(by) == {"peft-lora", "lora", "rosa-merged"}
    for r in results:
        assert r.skipped is None and len(r.times_s) == 2
        assert r.median_s > 0 and r.tokens_per_s == pytest.approx(16 / r.median_s)
        assert r.ratio_to_lora == pytest.approx(r.median_s / by["peft-lora"].median_s)
    assert by["peft-lora"].ratio_to_lora == 1.0
    assert by["lora"].trainable == budget.target
    assert abs(by["rosa-merged"].trainable / budget.target - 1) <= 0.02
    assert "rosa-merged" in profiles and "Name" in profiles["rosa-merged"]


def test_ops_rows_mark_the_dispatch_choice_and_dense_baseline():
    rows = bench_shape(48, 32, 0.02, tokens=8, dtype=torch.float32, device="cpu", repeats=1)
    assert {r.op for r in rows} == {"sddmm", "scatter", "spmm"}
    for op in ("sddmm", "scatter", "spmm"):
        mine = [r for r in rows if r.op == op]
        assert sum(r.kind == "dense" for r in mine) == 1
        assert sum(r.chosen for r in mine) == 1
        for r in mine:
            assert r.nnz == round(0.02 * 48 * 32)
            if r.kind == "sparse":
                dense = next(d.median_ms for d in mine if d.kind == "dense")
                assert r.speedup_vs_dense == pytest.approx(dense / r.median_ms)
    chosen = next(r for r in rows if r.op == "sddmm" and r.chosen)
    assert chosen.impl == "sampled_addmm"  # CPU, low density


def test_explain_prints_the_dispatch_choice(capsys):
    assert main(["bench", "--explain", "--shapes", "64x48", "--densities", "0.01,0.5", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "sddmm: sampled_addmm" in out and "sddmm: dense_gather" in out
    assert "candidates" in out and "shape=(64, 48)" in out


@needs_peft
def test_cli_writes_json_and_markdown(tmp_path, capsys):
    rc = main(["bench", "--shapes", "tiny", "--methods", "peft-lora,rosa-merged,spa", "--memory", "none",
               "--repeats", "1", "--tokens", "16", "--densities", "0.05", "--dtype", "float32", "--device", "cpu",
               "--output", str(tmp_path), "--no-progress", "--name", "t", "--threads", "1"])
    assert rc == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["config"]["tokens"] == 16 and data["environment"]["device"] == "cpu"
    block = data["step"][0]
    assert block["preset"]["name"] == "tiny" and block["budget"]["target_trainable"] > 0
    assert [r["method"] for r in block["results"]] == ["peft-lora", "rosa-merged", "spa"]
    assert block["results"][0]["ratio_to_lora"] == 1.0
    assert any("RoSA-merged step time" in n for n in block["notes"])
    assert data["ops"] and {"op", "impl", "median_ms", "chosen"} <= set(data["ops"][0])
    md = (tmp_path / "t.md").read_text()
    assert "× PEFT LoRA" in md and "## Op level" in md and "rosa-peft RoSA merged" in md
    assert "× PEFT LoRA" in capsys.readouterr().out


def test_plot_missing_matplotlib_gives_a_message(tmp_path, monkeypatch):
    import builtins

    from rosa_peft.bench import report

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    msg = report.plot({"step": []}, tmp_path / "x.png")
    assert "matplotlib is not installed" in msg


@pytest.mark.parametrize("argv, flag", [
    (["--tokens", "0"], "--tokens"),
    (["--suite", "everything"], "--suite"),
    (["--methods", "peft-lora,nope"], "--methods"),
    (["--shapes", "64x32", "--suite", "step"], "--shapes"),
    (["--shapes", "gpt9"], "--shapes"),
    (["--densities", "3"], "--densities"),
    (["--dtype", "int8"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--rosa-rank", "16"], "--rosa-rank"),
    (["--profile", "fft", "--methods", "lora"], "--profile"),
])
def test_bad_input_names_the_flag(argv, flag, capsys):
    assert main(["bench", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err


def test_peak_sampler_sees_an_allocation():
    # in a fresh process: a long test session's allocator may hand back pages it already holds (no RSS growth)
    code = ("import torch\nfrom rosa_peft.bench.memory import PeakSampler, rss_mb\nbefore = rss_mb()\n"
            "with PeakSampler() as s:\n    t = torch.ones(64 * 1024 * 1024 // 4)\n    del t\n"
            "print(s.peak_mb - before)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) >= 48


def test_op_shapes_are_deduplicated():
    from rosa_peft.bench.command import _op_shapes

    assert _op_shapes(["smollm2-135m", "576x576"], None) == [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def test_speed_suites_write_a_row_file(tmp_path, monkeypatch):
    """--suite eval / train call the end-to-end speed functions and write their rows as JSON + markdown."""
    from rosa_peft.bench import eval_speed, train_speed
    from rosa_peft.cli import main

    monkeypatch.setattr(eval_speed, "run_eval_speed", lambda **kw: {"ratio": 0.95, "rosa_tokens_per_s": 30.0})
    monkeypatch.setattr(train_speed, "run_train_speed",
                        lambda **kw: {"rows": [{"variant": "after", "s_per_example_train": 1.2}], "raw": {}})
    for suite, needle in (("eval", "0.95"), ("train", "1.2")):
        assert main(["bench", "--suite", suite, "--output-dir", str(tmp_path), "--no-progress"]) == 0
        assert needle in (tmp_path / f"{suite}-speed.md").read_text()
        assert (tmp_path / f"{suite}-speed.json").is_file()


def test_train_suite_takes_variants_and_rounds_and_names_a_bad_variant(tmp_path, monkeypatch, capsys):
    from rosa_peft.bench import train_speed
    from rosa_peft.cli import main

    calls = []

    def fake(**kw):
        calls.append(kw)
        train_speed._resolve_variants(kw["variants"])  # the real validation, nothing built
        return {"rows": [{"variant": "paper-b8", "s_per_example_train": 0.9}], "raw": {}}

    monkeypatch.setattr(train_speed, "run_train_speed", fake)
    argv = ["bench", "--suite", "train", "--output-dir", str(tmp_path), "--no-progress", "--threads", "1"]
    assert main(argv + ["--methods", "paper-b8,bf16", "--repeats", "3"]) == 0
    assert calls[-1]["variants"] == ["paper-b8", "bf16"] and calls[-1]["rounds"] == 3 and calls[-1]["threads"] == 1
    assert main(argv) == 0
    assert calls[-1]["variants"] is None and calls[-1]["rounds"] == 2  # defaults: every variant, two rounds
    capsys.readouterr()
    assert main(argv + ["--methods", "paper-b8,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "paper-b8-eager" in err[0]
    assert main(argv + ["--repeats", "0"]) == 2
