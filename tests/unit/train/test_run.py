"""train.run's model building: --attn-implementation reaches transformers' from_pretrained; a value it does not
know is one line naming the option (exit 2)."""
import pytest
import torch

from conftest import run_rosa, save_tiny_base
from rosa_peft.train.run import TrainOptions, _build_model


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("attn_base")
    save_tiny_base(root / "base", smol_tokenizer)
    return root / "base"


@pytest.mark.parametrize("impl, expected", [(None, "sdpa"), ("eager", "eager"), ("sdpa", "sdpa")])
def test_attn_implementation_reaches_the_base_model(tiny_base, impl, expected):
    opts = TrainOptions(model=str(tiny_base), task="sql-synth", method="rosa", r=2, density=0.05,
                        attn_implementation=impl)
    model, _, _, _ = _build_model(opts)
    assert model.model.config._attn_implementation == expected
    ids = torch.randint(0, 100, (2, 6))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_unknown_attn_implementation_is_one_line(tmp_path):
    rc, _, err = run_rosa("train", "--task", "sql-synth", "--attn-implementation", "fastest",
                          "--output-dir", tmp_path / "run")
    assert rc == 2 and "fastest" in err and "attn" in err
    assert not (tmp_path / "run").exists()
