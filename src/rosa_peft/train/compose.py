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

import contextlib
import functools
import sys

from transformers import Trainer

from ..layer import RosaLayer
from ..model import RosaModel
from ..utils.checks import UserError
from .trainer import RosaTrainer


def _is_peft_or_rosa(original):
    from accelerate.utils import extract_model_from_parallel

    def is_peft_model(model) -> bool:
        return bool(original(model)) or isinstance(extract_model_from_parallel(model), RosaModel)

    is_peft_model._rosa_original = original
    return is_peft_model


@contextlib.contextmanager
def _treated_like_peft(base: type):
    """While ``base``'s ``__init__`` runs, its modules' ``is_peft_model`` also answers True for a RosaModel.

    TRL (and trainers built like it) decide with accelerate's ``is_peft_model`` which module to patch: a
    PeftModel's fused or chunked LM-head loss goes on ``get_base_model()`` (the causal LM inside, whose
    ``base_model`` is the decoder), other models get it on themselves. A RosaModel is a PeftModel-shaped
    wrapper, so it needs the PeftModel branch; on itself the patch would run the whole causal LM where it
    expects the decoder. The same answer gives a RosaModel TRL's other PEFT handling (input gradients
    under gradient checkpointing, no second adapter through ``peft_config``). The module globals are
    restored on exit, so construct trainers from one thread at a time."""
    swapped = {}
    for cls in base.__mro__:
        module = sys.modules.get(cls.__module__)
        original = getattr(module, "is_peft_model", None)
        if module is None or module in swapped or not callable(original) or hasattr(original, "_rosa_original"):
            continue
        swapped[module] = original
        module.is_peft_model = _is_peft_or_rosa(original)
    try:
        yield
    finally:
        for module, original in swapped.items():
            module.is_peft_model = original


def _check_head_not_adapted(model) -> None:
    """A loss patched onto the causal LM multiplies by ``lm_head.weight`` itself: an adapter there would be
    skipped in the forward and never trained, so refuse it before training starts."""
    if not isinstance(model, RosaModel):
        return
    inner = model.get_base_model()
    if "forward" in vars(inner) and isinstance(inner.get_output_embeddings(), RosaLayer):
        raise UserError("this trainer computes the loss from lm_head.weight directly, so a RoSA adapter on "
                        "lm_head would never be trained: leave lm_head out of target_modules")


@functools.lru_cache(maxsize=None)
def rosa_trainer_class(base: type) -> type:
    """A subclass of ``base`` (a ``transformers.Trainer`` subclass) that runs the RoSA schedule.

    ``rosa_trainer_class(trl.SFTTrainer)(model=rosa_model, args=SFTConfig(...),
    train_dataset=..., processing_class=tokenizer, schedule=ScheduleConfig(warmup_steps=64))`` takes
    ``base``'s arguments plus RosaTrainer's (``schedule``, ``lora_lr``, ``phase_listener``); ``.train()``
    runs warm-up -> masks -> restart -> LoRA + sparse training, and ``save_model`` writes the adapter
    (safetensors + JSON) and the masks. The same class object comes back for the same ``base``."""
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise UserError(f"rosa_trainer_class needs a transformers.Trainer subclass, got {base!r}")
    if issubclass(base, RosaTrainer):
        return base

    def __init__(self, *args, **kwargs):
        with _treated_like_peft(base):
            RosaTrainer.__init__(self, *args, **kwargs)  # the next class in the MRO; it calls base's via super()
        _check_head_not_adapted(self.model)

    doc = f"RosaTrainer's schedule (warm-up -> masks -> restart) on top of {base.__module__}.{base.__qualname__}."
    return type(f"Rosa{base.__name__}", (RosaTrainer, base), {"__module__": __name__, "__doc__": doc,
                                                             "__init__": __init__})
