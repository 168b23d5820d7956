"""Batched greedy generation: batch-size invariance (left padding), stop strings, RosaModel vs merged."""
import copy

import pytest
import torch

from conftest import peaked_tiny_llama, save_tiny_base, with_random_adapter  # noqa: F401
from rosa_peft.eval.generate import _StopOnStrings, generate, truncate_at_stop

PROMPTS = [
    "Question: What is 2 + 3?\nAnswer:",
    "The capital of France is",
    "Write a SQL query to answer the question based on the table schema.\n\n context: CREATE TABLE t (a VARCHAR)"
    "\n\n question: What is a?\n\n answer: ",
    "Once upon a time, in a small village far away, there lived",
    "List three colors:",
]


@pytest.mark.slow
def test_greedy_outputs_identical_for_batch_size_1_and_8_on_smollm2(smollm2):
    model, tokenizer = smollm2
    one = generate(model, tokenizer, PROMPTS, batch_size=1, max_new_tokens=6)
    eight = generate(model, tokenizer, PROMPTS, batch_size=8, max_new_tokens=6)
    assert one == eight
    assert all(isinstance(t, str) and t for t in one)
    assert generate(model, tokenizer, PROMPTS[::-1], batch_size=3, max_new_tokens=6) == one[::-1]


def test_rosa_model_unmerged_merged_and_batch_sizes_agree(smol_tokenizer):
    base = peaked_tiny_llama(len(smol_tokenizer))
    plain = generate(base, smol_tokenizer, PROMPTS, batch_size=2, max_new_tokens=5)
    rosa = with_random_adapter(copy.deepcopy(base))
    unmerged = [generate(rosa, smol_tokenizer, PROMPTS, batch_size=b, max_new_tokens=5) for b in (1, 8)]
    assert unmerged[0] == unmerged[1]
    merged = rosa.merge_and_unload()
    assert generate(merged, smol_tokenizer, PROMPTS, batch_size=4, max_new_tokens=5) == unmerged[0]
    assert plain != unmerged[0]  # the adapter changes what the model says


def test_max_new_tokens_bound_and_stop_strings(smol_tokenizer):
    model = peaked_tiny_llama(len(smol_tokenizer), seed=1)
    free = generate(model, smol_tokenizer, PROMPTS, batch_size=8, max_new_tokens=7)
    assert sum(bool(t) for t in free) >= 3
    for text in free:
        assert len(smol_tokenizer(text, add_special_tokens=False)["input_ids"]) <= 8  # re-tokenising may merge/split
    # stopping at the first character each continuation produces cuts it to ""
    firsts = sorted({t[0] for t in free if t})
    stopped = generate(model, smol_tokenizer, PROMPTS, batch_size=8, max_new_tokens=7, stop=firsts)
    assert all(not any(s in t for s in firsts) for t in stopped)
    assert all(s == "" for s, f in zip(stopped, free) if f)


def test_stop_criterion_marks_only_rows_that_produced_a_stop_string(smol_tokenizer):
    prompt = smol_tokenizer("abc", add_special_tokens=False)["input_ids"]
    rows = [prompt + smol_tokenizer(" one\ntwo", add_special_tokens=False)["input_ids"],
            prompt + smol_tokenizer(" one two", add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [smol_tokenizer.eos_token_id] * (width - len(r)) for r in rows])
    done = _StopOnStrings(smol_tokenizer, ["\n"], len(prompt))(ids, None)
    assert done.tolist() == [True, False]
    assert truncate_at_stop("a: b\nQuestion: c", [":", "Question"]) == "a"
    assert truncate_at_stop("abc", []) == "abc"


def test_generate_rejects_bad_arguments(smol_tokenizer):
    model = peaked_tiny_llama(len(smol_tokenizer))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        generate(model, smol_tokenizer, ["x"], batch_size=0)
    with pytest.raises(ValueError, match="prompt 1 encodes to no tokens"):
        generate(model, smol_tokenizer, ["x", ""], add_special_tokens=False)
    assert generate(model, smol_tokenizer, []) == []


