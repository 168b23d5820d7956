"""The one-command GPU check runs its CPU-runnable parts (tiny shapes, tiny model) and reports them."""
import json
import subprocess
import sys

from rosa_peft.bench import gpu_check


def test_plan_has_the_three_steps_with_time_limits(tmp_path):
    steps = gpu_check.plan(str(tmp_path), smoke=False, repo="/repo", work=str(tmp_path))
    assert [s[0] for s in steps] == ["tests", "bench", "train"]
    assert sum(s[2] for s in steps) <= 8 * 60 * 1.5  # each step bounded; the whole check is sized for 8 min
    bench = steps[1][1]
    assert "llama2-7b" in bench and gpu_check.BENCH_METHODS in bench


def test_smoke_check_runs_bench_and_training_and_writes_reports(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "rosa_peft.bench.gpu_check", "--smoke", "--steps", "bench,train",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "cpu-gpucheck-smoke.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["bench", "train"]
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert report["device"]["cuda"] is False and report["smoke"] is True
    md = (out / "cpu-gpucheck-smoke.md").read_text()
    assert "| bench | ok |" in md and "| train | ok |" in md
    assert (out / "smoke-bench.json").is_file()  # rosa bench's own files land beside the report
