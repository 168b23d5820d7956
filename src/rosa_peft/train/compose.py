"""rosa_trainer_class: RosaTrainer's whole schedule on top of another HF Trainer subclass (e.g. TRL's SFTTrainer).

The RoSA schedule restarts the run after the warm-up (fresh LoRA init, a new optimizer over LoRA + the
new sparse values, the LR schedule from step 0, a fresh DDP wrapper). A ``TrainerCallback`` cannot do
that from inside the training loop: the loop keeps its own step counters, the optimizer and scheduler
that accelerate prepared, and the DDP wrapper built over the warm-up's parameters. So instead of a
callback re-implementing the schedule, this puts :class:`~rosa_peft.train.RosaTrainer` in front of the
given class: RosaTrainer's overrides (``train``, the optimizer groups, the checkpoint files, the
divergence checks) run first and hand on to the other trainer's (``compute_loss``, ``log``, data
preparation) through ``super()``.
"""
from __future__ import annotations

import functools

from transformers import Trainer

from ..model import RosaModel
from ..utils.checks import UserError
from .trainer import RosaTrainer


def _check_compatible(args: tuple, kwargs: dict) -> None:
    """Reject what is known not to work with a RosaModel, before the base trainer touches the model."""
    model = kwargs.get("model", args[0] if args else None)
    train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
    if isinstance(model, RosaModel) and getattr(train_args, "loss_type", None) == "chunked_nll":
        raise UserError("loss_type='chunked_nll' (TRL's default) replaces the model's forward, which a RosaModel "
                        "does not support: pass loss_type='nll' in the SFTConfig")


@functools.lru_cache(maxsize=None)
def rosa_trainer_class(base: type) -> type:
    """A subclass of ``base`` (a ``transformers.Trainer`` subclass) that runs the RoSA schedule.

    ``rosa_trainer_class(trl.SFTTrainer)(model=rosa_model, args=SFTConfig(..., loss_type="nll"),
    train_dataset=..., processing_class=tokenizer, schedule=ScheduleConfig(warmup_steps=64))`` takes
    ``base``'s arguments plus RosaTrainer's (``schedule``, ``lora_lr``, ``phase_listener``); ``.train()``
    runs warm-up -> masks -> restart -> LoRA + sparse training, and ``save_model`` writes the adapter
    (safetensors + JSON) and the masks. The same class object comes back for the same ``base``."""
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise UserError(f"rosa_trainer_class needs a transformers.Trainer subclass, got {base!r}")
    if issubclass(base, RosaTrainer):
        return base

    def __init__(self, *args, **kwargs):
        _check_compatible(args, kwargs)
        RosaTrainer.__init__(self, *args, **kwargs)  # the next class in the MRO; it calls base's through super()

    doc = f"RosaTrainer's schedule (warm-up -> masks -> restart) on top of {base.__module__}.{base.__qualname__}."
    return type(f"Rosa{base.__name__}", (RosaTrainer, base), {"__module__": __name__, "__doc__": doc,
                                                             "__init__": __init__})
