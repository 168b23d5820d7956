"""The embedded SmolLM2: all seven projection types wrapped, trained with HF Trainer; only adapters move."""
import pytest
import torch

from rosa_peft import RosaConfig, get_rosa_model

pytestmark = pytest.mark.slow


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=24, vocab=49152):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(100, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_trainer_updates_only_adapter_parameters(smollm2, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, _ = smollm2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rosa = get_rosa_model(model, RosaConfig(r=4, density=0.002, lora_dropout=0.05, target_modules="all-linear"))
    names = {n.split(".")[-1] for n, _ in rosa.rosa_layers()}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    g = torch.Generator().manual_seed(0)
    rosa.set_masks({n: torch.rand(l.out_features, l.in_features, generator=g) < 0.002 for n, l in rosa.rosa_layers()})
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in rosa.rosa_layers()}
    adapters_before = {n: p.detach().clone() for n, p in rosa.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                             save_strategy="no", report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True)
    Trainer(model=rosa, args=args, train_dataset=_Tokens()).train()
    changed = {n for n, p in rosa.named_parameters() if p.requires_grad and not torch.equal(p, adapters_before[n])}
    assert any(".lora_B." in n for n in changed) and any(".rosa_spa." in n for n in changed), sorted(changed)[:5]
    plain = rosa.unload()
    for n, p in plain.named_parameters():
        assert torch.equal(p, before[n]), f"base parameter {n} changed"
    for n, w in w0.items():
        assert torch.equal(plain.get_submodule(n).weight, w)
