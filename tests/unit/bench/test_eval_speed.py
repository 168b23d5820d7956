"""The eval-speed benchmark row: fields and consistency (no timed assertions)."""
import pytest
import torch

from conftest import peaked_tiny_llama


def test_run_eval_speed_returns_the_row(data_dir, smol_tokenizer, one_thread):
    from rosa_peft.bench.eval_speed import run_eval_speed

    model = peaked_tiny_llama(len(smol_tokenizer), seed=3)
    row = run_eval_speed(task="viggo", data_dir=str(data_dir), n_prompts=5, max_new_tokens=6, batch_size=2,
                         model=model, tokenizer=smol_tokenizer, num_threads=1, repeats=1)
    for key in ("rosa_tokens_per_s", "plain_tokens_per_s", "ratio", "rosa_s", "plain_s", "outputs_match",
                "s_per_example", "projected_split_s", "split_size", "num_threads", "dtype"):
        assert key in row, key
    assert row["task"] == "viggo" and row["split"] == "validation" and row["n_prompts"] == 5
    assert row["split_size"] == 714 and row["num_threads"] == 1 and row["dtype"] == "float32"
    assert 0 < row["rosa_tokens"] <= 5 * 6 and row["plain_tokens"] > 0
    assert row["outputs_match"] is True
    assert row["ratio"] > 0 and row["projected_split_s"] > 0
    twice = run_eval_speed(task="viggo", data_dir=str(data_dir), n_prompts=5, max_new_tokens=6, batch_size=2,
                           model=model, tokenizer=smol_tokenizer, num_threads=1)  # default: 2 alternating runs
    assert twice["repeats"] == 2 and twice["rosa_tokens"] == 2 * row["rosa_tokens"] and twice["outputs_match"]


def test_run_eval_speed_rejects_bad_arguments(data_dir):
    from rosa_peft.bench.eval_speed import run_eval_speed

    with pytest.raises(ValueError, match="batch_size"):
        run_eval_speed(data_dir=str(data_dir), batch_size=0)
    with pytest.raises(ValueError, match="repeats"):
        run_eval_speed(data_dir=str(data_dir), repeats=0)
    with pytest.raises(ValueError, match="tokenizer"):
        run_eval_speed(data_dir=str(data_dir), n_prompts=1, model=torch.nn.Linear(1, 1))
