"""rosa_trainer_class puts RosaTrainer's schedule in front of another Trainer subclass: that class's own
overrides still run (in the warm-up and in the restarted run), the schedule runs as in RosaTrainer, and
what is not a Trainer class is refused with one line."""
import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import make_tiny_llama
from rosa_peft import RosaConfig, get_rosa_model
from rosa_peft.train import RosaTrainer, ScheduleConfig, rosa_trainer_class
from rosa_peft.utils.checks import UserError


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=10):
        self.ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class CountingTrainer(Trainer):
    """A user's Trainer subclass: counts its compute_loss calls and takes an extra keyword."""

    def __init__(self, *args, tag=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag, self.calls = tag, 0

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.calls += 1
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_the_class_is_a_subclass_of_both_and_cached():
    cls = rosa_trainer_class(CountingTrainer)
    assert cls.__name__ == "RosaCountingTrainer" and issubclass(cls, RosaTrainer) and issubclass(cls, CountingTrainer)
    assert cls.__mro__[1:3] == (RosaTrainer, CountingTrainer)
    assert rosa_trainer_class(CountingTrainer) is cls
    assert rosa_trainer_class(RosaTrainer) is RosaTrainer


@pytest.mark.parametrize("bad", [object, int, "SFTTrainer", torch.nn.Module])
def test_not_a_trainer_class_is_refused(bad):
    with pytest.raises(UserError, match="transformers.Trainer subclass"):
        rosa_trainer_class(bad)


def test_runs_the_schedule_and_the_base_classes_overrides(tmp_path, one_thread):
    model = get_rosa_model(make_tiny_llama(), RosaConfig(r=2, density=0.05, lora_dropout=0.0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-3,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False)
    phases = []
    trainer = rosa_trainer_class(CountingTrainer)(
        model=model, args=args, train_dataset=_Data(), tag="mine", schedule=ScheduleConfig(warmup_steps=2, seed=7),
        phase_listener=lambda phase, info: phases.append(phase))
    assert trainer.tag == "mine"
    result = trainer.train()
    assert phases == ["warmup", "masks", "train"] and result.global_step == 3
    assert trainer.calls == 2 + 3  # the warm-up's steps and the restarted run's, through the base class
    masks = model.get_masks()
    assert masks and all(int(m.sum()) == int(0.05 * m.numel()) for m in masks.values())
