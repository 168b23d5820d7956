"""RosaTrainer: HF ``Trainer`` running the whole RoSA schedule in one process.

``train()`` = [warm-up: LoRA-only steps on the full run's LR schedule] -> [masks: gradient scoring on
the micro-batches that follow the warm-up, top-k] -> [restart: fresh LoRA init from the seed, a new
optimizer and LR schedule, LoRA + sparse from step 0]. Checkpoints hold the adapter (safetensors +
json), the masks and the schedule position, so ``train(resume_from_checkpoint=...)`` picks up the
masks and continues the restarted run exactly.

The warm-up is checkpointed too when the run saves (``save_strategy``), apart from the main run's
checkpoints, in ``<output_dir>/warmup/checkpoint-N`` (LoRA weights, optimizer, LR schedule, RNG state;
``get_last_checkpoint(output_dir)`` does not see them). Once the masks are chosen they are written to
``<output_dir>/warmup/masks.safetensors`` and the warm-up checkpoints are deleted; the whole ``warmup``
folder goes when the main run saves its first checkpoint. ``train(resume_from_checkpoint=True)`` on a run
killed before that continues the warm-up where it stopped (or takes the saved masks) and reaches the
same masks and weights as an uninterrupted run.

Divergence stops the run where it happens: a NaN/inf loss (checked on every micro-batch, before the
Trainer's ``logging_nan_inf_filter`` could replace it by the running mean) or gradient norm (checked
after accumulation, before the optimizer step) raises :class:`NonFiniteLossError` naming the optimizer
step (1-based, as ``metrics.jsonl`` counts) and the phase; no checkpoint of that step is written. A loss
stuck at the uniform-prediction level (>= 0.98·ln(vocab size)) with a zero gradient norm for
``DEAD_LOGS`` logged steps in a row is a dead model: warned once. Under DDP the failing rank raises and
the launcher (``torchrun``) stops the others.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import Iterator, Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import SaveStrategy, get_last_checkpoint, set_seed

from ..labelled_loss import sequence_mean_nll
from ..masks import compute_masks, load_masks, save_masks
from ..model import RosaModel
from ..utils.checks import UserError
from ..utils.io import atomic_write_text
from .optim import build_optimizer
from .recipes import LOSS_AVERAGES
from .schedule import ScheduleConfig, init_adapter_weights

log = logging.getLogger("rosa_peft.train")

MASKS_FILE = "masks.safetensors"
SCHEDULE_FILE = "rosa_schedule.json"
WARMUP_DIR = "warmup"  # under the Trainer's output_dir: the warm-up's checkpoints, then the masks it led to


def warmup_resume_point(output_dir: str) -> Optional[str]:
    """What a RoSA run killed before its first main-run checkpoint continues from: the masks file the
    finished warm-up and scoring left (``<output_dir>/warmup/masks.safetensors``), else the warm-up's last
    ``checkpoint-N``; None if there is neither."""
    d = os.path.join(output_dir, WARMUP_DIR)
    if not os.path.isdir(d):
        return None
    if os.path.isfile(os.path.join(d, MASKS_FILE)):
        return os.path.join(d, MASKS_FILE)
    return get_last_checkpoint(d)


def checkpoint_step(ckpt: str) -> int:
    """N of a ``checkpoint-N`` folder."""
    return int(os.path.basename(os.path.normpath(ckpt)).rsplit("-", 1)[1])


def is_warmup_checkpoint(path: str) -> bool:
    """A checkpoint folder the warm-up wrote (its schedule file says phase ``warmup``), or a warm-up masks file."""
    if os.path.isfile(path):
        return os.path.basename(os.path.dirname(os.path.abspath(path))) == WARMUP_DIR
    try:
        with open(os.path.join(path, SCHEDULE_FILE), encoding="utf-8") as fh:
            return json.load(fh).get("phase") == "warmup"
    except (OSError, ValueError, AttributeError):
        return False


DEAD_LOGS = 3  # logged steps in a row at loss >= DEAD_LOSS_FRACTION·ln|V| with grad_norm 0 before the warning
DEAD_LOSS_FRACTION = 0.98


def _install_mask_file(model: RosaModel, path: str, seed: Optional[int] = None) -> dict:
    """Install the masks saved in ``path`` (and, with ``seed``, the restart's fresh LoRA init); returns them.
    A mask that does not fit this model is a UserError naming the file."""
    masks = load_masks(path)
    try:
        model.set_masks(masks)
    except UserError as exc:
        raise UserError(f"masks file {path!r}: {exc}") from None
    if seed is not None:
        init_adapter_weights(model, seed)
    return masks


class NonFiniteLossError(UserError):
    """Training hit a NaN/inf loss or gradient norm; ``step`` is the optimizer step (1-based) it happened in.

    A :class:`~rosa_peft.utils.checks.UserError` (so a ``ValueError``): the fix is the user's (a lower
    learning rate, other data), and ``rosa train`` reports it as one line."""

    def __init__(self, what: str, value: float, step: int, phase: Optional[str] = None):
        self.what, self.value, self.step, self.phase = what, value, step, phase
        where = f" ({phase} phase)" if phase else ""
        super().__init__(f"non-finite {what} ({_fmt(value)}) at step {step}{where}; training stopped")


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _as_float(value) -> Optional[float]:
    if value is None:
        return None
    if torch.is_tensor(value):
        return float(value.detach().float().reshape(-1)[0]) if value.numel() == 1 else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _vocab_size(model) -> Optional[int]:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 1 else None


class _DivergenceCallback(TrainerCallback):
    """Second line behind the per-step checks (a logged NaN/inf from any path stops the run before that
    step's checkpoint is saved) and the dead-model warning."""

    def __init__(self, trainer: "RosaTrainer"):
        self.trainer = trainer
        self.dead_logs = 0
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return control
        loss, norm = _as_float(logs.get("loss")), _as_float(logs.get("grad_norm"))
        for what, value in (("loss", loss), ("gradient norm", norm)):
            if value is not None and not math.isfinite(value):
                raise NonFiniteLossError(what, value, state.global_step, self.trainer.phase)
        vocab = _vocab_size(self.trainer.model)
        if loss is None or norm is None or vocab is None:
            return control
        if loss >= DEAD_LOSS_FRACTION * math.log(vocab) and norm == 0.0:
            self.dead_logs += 1
        else:
            self.dead_logs = 0
        if self.dead_logs >= DEAD_LOGS and not self.warned:
            self.warned = True
            log.warning("training looks diverged to a dead model: loss %.4f >= %.2f·ln(vocab size %d) = %.4f with "
                        "gradient norm 0 for %d logged steps in a row (step %d%s); lower the learning rate",
                        loss, DEAD_LOSS_FRACTION, vocab, DEAD_LOSS_FRACTION * math.log(vocab), self.dead_logs,
                        state.global_step, f", {self.trainer.phase} phase" if self.trainer.phase else "")
        return control


class _PhaseCallback(TrainerCallback):
    """Deletes the warm-up's folder once the main run has a checkpoint of its own (which holds the masks)."""

    def __init__(self, trainer: "RosaTrainer"):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.phase == "train" and state.is_world_process_zero:
            shutil.rmtree(os.path.join(args.output_dir, WARMUP_DIR), ignore_errors=True)
        return control


class RosaTrainer(Trainer):
    """``loss_average="sequence"``: the loss of each optimizer step is the mean over its sequences of each
    sequence's mean next-token NLL (the reference's, which trains micro-batches of one sequence); the
    default ``"token"`` is transformers' mean over every labelled token of the accumulated batch. In
    sequence mode each micro-batch returns the mean over its own sequences and the Trainer divides by
    the number of micro-batches accumulated, so the step's loss is exactly the per-sequence mean when
    the micro-batches of a step hold equally many sequences (always at ``per_device_train_batch_size``
    1; otherwise all but an epoch's last, shorter micro-batch); DDP averages it over processes."""

    def __init__(self, *args, schedule: Optional[ScheduleConfig] = None, lora_lr: Optional[float] = None,
                 phase_listener=None, loss_average: str = "token", **kwargs):
        if loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average must be one of {', '.join(LOSS_AVERAGES)}, got {loss_average!r}")
        super().__init__(*args, **kwargs)
        self.loss_average = loss_average
        if loss_average == "sequence":
            if self.compute_loss_func is not None or self.label_smoother is not None:
                raise ValueError("loss_average='sequence' cannot be combined with compute_loss_func or label "
                                 "smoothing (they define the loss themselves)")
            if not self._default_loss_after_us():
                raise ValueError(f"loss_average='sequence' needs transformers.Trainer's compute_loss after "
                                 f"RosaTrainer's; {type(self).__name__} computes its own loss")
            # the model is not given num_items_in_batch, and the Trainer divides each micro-batch's loss by
            # the accumulation steps (transformers 4.46+ and 5 both decide that from this attribute)
            self.model_accepts_loss_kwargs = False
        if schedule is None:
            has_density = isinstance(self.model, RosaModel) and self.model.peft_config[self.model.active_adapter].density > 0
            schedule = ScheduleConfig(mode="rosa" if has_density else "lora_only", seed=self.args.seed)
        self.schedule = schedule
        self.lora_lr = lora_lr
        self.phase: Optional[str] = None
        self.phase_listener = phase_listener
        self._scheduler_total_steps: Optional[int] = None
        self.add_callback(_PhaseCallback(self))
        self.add_callback(_DivergenceCallback(self))

    # ---- divergence --------------------------------------------------------------------------------
    def _check_finite(self, what: str, value) -> None:
        x = _as_float(value)
        if x is not None and not math.isfinite(x):
            raise NonFiniteLossError(what, x, self.state.global_step + 1, self.phase)

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        self._check_finite("loss", loss)  # before the Trainer's nan/inf filter can hide it
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss, with the output head run only at labelled positions (``RosaModel(loss_only=True)``:
        the same value, without the full-vocabulary logits). Not when the outputs are wanted, with a custom
        loss (``compute_loss_func``, label smoothing) or under a trainer class that computes its own loss
        (e.g. TRL's, composed through ``rosa_trainer_class``). With ``loss_average="sequence"`` the
        micro-batch's per-sequence mean (see the class)."""
        if self.loss_average == "sequence" and "labels" in inputs:
            return self._sequence_mean_loss(model, inputs, return_outputs)
        if (not return_outputs and self.compute_loss_func is None and self.label_smoother is None
                and "labels" in inputs and isinstance(self.accelerator.unwrap_model(model), RosaModel)
                and self._default_loss_after_us()):
            inputs = {**inputs, "loss_only": True}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _sequence_mean_loss(self, model, inputs, return_outputs: bool):
        if not return_outputs and isinstance(self.accelerator.unwrap_model(model), RosaModel):
            return model(**inputs, loss_only=True, loss_reduction="sequence").loss
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})  # full fine-tuning, or logits wanted
        loss = sequence_mean_nll(outputs.logits, inputs["labels"])
        return (loss, outputs) if return_outputs else loss

    def _default_loss_after_us(self) -> bool:
        """The next ``compute_loss`` in this class's MRO after RosaTrainer's is transformers.Trainer's."""
        mro = type(self).__mro__
        for cls in mro[mro.index(RosaTrainer) + 1:]:
            if "compute_loss" in vars(cls):
                return cls is Trainer
        return False

    def _get_grad_norm(self, model, *args, **kwargs):
        # transformers >= 5: the pre-clip norm of the accumulated gradients, just before the optimizer step.
        # Private on purpose: no callback sees the norm before the step (on_pre_optimizer_step gets no value,
        # on_log comes after the step), and recomputing it in a callback would cost a second pass over the grads.
        norm = super()._get_grad_norm(model, *args, **kwargs)
        self._check_finite("gradient norm", norm)
        return norm

    # ---- optimizer / LR schedule ----------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_optimizer(model or self.model, self.args.learning_rate, self.lora_lr,
                                             self.args.weight_decay, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                             eps=self.args.adam_epsilon)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # the warm-up phase runs on the full run's schedule, so its steps match the restarted run's
        return super().create_scheduler(self._scheduler_total_steps or num_training_steps, optimizer)

    def log(self, logs: dict, *args, **kwargs) -> None:
        # tag the record before any callback (user ones are registered first) or logger sees it
        if self.phase is not None:
            logs["phase"] = self.phase
        super().log(logs, *args, **kwargs)

    # ---- the schedule ----------------------------------------------------------------------------
    def _enter_phase(self, phase: str, **info) -> None:
        self.phase = phase
        msg = f"RoSA schedule: phase -> {phase}" + "".join(f", {k}={v}" for k, v in info.items())
        log.info(msg)
        if self.phase_listener is not None:
            self.phase_listener(phase, info)

    def full_run_steps(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        n_batches = len(self.get_train_dataloader())
        accum = self.args.gradient_accumulation_steps
        per_epoch = max(n_batches // accum + int(n_batches % accum > 0), 1)
        return int(math.ceil(self.args.num_train_epochs * per_epoch))

    def _micro_batches(self, skip: int, take: int) -> Iterator[dict]:
        """``take`` micro-batches in training order after skipping ``skip`` (cycling epochs if needed)."""
        device = next(p.device for p in self.model.parameters())
        seen = 0
        while True:
            produced = False
            for batch in self.get_train_dataloader():
                produced = True
                if seen >= skip:
                    yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                seen += 1
                if seen >= skip + take:
                    return
            if not produced:
                raise UserError("the training dataset is empty")

    def obtain_masks(self, resume_warmup: Optional[str] = None) -> dict:
        """Run the pre-training part of the schedule and install the masks; returns them. ``resume_warmup``:
        a warm-up checkpoint to continue the warm-up from, or the masks file a finished warm-up left."""

        model: RosaModel = self.model
        sched = self.schedule
        warmup_dir = os.path.join(self.args.output_dir, WARMUP_DIR)
        if sched.mode == "masks_file":
            self._enter_phase("masks", source=sched.masks_path)
            return _install_mask_file(model, sched.masks_path, sched.seed)
        if resume_warmup is not None and os.path.isfile(resume_warmup):
            self._enter_phase("masks", source=resume_warmup)
            return _install_mask_file(model, resume_warmup, sched.seed)
        init_adapter_weights(model, sched.seed)
        finished = resume_warmup is not None and checkpoint_step(resume_warmup) >= sched.warmup_steps
        if sched.warmup_steps > 0 and finished:
            # the warm-up had finished (killed while scoring): its weights are all the scoring needs, and
            # Trainer.train from a checkpoint at max_steps would still take one more step
            self._enter_phase("warmup", steps=sched.warmup_steps, resumed_from=resume_warmup)
            self._load_from_checkpoint(resume_warmup)
        elif sched.warmup_steps > 0:
            self._run_warmup(warmup_dir, resume_warmup)
        accum = self.args.gradient_accumulation_steps
        n = sched.mask_grad_steps * accum
        self._enter_phase("masks", criterion=sched.mask_criterion, micro_batches=n, budget=sched.mask_budget)
        batches = list(self._micro_batches(sched.warmup_steps * accum, n))
        masks = compute_masks(model, batches, criterion=sched.mask_criterion, budget=sched.mask_budget,
                              seed=sched.seed, progress=not self.args.disable_tqdm)
        if self.args.save_strategy != SaveStrategy.NO and self.args.should_save:
            # the warm-up's only product: a run killed before its first checkpoint resumes from here
            os.makedirs(warmup_dir, exist_ok=True)
            save_masks(masks, os.path.join(warmup_dir, MASKS_FILE))
            for name in os.listdir(warmup_dir):
                if name.startswith("checkpoint-"):
                    shutil.rmtree(os.path.join(warmup_dir, name), ignore_errors=True)
        model.set_masks(masks)
        init_adapter_weights(model, sched.seed)  # the restart: a fresh LoRA init from the same seed
        return masks

    def _run_warmup(self, warmup_dir: str, resume_from: Optional[str]) -> None:
        """The warm-up: a Trainer.train() of its own, cut short, checkpointing into ``warmup_dir``.
        args.max_steps and args.output_dir are the only public ways to set its length and where its
        checkpoints go (create_scheduler keeps the full run's LR schedule meanwhile)."""
        sched = self.schedule
        total = self.full_run_steps()
        self._enter_phase("warmup", steps=sched.warmup_steps, lr_schedule_steps=total,
                          **({"resumed_from": resume_from} if resume_from else {}))
        saved = self.args.max_steps, self.args.output_dir
        self.args.max_steps, self.args.output_dir = sched.warmup_steps, warmup_dir
        self._scheduler_total_steps = total
        try:
            set_seed(self.args.seed)
            super().train(resume_from_checkpoint=resume_from)
        finally:
            self.args.max_steps, self.args.output_dir = saved
            self._scheduler_total_steps = None
            self.optimizer = None
            self.lr_scheduler = None
            self._drop_wrappers()

    def _drop_wrappers(self) -> None:
        """Forget the warm-up's DDP wrapper and the accelerator's references to it: it was built over the
        LoRA parameters only, so the restarted run (which adds the sparse values) must be wrapped afresh."""
        self.model_wrapped = self.model
        self.accelerator.free_memory()

    def train(self, resume_from_checkpoint=None, **kwargs):
        """Trainer.train over the whole schedule. ``resume_from_checkpoint``: a main-run checkpoint, a warm-up
        checkpoint (``<output_dir>/warmup/checkpoint-N``), or True for the newest of the main run's, else
        what the warm-up left (see the module)."""
        ckpt, warm = resume_from_checkpoint, None
        if isinstance(ckpt, bool):
            ckpt = get_last_checkpoint(self.args.output_dir) if ckpt else None
            if resume_from_checkpoint and ckpt is None:
                warm = warmup_resume_point(self.args.output_dir)
                if warm is None:
                    raise UserError(f"no checkpoint found in {self.args.output_dir}")
        elif ckpt is not None and is_warmup_checkpoint(os.fspath(ckpt)):
            ckpt, warm = None, os.fspath(ckpt)
        model = self.model
        if isinstance(model, RosaModel) and self.schedule.needs_masks and not model.get_masks():
            if ckpt and os.path.isfile(os.path.join(ckpt, MASKS_FILE)):

                self._enter_phase("masks", source=os.path.join(ckpt, MASKS_FILE))
                _install_mask_file(model, os.path.join(ckpt, MASKS_FILE))
            else:
                self.obtain_masks(resume_warmup=warm)
        self._enter_phase("train", steps=self.full_run_steps(), resumed_from=ckpt or "-")
        set_seed(self.args.seed)
        return super().train(resume_from_checkpoint=ckpt, **kwargs)

    # ---- checkpoints -----------------------------------------------------------------------------
    # Two private overrides stay: Trainer has no public hook for "how the model's files are written / read".
    # _save is the narrow one (called by the public save_model after its backend-specific state gathering,
    # and followed there by the optional hub push); overriding save_model instead would mean re-implementing
    # that push. A TrainerCallback.on_save runs after the default _save has already written the full base
    # model's state dict (RosaModel is not a PreTrainedModel), so it cannot replace it.
    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        if not isinstance(self.model, RosaModel):
            return super()._save(output_dir, state_dict)

        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir)
        masks = self.model.get_masks()
        if masks:
            save_masks(masks, os.path.join(output_dir, MASKS_FILE))
        atomic_write_text(os.path.join(output_dir, SCHEDULE_FILE),
                          json.dumps({"phase": self.phase, **self.schedule.to_dict()}, indent=2) + "\n")
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        # Trainer.train calls this unconditionally when resuming; its default knows only PreTrainedModel state
        # dicts and PeftModel adapters and raises "Can't find a valid checkpoint" for ours. Loading the adapter
        # in train() before super().train() would not stop that call, so the override stays.
        if not isinstance(self.model, RosaModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.model.load_adapter_weights(resume_from_checkpoint)
