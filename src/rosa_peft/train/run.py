"""One training run end to end (what `rosa train`, `rosa demo` and `rosa study` call).

Every input is checked before anything is written, so bad input never leaves a partial output
directory. The run directory then holds: the adapter (``adapter_config.json`` +
``adapter_model.safetensors``; for ``fft`` the full model), ``masks.safetensors``, ``run_config.json``
(the resolved options and results), ``metrics.jsonl`` and ``loss.png``.

Under ``torchrun`` (DDP) every rank trains; only rank 0 creates, writes and (on failure) removes the
output directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..io import atomic_write_text

log = logging.getLogger("rosa_peft.train")

METHODS = ("rosa", "lora", "spa", "fft")
# Defaults per method when neither --r/--density nor --budget is given (the paper's 80M-budget cells).
METHOD_DEFAULTS = {"rosa": (16, 0.006), "lora": (32, 0.0), "spa": (0, 0.012), "fft": (0, 0.0)}


@dataclass
class TrainOptions:
    model: Optional[str] = None  # None = the embedded SmolLM2-135M-Instruct
    task: str = "sql-synth"
    data_dir: Optional[str] = None
    train_split: Optional[str] = None
    limit: Optional[int] = None  # first N training examples
    prompt_field: str = "prompt"
    response_field: str = "response"
    method: str = "rosa"
    r: Optional[int] = None
    density: Optional[float] = None
    budget: Optional[int] = None
    rosa_lora_fraction: float = 0.5
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: object = "all-linear"
    impl: str = "auto"
    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 2e-4
    lora_lr: Optional[float] = 7e-4
    lr_warmup_steps: int = 20
    batch_size: int = 1
    grad_accum: int = 32
    max_seq_len: int = 512
    mask_criterion: str = "fisher"
    mask_budget: str = "per_layer"
    warmup_steps: int = 64  # LoRA-only steps before mask scoring
    mask_grad_steps: int = 1
    masks: Optional[str] = None  # load masks from this file instead of scoring
    output_dir: str = "runs/rosa"
    seed: int = 42
    dtype: str = "float32"
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 0
    resume: bool = False
    quantize: str = "none"
    quant_backend: str = "torchao"
    logging_steps: int = 1
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def resolved_rank_density(self, model) -> tuple[int, float]:
        from .budget import budget_units, resolve_budget

        if self.budget is not None:
            if self.r is not None or self.density is not None:
                raise ValueError("give either --budget or --r/--density, not both")
            per_rank, total = budget_units(model, self.target_modules)
            return resolve_budget(self.method, int(self.budget), per_rank, total, self.rosa_lora_fraction)
        r0, d0 = METHOD_DEFAULTS[self.method]
        r = self.r if self.r is not None else r0
        d = self.density if self.density is not None else d0
        if self.method == "lora":
            d = 0.0
        if self.method == "spa":
            r = 0
        if self.method in ("lora", "rosa") and r < 1:
            raise ValueError(f"--method {self.method} needs --r >= 1")
        if self.method in ("spa", "rosa") and not d > 0:
            raise ValueError(f"--method {self.method} needs --density > 0")
        return r, d


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a ``torchrun`` launch (which sets ``RANK``)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def validate(opts: TrainOptions):
    """Check every input that can be checked without the model; returns (task, train examples)."""
    from ..tasks import get_task

    if opts.method not in METHODS:
        raise ValueError(f"unknown method {opts.method!r}; choose one of {', '.join(METHODS)}")
    if opts.mask_criterion not in ("fisher", "grad", "magnitude", "random"):
        raise ValueError(f"unknown mask criterion {opts.mask_criterion!r}")
    if opts.mask_budget not in ("per_layer", "global"):
        raise ValueError(f"unknown mask budget {opts.mask_budget!r}; use per_layer or global")
    if opts.masks and not os.path.isfile(opts.masks):
        raise FileNotFoundError(f"masks file {opts.masks!r} does not exist")
    for name in ("batch_size", "grad_accum", "max_seq_len"):
        if getattr(opts, name) < 1:
            raise ValueError(f"{name} must be >= 1")
    kwargs = {}
    if opts.task == "jsonl":
        kwargs = {"prompt_field": opts.prompt_field, "response_field": opts.response_field}
    task = get_task(opts.task, data_dir=opts.data_dir, **kwargs)
    examples = task.load(opts.train_split or task.train_split, limit=opts.limit)
    if not examples:
        raise ValueError(f"task {opts.task!r} has no training examples")
    return task, examples


def _build_model(opts: TrainOptions):
    from ..config import RosaConfig
    from ..model import get_rosa_model
    from ..models import load_model

    model, tokenizer = load_model(opts.model, dtype=opts.dtype)
    if opts.quantize != "none":
        from ..quant import quantize_model

        model = quantize_model(model, backend=opts.quant_backend)
    if opts.method == "fft":
        if opts.quantize != "none":
            raise ValueError("full fine-tuning (fft) cannot train a quantized model")
        for p in model.parameters():
            p.requires_grad_(True)
        return model, tokenizer, 0, 0.0
    r, d = opts.resolved_rank_density(model)
    cfg = RosaConfig(r=r, density=d, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                     target_modules=opts.target_modules, impl=opts.impl,
                     base_model_name_or_path=opts.model or "smollm2-135m")
    return get_rosa_model(model, cfg), tokenizer, r, d


def _schedule(opts: TrainOptions):
    from .schedule import ScheduleConfig

    if opts.method in ("lora", "fft"):
        mode = "lora_only"
    elif opts.masks:
        mode = "masks_file"
    elif opts.method == "spa":
        mode = "spa_only"
    else:
        mode = "rosa"
    return ScheduleConfig(mode=mode, warmup_steps=opts.warmup_steps, mask_grad_steps=opts.mask_grad_steps,
                          mask_criterion=opts.mask_criterion, mask_budget=opts.mask_budget,
                          masks_path=opts.masks, seed=opts.seed)


def run_training(opts: TrainOptions) -> dict:
    """Train, write the run directory, return the summary written to ``run_config.json``."""
    from transformers import TrainingArguments

    from ..masks import save_masks
    from ..model import RosaModel
    from ..tasks import Collator, build_dataset
    from .outputs import MetricsWriter, plot_loss
    from .trainer import MASKS_FILE, RosaTrainer

    task, examples = validate(opts)
    schedule = _schedule(opts)
    out = os.path.abspath(opts.output_dir)
    main = is_main_process()
    if main and os.path.isdir(out) and os.listdir(out) and not opts.resume:
        raise FileExistsError(f"output directory {out} is not empty (pass --resume to continue it, or choose another)")
    torch.manual_seed(opts.seed)
    model, tokenizer, r, d = _build_model(opts)
    train_ds = build_dataset(examples, tokenizer, max_seq_len=opts.max_seq_len)
    if len(train_ds) == 0:
        raise ValueError(f"every training example of {opts.task!r} is longer than max_seq_len={opts.max_seq_len}")

    created = main and not os.path.isdir(out)
    if main:
        os.makedirs(out, exist_ok=True)
    try:
        metrics = MetricsWriter(os.path.join(out, "metrics.jsonl"), append=opts.resume, enabled=main)
        args = TrainingArguments(
            output_dir=os.path.join(out, "checkpoints"), per_device_train_batch_size=opts.batch_size,
            gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr, num_train_epochs=opts.epochs,
            max_steps=opts.max_steps, warmup_steps=opts.lr_warmup_steps, lr_scheduler_type="linear",
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=opts.logging_steps,
            save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500,
            seed=opts.seed, data_seed=opts.seed, bf16=opts.bf16, use_cpu=not torch.cuda.is_available(),
            report_to=[], disable_tqdm=not opts.progress, remove_unused_columns=False,
            gradient_checkpointing=opts.gradient_checkpointing, dataloader_num_workers=0,
        )
        trainer = RosaTrainer(model=model, args=args, train_dataset=train_ds, data_collator=Collator(tokenizer),
                              schedule=schedule, lora_lr=opts.lora_lr, phase_listener=metrics.phase,
                              callbacks=[metrics])
        t0 = time.time()
        result = trainer.train(resume_from_checkpoint=True if opts.resume else None)
        elapsed = time.time() - t0
        if isinstance(model, RosaModel):
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        else:
            trainable = sum(p.numel() for p in model.parameters())
        summary = {
            **{k: v for k, v in dataclasses.asdict(opts).items() if k != "extra"},
            "r": r, "density": d, "trainable_params": trainable, "schedule": schedule.to_dict(),
            "train_examples": len(train_ds), "dropped_examples": getattr(train_ds, "n_dropped", None),
            "train_loss": result.training_loss, "global_steps": result.global_step, "train_time_s": round(elapsed, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            **opts.extra,
        }
        if not main:
            return summary
        if isinstance(model, RosaModel):
            model.save_pretrained(out)
            masks = model.get_masks()
            if masks:
                save_masks(masks, os.path.join(out, MASKS_FILE))
        else:
            model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
        atomic_write_text(os.path.join(out, "run_config.json"), json.dumps(summary, indent=2, default=str) + "\n")
        plot_loss(metrics.path, os.path.join(out, "loss.png"), title=f"{opts.method} on {opts.task}")
        return summary
    except BaseException:
        if created and not opts.save_steps:  # nothing worth resuming: leave no partial directory
            shutil.rmtree(out, ignore_errors=True)
        raise
