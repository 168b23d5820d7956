"""lm-eval on an in-memory RoSA model: evaluate_harness and `rosa eval --harness`, on a tiny local task."""
import json
import math

import pytest
import torch

from conftest import peaked_tiny_llama, run_rosa, save_tiny_base, with_random_adapter

TASK = "rosa_tiny_ll"
DOCS = [("The sky is", " blue"), ("Two plus two is", " four"), ("Cats say", " meow"), ("Water is", " wet")]


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, lm_eval):
    """A 4-document loglikelihood task (perplexity and greedy acc) read from a local jsonl file."""
    root = tmp_path_factory.mktemp("lm_eval_task")
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in DOCS))
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {root / 'hf_cache'}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_target: '{{continuation}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
    return root / "tasks"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer, lm_eval):
    """A saved tiny base, and the same base with a random RoSA adapter, also saved (a run directory)."""
    root = tmp_path_factory.mktemp("tiny_harness")
    base = save_tiny_base(root / "base", smol_tokenizer)
    reference = peaked_tiny_llama(len(smol_tokenizer))  # the same weights again: stays unadapted
    adapted = with_random_adapter(base)
    adapted.save_pretrained(str(root / "run"))
    return root, reference.eval(), adapted.eval()


@torch.no_grad()
def direct_loglikelihoods(model, tokenizer, pairs):
    """(sum log p(continuation | context), greedy?) per pair, with lm-eval's split of the tokens."""
    out = []
    for context, continuation in pairs:
        whole = tokenizer(context + continuation).input_ids
        n_ctx = len(tokenizer(context).input_ids)
        logp = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
        positions = torch.arange(n_ctx - 1, len(whole) - 1)
        targets = torch.tensor(whole[n_ctx:])
        out.append((logp[positions, targets].sum().item(), bool((logp[positions].argmax(-1) == targets).all())))
    return out


def expected_metrics(lls):
    return {"perplexity,none": math.exp(-sum(ll for ll, _ in lls) / len(lls)),
            "acc,none": sum(g for _, g in lls) / len(lls)}


def test_evaluate_harness_scores_the_adapted_model_in_memory(task_dir, tiny, smol_tokenizer, one_thread):
    from rosa_peft.eval.lm_eval_helper import evaluate_harness, format_harness_table, harness_json

    _, reference, adapted = tiny
    results = evaluate_harness(adapted, smol_tokenizer, [TASK], include_path=task_dir, batch_size=2,
                               log_samples=True)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    pairs = [tuple(s["arguments"][0]) for s in samples]
    assert pairs == DOCS
    got = [s["resps"][0][0] for s in samples]
    want = direct_loglikelihoods(adapted, smol_tokenizer, DOCS)
    for (ll, greedy), (want_ll, want_greedy) in zip(got, want):
        assert ll == pytest.approx(want_ll, abs=1e-3) and bool(greedy) == want_greedy
    metrics = results["results"][TASK]
    for key, value in expected_metrics(want).items():
        assert metrics[key] == pytest.approx(value, rel=1e-3)
    base = direct_loglikelihoods(reference, smol_tokenizer, DOCS)
    assert all(abs(a[0] - b[0]) > 1e-2 for a, b in zip(want, base))  # the adapter is what lm-eval scored
    assert TASK in format_harness_table(results)
    assert json.loads(harness_json(results, {"extra": 1}))["extra"] == 1


def test_rosa_eval_harness_merged_matches_unmerged_and_differs_from_base(task_dir, tiny, smol_tokenizer, one_thread):
    root, reference, adapted = tiny
    common = ("eval", "--harness", TASK, "--harness-include", task_dir, "--model", root / "base",
              "--eval-batch-size", 2)
    status, out, err = run_rosa(*common, "--adapter", root / "run")  # float base: merged by default
    report = root / "run" / f"harness-{TASK}.json"
    assert status == 0, err
    assert f"wrote {report}" in err and TASK in out
    merged = json.loads(report.read_text())
    assert merged["rosa_model"]["merged"] is True and merged["rosa_model"]["adapter"] == str(root / "run")
    for key, value in expected_metrics(direct_loglikelihoods(adapted, smol_tokenizer, DOCS)).items():
        assert merged["results"][TASK][key] == pytest.approx(value, rel=1e-3)

    status, _, err = run_rosa(*common, "--output", root / "base.json")
    assert status == 0, err
    base = json.loads((root / "base.json").read_text())
    assert base["rosa_model"]["adapter"] is None
    base_ppl = expected_metrics(direct_loglikelihoods(reference, smol_tokenizer, DOCS))["perplexity,none"]
    assert base["results"][TASK]["perplexity,none"] == pytest.approx(base_ppl, rel=1e-3)
    assert base["results"][TASK]["perplexity,none"] != pytest.approx(merged["results"][TASK]["perplexity,none"],
                                                                     rel=1e-2)


def test_unknown_task_is_a_user_error_naming_it(task_dir):
    from rosa_peft.eval.lm_eval_helper import check_tasks, make_task_manager
    from rosa_peft.utils.checks import UserError

    local = make_task_manager(task_dir, include_defaults=False)  # lm-eval's own index takes seconds
    assert check_tasks(f" {TASK} ", local) == [TASK]
    assert check_tasks(["rosa_tiny_*", TASK], local) == [TASK]  # globs expand, each task once
    with pytest.raises(UserError, match="unknown lm-eval task\\(s\\): no_such_task_xyz, nor_this"):
        check_tasks([TASK, "no_such_task_xyz", "nor_this"], local)
    with pytest.raises(UserError, match="non-empty"):
        check_tasks([TASK, ""], local)


def test_rosa_eval_harness_bad_input_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "h.json"
    status, _, err = run_rosa("eval", "--harness", TASK, "--harness-include", tmp_path / "missing", "--output", out)
    assert status == 2 and "--harness-include" in err and "does not exist" in err
    status, _, err = run_rosa("eval", "--harness", TASK, "--task", "viggo", "--output", out)
    assert status == 2 and "does not combine with --task" in err
    status, _, err = run_rosa("eval", "--harness", TASK, "--num-fewshot", -1, "--output", out)
    assert status == 2 and "--num-fewshot must be a non-negative integer" in err
    assert not out.exists()


def test_rosa_eval_harness_without_lm_eval_says_how_to_install(monkeypatch, tmp_path):
    from rosa_peft.eval import lm_eval_helper

    monkeypatch.setattr(lm_eval_helper, "lm_eval_available", lambda: False)
    status, _, err = run_rosa("eval", "--harness", "arc_easy", "--output", tmp_path / "h.json")
    assert status == 2 and "pip install lm-eval" in err
    assert not (tmp_path / "h.json").exists()