def reference_generate(model, tokenizer, prompts, batch_size, max_new_tokens, stop):
    """The straightforward reference: plain left-padded ``model.generate`` per batch, then cut at ``stop``."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id)
        new = ids[:, batch["input_ids"].shape[1]:]
        out += [truncate_at_stop(tokenizer.decode(r, skip_special_tokens=True), stop) for r in new]
    return out


def test_generate_matches_plain_generate_cut_at_stop_strings(smol_tokenizer, one_thread):
    model = peaked_tiny_llama(len(smol_tokenizer), seed=2)
    free = reference_generate(model, smol_tokenizer, PROMPTS, 8, 12, [])
    # stop strings taken from inside the free continuations, so that rows really stop early (at different steps)
    stops = [["\n"], [free[0][3:5]] if len(free[0]) > 5 else ["x"], sorted({t[len(t) // 2] for t in free if t}), []]
    for stop in stops:
        expected = reference_generate(model, smol_tokenizer, PROMPTS, 1, 12, stop)
        for batch_size in (1, 2, 8):
            assert generate(model, smol_tokenizer, PROMPTS, batch_size=batch_size, max_new_tokens=12,
                            stop=stop) == expected, (stop, batch_size)
    assert generate(model, smol_tokenizer, PROMPTS, batch_size=3, max_new_tokens=12, stop=["\n"],
                    num_threads=1) == reference_generate(model, smol_tokenizer, PROMPTS, 3, 12, ["\n"])


def test_generate_with_counts_counts_generated_tokens(smol_tokenizer, one_thread):
    from rosa_peft.eval.generate import generate_with_counts

    model = peaked_tiny_llama(len(smol_tokenizer), seed=1)
    texts, counts = generate_with_counts(model, smol_tokenizer, PROMPTS, batch_size=2, max_new_tokens=6)
    assert texts == generate(model, smol_tokenizer, PROMPTS, batch_size=2, max_new_tokens=6)
    assert len(counts) == len(PROMPTS) and all(0 <= c <= 6 for c in counts) and max(counts) == 6


def test_stop_criterion_remembers_done_rows_and_skips_unchanged_text(smol_tokenizer):
    eos = smol_tokenizer.eos_token_id
    prompt = smol_tokenizer("abc", add_special_tokens=False)["input_ids"]
    a = smol_tokenizer(" one\n", add_special_tokens=False)["input_ids"]
    b = smol_tokenizer(" one two", add_special_tokens=False)["input_ids"]
    width = max(len(a), len(b))
    rows = [prompt + a + [7] * (width - len(a)), prompt + b + [eos] * (width - len(b))]
    crit = _StopOnStrings(smol_tokenizer, ["\n"], len(prompt))
    assert crit(torch.tensor(rows)).tolist() == [True, False]
    # one more step: the done row stays done; the finished row (EOS: text unchanged) stays not done
    assert crit(torch.tensor([rows[0] + [eos], rows[1] + [eos]])).tolist() == [True, False]
    assert _StopOnStrings(smol_tokenizer, [], len(prompt))(torch.tensor(rows)).tolist() == [False, False]


def test_torch_threads_sets_and_restores():
    from rosa_peft.eval.generate import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        with torch_threads(0):
            pass


def test_load_for_eval_merges_float_adapters_by_default(tmp_path, smol_tokenizer, one_thread):
    from rosa_peft.eval.loading import default_merge, load_for_eval, resolve_eval_dtype

    assert default_merge("run", None) and not default_merge("run", "nf4") and not default_merge(None, None)
    assert resolve_eval_dtype("float32", "cpu") == "float32"
    assert resolve_eval_dtype("auto", "cpu") in ("float32", "bfloat16")
    base = save_tiny_base(tmp_path / "base", smol_tokenizer)
    rosa = with_random_adapter(copy.deepcopy(base))
    rosa.save_pretrained(str(tmp_path / "adapter"))
    unmerged = generate(rosa, smol_tokenizer, PROMPTS, batch_size=4, max_new_tokens=5)
    model, tok, info = load_for_eval(str(tmp_path / "base"), str(tmp_path / "adapter"), device="cpu")
    assert info["merged"] is True and not hasattr(model, "rosa_layers")
    assert generate(model, tok, PROMPTS, batch_size=4, max_new_tokens=5) == unmerged
    model, tok, info = load_for_eval(str(tmp_path / "base"), str(tmp_path / "adapter"), device="cpu", merge=False)
    assert info["merged"] is False and hasattr(model, "rosa_layers")
    assert load_for_eval(str(tmp_path / "base"), device="cpu")[2]["merged"] is False
