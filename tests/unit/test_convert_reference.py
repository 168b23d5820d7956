"""`rosa convert-reference`: both directions through the CLI, and its input errors as one line with exit 2."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from conftest import make_tiny_llama
from rosa_peft import RosaConfig, RosaModel, compute_masks, get_rosa_model
from rosa_peft.cli import main


def _saved_adapter(path):
    torch.manual_seed(0)
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.05, init_lora_weights=False,
                                                         target_modules=["q_proj", "up_proj"]))
    model.set_masks(compute_masks(model, None, criterion="random", seed=0, progress=False))
    with torch.no_grad():
        for _, layer in model.rosa_layers():
            layer.rosa_spa["default"].values.normal_(0, 0.1)
    model.save_pretrained(str(path))
    return model.eval()


def test_both_directions_round_trip_through_the_cli(tmp_path, capsys):
    model = _saved_adapter(tmp_path / "ours")
    ref, back = tmp_path / "ref", tmp_path / "back"
    assert main(["convert-reference", str(tmp_path / "ours"), str(ref), "--to", "reference", "--write-masks",
                 "--rosa-dtype", "fp32"]) == 0
    assert sorted(os.listdir(ref)) == ["adapter_config.json", "adapter_model.safetensors", "masks.pt"]
    assert main(["convert-reference", str(ref), str(back), "--masks", str(ref / "masks.pt")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {ref}: 4 layers, r=2, d=0.05, rosa_dtype=fp32" in out and f"wrote {back}: 4 layers" in out
    loaded = RosaModel.from_pretrained(make_tiny_llama(), str(back))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_input_errors_are_one_line_and_exit_2(tmp_path, capsys):
    _saved_adapter(tmp_path / "ours")
    (tmp_path / "taken").mkdir()
    cases = [
        (["convert-reference", str(tmp_path / "ours"), str(tmp_path / "taken"), "--to", "reference"], "--overwrite"),
        (["convert-reference", str(tmp_path / "ours"), str(tmp_path / "x"), "--to", "reference", "--masks", "m.pt"],
         "--masks applies to --to rosa only"),
        (["convert-reference", str(tmp_path / "ours"), str(tmp_path / "x")], "a rosa-peft adapter (it has 'density'"),
        (["convert-reference", str(tmp_path / "nothing"), str(tmp_path / "x")], "does not exist"),
    ]
    big = tmp_path / "big"
    RosaConfig(r=2, density=0.001, target_modules=["model.big"]).save_pretrained(str(big))
    save_file({"model.big.lora_A.weight": torch.zeros(2, 40000), "model.big.lora_B.weight": torch.zeros(8, 2)},
              str(big / "adapter_model.safetensors"))
    cases.append((["convert-reference", str(big), str(tmp_path / "x"), "--to", "reference"],
                  "layer 'model.big': its 40000 columns do not fit the reference's int16 indices"))
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("rosa convert-reference: error: ") and err.count("\n") == 1, err
        assert needle in err, (needle, err)
    assert not (tmp_path / "x").exists() and os.listdir(tmp_path / "taken") == []
