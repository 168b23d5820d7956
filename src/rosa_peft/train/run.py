"""One training run end to end (what `rosa train`, `rosa demo` and `rosa study` call).

Every input is checked before anything is written, so bad input never leaves a partial output
directory. The run directory then holds: the adapter (``adapter_config.json`` +
``adapter_model.safetensors``; for ``fft`` the full model), ``masks.safetensors``, ``run_config.json``
(the resolved options and results), ``metrics.jsonl`` and ``loss.png``. ``run_config.json`` is written
last: it marks a finished run, and ``--resume`` on a finished run is a no-op that says so. With
``--save-steps`` every checkpoint also holds ``rosa_run_totals.json`` (the loss sum and training time
of the whole run up to it), so a resumed run's ``train_loss`` / ``train_time_s`` cover all its steps.
Temporary files a killed earlier run left in the directory are removed when a run starts in it.

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
from typing import List, Optional, Union

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..config import RosaConfig
from ..masks import BUDGETS, CRITERIA, save_masks
from ..model import RosaModel, get_rosa_model
from ..options import DTYPES, QUANT_BACKENDS, QUANTIZE, check_optional_dependencies, coerce_fields
from ..quant import quantize_model
from ..tasks import Collator, build_dataset, get_task, task_names
from ..utils import model_loading as models
from ..utils.checks import UserError, is_int
from ..utils.io import atomic_write_text, is_temp_name, read_json_object, remove_stale_temp_files
from .budget import budget_units, check_rosa_lora_fraction, resolve_budget
from .methods import METHODS
from .outputs import MetricsWriter, plot_loss
from .recipes import LOSS_AVERAGES, RECIPE_OPTIONS, RECIPES, SCALED_OPTIONS, get_recipe
from .schedule import ScheduleConfig
from .trainer import MASKS_FILE, RosaTrainer, checkpoint_step, is_warmup_checkpoint, warmup_resume_point

log = logging.getLogger("rosa_peft.train")


def _opt(default, help: str, **meta):
    """A TrainOptions field: ``help`` and ``meta`` become its ``rosa train`` flag (see rosa_peft.options)."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


# transformers' attention kernels (``attn_implementation``); None leaves transformers' own choice (sdpa)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
ADAPTER_DTYPES = ("float32", "bfloat16")  # float16 adapters would need loss scaling, as float16 weights
_DATA, _METHOD, _OPTIM, _MASKS, _RUN, _HW = ("model and data", "method and adapter", "optimisation",
                                              "masks (RoSA, SpA)", "run directory", "precision and quantization")


@dataclass
class TrainOptions:
    """Every option of one training run. Each field with ``help`` is a ``rosa train`` flag
    (``--field-name``) and a ``--config`` YAML key (``field_name``); values are converted to the
    declared types when the object is built (``lr="2e-4"`` becomes 2e-4, ``lr="abc"`` is a ValueError)."""

    model: Optional[str] = _opt(None, "base model: HF id or local path", group=_DATA,
                                default_text="the embedded SmolLM2-135M-Instruct")
    task: str = _opt("sql-synth", " | ".join(task_names()) + " (sql-synth: built-in, offline; jsonl: your own "
                                  "file, see --data)", group=_DATA)
    data: Optional[str] = _opt(None, "jsonl task: the training .jsonl file, one JSON object per line "
                                     "(a relative path not found here is looked up under --data-dir)",
                               group=_DATA, metavar="PATH")
    data_dir: Optional[str] = _opt(None, "folder with the task data", group=_DATA, metavar="DIR",
                                   default_text="$ROSA_PEFT_DATA_DIR")
    train_split: Optional[str] = _opt(None, "split to train on", group=_DATA,
                                      default_text="the task's train split")
    limit: Optional[int] = _opt(None, "train on the first N examples only", group=_DATA, metavar="N",
                                default_text="all")
    prompt_field: str = _opt("prompt", "jsonl task: the field holding the prompt", group=_DATA)
    response_field: str = _opt("response", "jsonl task: the field holding the response", group=_DATA)
    method: str = _opt("rosa", "rosa (low-rank + sparse) | lora | spa (sparse only) | fft (full fine-tuning)",
                       group=_METHOD, choices=tuple(METHODS))
    r: Optional[int] = _opt(None, "LoRA rank; --r is the same flag (under torchrun, whose parser rejects --r "
                                  "as ambiguous, use --rank)", group=_METHOD, flags=("--rank", "--r"), metavar="R",
                            default_text="per method: rosa 16, lora 32; or from --budget")
    density: Optional[float] = _opt(None, "sparse density d: the fraction of each weight's entries trained",
                                    group=_METHOD, metavar="D",
                                    default_text="per method: rosa 0.006, spa 0.012; or from --budget")
    budget: Optional[int] = _opt(None, "trainable-parameter budget: picks --rank / --density per method "
                                       "(give one or the other)", group=_METHOD, metavar="PARAMS")
    rosa_lora_fraction: float = _opt(0.5, "share of a --budget that RoSA spends on the low-rank part",
                                     group=_METHOD)
    lora_alpha: float = _opt(16.0, "LoRA scale alpha (the update is alpha/r * B*A)", group=_METHOD)
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input", group=_METHOD)
    target_modules: Union[str, List[str]] = _opt("all-linear", "modules to adapt: all-linear, or a comma list of "
                                                               "module names (e.g. q_proj,v_proj)", group=_METHOD)
    impl: str = _opt("auto", "sparse part: merged (W0 + S kept in the base weight), sp_add (S*x added, the "
                             "reference's scheme) or auto", group=_METHOD, choices=("auto", "merged", "sp_add"))
    epochs: float = _opt(1.0, "passes over the training examples (when --max-steps is -1)", group=_OPTIM)
    max_steps: int = _opt(-1, "optimizer steps after RoSA's LoRA warm-up (-1: from --epochs)", group=_OPTIM)
    recipe: str = _opt("default", "what the options below default to: " + "; ".join(
                           f"{r.name}: {r.help}" for r in RECIPES.values()) + " (docs/training.md)",
                       group=_OPTIM, choices=tuple(RECIPES))
    lr: Optional[float] = _opt(None, "learning rate of the sparse values (and of every weight for fft)", group=_OPTIM,
                               default_text="from --recipe: 2e-4")
    lora_lr: Optional[float] = _opt(None, "learning rate of the LoRA factors", group=_OPTIM,
                                    default_text="from --recipe: 7e-4")
    lr_warmup_steps: Optional[int] = _opt(None, "linear learning-rate warm-up steps", group=_OPTIM,
                                          default_text="from --recipe: 20; paper: scaled to the run length")
    max_grad_norm: Optional[float] = _opt(None, "clip the gradient norm to this before each step (0: no clipping)",
                                          group=_OPTIM, default_text="from --recipe: default 1.0, paper 0")
    loss_average: Optional[str] = _opt(None, "token: the mean over every labelled token of the accumulated batch "
                                             "(transformers' default); sequence: the mean over its sequences of "
                                             "each one's mean (the reference)", group=_OPTIM,
                                       choices=LOSS_AVERAGES, default_text="from --recipe: default token, paper sequence")
    batch_size: int = _opt(1, "micro-batch: examples per forward/backward pass in each process", group=_OPTIM)
    grad_accum: int = _opt(32, "micro-batches per optimizer step (effective batch = batch-size x grad-accum x "
                               "processes)", group=_OPTIM)
    max_seq_len: int = _opt(512, "tokens of prompt + response; longer prompts are dropped, longer responses cut",
                            group=_OPTIM)
    mask_criterion: str = _opt("fisher", "how the sparse mask is scored", group=_MASKS,
                               choices=CRITERIA)
    mask_budget: str = _opt("per_layer", "top-k per weight matrix or over the whole model", group=_MASKS,
                            choices=BUDGETS)
    warmup_steps: Optional[int] = _opt(None, "RoSA's LoRA-only steps before the masks are scored", group=_MASKS,
                                       default_text="from --recipe: 64; paper: scaled to the run length")
    mask_grad_steps: int = _opt(1, "micro-batches of gradients accumulated to score the masks", group=_MASKS)
    masks: Optional[str] = _opt(None, "use the masks in this .safetensors file instead of scoring gradients",
                                group=_MASKS, metavar="FILE")
    output_dir: str = _opt("runs/rosa", "run directory: adapter, masks, run_config.json, metrics.jsonl, loss.png "
                                        "(must be absent or empty unless --resume)", group=_RUN, metavar="DIR")
    seed: int = _opt(42, "random seed (data order, initialisation, random masks)", group=_RUN)
    dtype: Optional[str] = _opt(None, "base model dtype (float16 is refused: fp16 weights train unstably without "
                                      "loss scaling; use bfloat16 or --bf16)", group=_HW, choices=DTYPES,
                                default_text="from --recipe: default float32, paper bfloat16")
    adapter_dtype: Optional[str] = _opt(None, "dtype of the LoRA factors and sparse values, and so of their optimizer "
                                              "state", group=_HW, choices=ADAPTER_DTYPES,
                                        default_text="from --recipe: default float32, paper bfloat16")
    bf16: bool = _opt(False, "bf16 autocast (mixed precision)", group=_HW)
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward: less memory, slower", group=_HW)
    attn_implementation: Optional[str] = _opt(None, "the base model's attention kernel (transformers' "
                                                    "attn_implementation); on a CPU, eager trains short sequences "
                                                    "faster than sdpa", group=_HW, choices=ATTN_IMPLEMENTATIONS,
                                              default_text="transformers' choice (sdpa)")
    save_steps: int = _opt(0, "checkpoint every N steps (0: never)", group=_RUN)
    save_total_limit: int = _opt(0, "keep only the newest N checkpoints (0: all)", group=_RUN)
    resume: bool = _opt(False, "continue from the last checkpoint in --output-dir", group=_RUN)
    quantize: str = _opt("none", "nf4: 4-bit NF4 base model (QRoSA)", group=_HW, choices=QUANTIZE)
    quant_backend: str = _opt("torchao", "package doing --quantize: torchao (extra [quant]) or bitsandbytes "
                                         "(extra [bnb])", group=_HW, choices=QUANT_BACKENDS)
    logging_steps: int = _opt(1, "log the loss every N steps", group=_RUN)
    progress: bool = _opt(True, "progress bar", group=_RUN)
    extra: dict = _opt({}, "keys copied into run_config.json (rosa study sets them)", cli=False)

    def __post_init__(self):
        coerce_fields(self)  # YAML / Python values to the declared types, before anything loads
        self.check()
        recipe = get_recipe(self.recipe)
        for name in RECIPE_OPTIONS:  # what was not given comes from the recipe (warm-ups it scales: at run time)
            if getattr(self, name) is None and not (recipe.reference_steps and name in SCALED_OPTIONS):
                setattr(self, name, getattr(recipe, name))

    def resolve_warmups(self, run_steps: int) -> None:
        """Fill the warm-ups still unset with the recipe's, scaled to a run of ``run_steps`` optimizer steps."""
        recipe = get_recipe(self.recipe)
        for name in SCALED_OPTIONS:
            if getattr(self, name) is None:
                setattr(self, name, recipe.scaled(getattr(recipe, name), run_steps))

    def check(self) -> None:
        """ValueError for a value no run could take (one line naming the option); needs no file or model."""
        for name, choices in (("method", METHODS), ("mask_criterion", CRITERIA), ("mask_budget", BUDGETS),
                              ("dtype", DTYPES), ("quantize", QUANTIZE), ("quant_backend", QUANT_BACKENDS),
                              ("recipe", RECIPES), ("loss_average", LOSS_AVERAGES),
                              ("adapter_dtype", ADAPTER_DTYPES), ("attn_implementation", ATTN_IMPLEMENTATIONS)):
            value = getattr(self, name)
            if value is None and name in RECIPE_OPTIONS + ("attn_implementation",):
                continue  # filled from the recipe, or left to transformers
            if value not in choices:
                raise UserError(f"unknown {name.replace('_', ' ')} {value!r}; choose one of {', '.join(choices)}")
        for name in ("lr", "lora_lr", "max_grad_norm", "lr_warmup_steps", "warmup_steps", "save_steps",
                     "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"{name} must be >= 0, got {value}")
        for name in ("batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1")
        if self.dtype == "float16":
            raise UserError("--dtype float16 is not supported for training (fp16 weights train unstably without "
                             "loss scaling); use --dtype bfloat16, or float32 with --bf16")
        if self.is_jsonl and not self.data:
            raise UserError("--task jsonl needs --data PATH (a .jsonl file with one JSON object per line)")
        if self.data and not self.is_jsonl:
            raise UserError(f"--data is for --task jsonl; task {self.task!r} reads its files from --data-dir")
        method = METHODS[self.method]
        if not method.wraps_adapter:
            if self.quantize != "none":
                raise UserError(f"full fine-tuning ({self.method}) cannot train a quantized model")
        elif self.budget is not None:
            if self.r is not None or self.density is not None:
                raise UserError("give either --budget or --r/--density, not both")
            check_rosa_lora_fraction(self.rosa_lora_fraction)
        else:
            method.resolve(self.r, self.density)

    @property
    def is_jsonl(self) -> bool:
        return str(self.task).strip().lower() == "jsonl"

    def resolved_rank_density(self, model) -> tuple[int, float]:
        """``(r, density)`` of this run: from ``--budget`` over ``model``'s target layers, else from
        ``--r`` / ``--density`` or the method's defaults; ``(0, 0.0)`` for full fine-tuning."""
        method = METHODS[self.method]
        if self.budget is not None and method.wraps_adapter:
            per_rank, total = budget_units(model, self.target_modules)
            return resolve_budget(self.method, int(self.budget), per_rank, total, self.rosa_lora_fraction)
        return method.resolve(self.r, self.density)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a ``torchrun`` launch (which sets ``RANK``)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def validate(opts: TrainOptions):
    """Check what needs the filesystem or the task (the values were checked when ``opts`` was built);
    returns (task, train examples)."""
    if opts.masks and not os.path.isfile(opts.masks):
        raise FileNotFoundError(f"masks file {opts.masks!r} does not exist")
    check_optional_dependencies(opts.model, opts.quantize, opts.quant_backend)
    kwargs = {}
    if opts.is_jsonl:
        kwargs = {"path": opts.data, "prompt_field": opts.prompt_field, "response_field": opts.response_field}
    task = get_task(opts.task, data_dir=opts.data_dir, **kwargs)
    examples = task.load(opts.train_split or task.train_split, limit=opts.limit)
    if not examples:
        raise UserError(f"task {opts.task!r} has no training examples")
    return task, examples


def _build_model(opts: TrainOptions):
    extra = {"attn_implementation": opts.attn_implementation} if opts.attn_implementation else {}
    model, tokenizer = models.load_model(opts.model, dtype=opts.dtype, **extra)
    if opts.quantize != "none":
        model = quantize_model(model, backend=opts.quant_backend)
    r, d = opts.resolved_rank_density(model)
    if not METHODS[opts.method].wraps_adapter:  # full fine-tuning: the model itself
        for p in model.parameters():
            p.requires_grad_(True)
        return model, tokenizer, r, d
    cfg = RosaConfig(r=r, density=d, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                     target_modules=opts.target_modules, impl=opts.impl, adapter_dtype=opts.adapter_dtype,
                     base_model_name_or_path=opts.model or "smollm2-135m")
    return get_rosa_model(model, cfg), tokenizer, r, d


def _schedule(opts: TrainOptions) -> ScheduleConfig:
    """The run's schedule (checked when built). A warm-up the recipe has yet to scale to the run's length is
    0 here; :func:`run_training` puts the resolved one in once the length is known."""
    warmup = opts.warmup_steps if opts.warmup_steps is not None else 0
    return ScheduleConfig(mode=METHODS[opts.method].schedule(masks_file=bool(opts.masks)),
                          warmup_steps=warmup, mask_grad_steps=opts.mask_grad_steps,
                          mask_criterion=opts.mask_criterion, mask_budget=opts.mask_budget,
                          masks_path=opts.masks, seed=opts.seed)


RUN_CONFIG = "run_config.json"
CHECKPOINTS_DIR = "checkpoints"  # under the run directory: HF Trainer's checkpoint-N folders
TOTALS_FILE = "rosa_run_totals.json"  # in each checkpoint: loss sum and time of the whole run up to it
OPTIONS_FILE = "run_options.json"  # in CHECKPOINTS_DIR: the options a checkpointed run started with
# what --resume may change: where files are and go, how often the run logs and saves, how it shows
# progress, how long it runs (a longer run continues), and how activations are computed (same math)
RESUMABLE_CHANGES = ("output_dir", "data_dir", "resume", "progress", "logging_steps", "save_steps",
                     "save_total_limit", "max_steps", "epochs", "gradient_checkpointing", "attn_implementation",
                     "extra")
# the options that fix an epoch-based run's length (compared with a finished run's when --max-steps is not given)
_LENGTH_KEYS = ("task", "data", "data_dir", "train_split", "limit", "epochs", "max_steps", "batch_size",
                "grad_accum", "max_seq_len")


def _final_weights_present(out: str, method: str) -> bool:
    return any(os.path.isfile(os.path.join(out, n)) for n in METHODS[method].weight_files)


def finished_run(opts: TrainOptions, out: str) -> Optional[dict]:
    """The ``run_config.json`` of a finished run in ``out`` that ``opts`` asks no further steps of, else None.

    Finished: ``run_config.json`` (written last) and the final weights are there, and its ``global_steps``
    reaches ``opts.max_steps`` (or, without ``--max-steps``, the run had the same length options)."""
    path = os.path.join(out, RUN_CONFIG)
    if not os.path.isfile(path) or not _final_weights_present(out, opts.method):
        return None
    try:
        done = read_json_object(path)
    except (OSError, ValueError):
        return None
    steps = done.get("global_steps")
    if not is_int(steps):
        return None
    if opts.max_steps > 0:
        return done if steps >= opts.max_steps else None
    same_length = all(done.get(k) == getattr(opts, k, None) for k in _LENGTH_KEYS)
    return done if same_length else None


def _fixed_options(opts: TrainOptions) -> dict:
    """The options a resumed run must keep, as JSON values (what OPTIONS_FILE holds)."""
    fixed = {k: v for k, v in dataclasses.asdict(opts).items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps(fixed, default=str))


def check_resume_options(opts: TrainOptions, out: str) -> None:
    """Refuse a --resume whose options differ from those the run started with (OPTIONS_FILE, written when a
    checkpointed run starts): a resumed run with another learning rate, batch, seed, method, ... would
    silently train a mixture. A run from before OPTIONS_FILE existed is not checked."""
    path = os.path.join(out, CHECKPOINTS_DIR, OPTIONS_FILE)
    if not os.path.isfile(path):
        return
    saved = read_json_object(path)
    for key, value in _fixed_options(opts).items():
        if key in saved and saved[key] != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--resume: {flag} is {value!r} here but {saved[key]!r} in the run being resumed "
                            f"({path}); resume with the run's own options (only "
                            f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES if k != 'extra')} "
                            "may change)")


def _record_options(opts: TrainOptions, out: str) -> None:
    """Write OPTIONS_FILE for a run that checkpoints (once: a resume keeps the original)."""
    path = os.path.join(out, CHECKPOINTS_DIR, OPTIONS_FILE)
    if opts.save_steps and not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps(_fixed_options(opts), indent=2) + "\n")


def _checkpointing_args(enabled: bool) -> dict:
    """TrainingArguments for activation checkpointing under the name this transformers takes without a
    FutureWarning (``activation_checkpointing`` from v5, ``gradient_checkpointing`` before); non-reentrant."""
    name = ("activation_checkpointing" if "activation_checkpointing" in
            {f.name for f in dataclasses.fields(TrainingArguments)} else "gradient_checkpointing")
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}} if enabled else {name: False}


def _sampling_args(batch_size: int) -> dict:
    """Length-grouped sampling when a micro-batch holds several examples: the Collator pads each batch only
    to its longest example (dynamic padding), so grouping similar lengths removes most padding. With one
    example per micro-batch there is no padding and the plain random order is kept (same data order as
    before). ``train_sampling_strategy`` from transformers v5, ``group_by_length`` before."""
    if batch_size <= 1:
        return {}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def last_checkpoint(run_dir: str) -> Optional[str]:
    """The main-run checkpoint ``--resume`` in ``run_dir`` starts from (the ``checkpoints/checkpoint-N`` with
    the largest N); None if there is none."""
    d = os.path.join(run_dir, CHECKPOINTS_DIR)
    return get_last_checkpoint(d) if os.path.isdir(d) else None


def resume_point(run_dir: str) -> Optional[str]:
    """What ``--resume`` in ``run_dir`` continues from: the last main-run checkpoint, else what a RoSA warm-up
    left (``checkpoints/warmup/``: the chosen masks, or its last checkpoint); None if nothing."""
    return last_checkpoint(run_dir) or warmup_resume_point(os.path.join(run_dir, CHECKPOINTS_DIR))


def _truncate_metrics(metrics: MetricsWriter, point: str) -> None:
    """Drop the log records the killed session wrote after ``point`` (the resumed one logs them again)."""
    if os.path.isfile(point):  # the warm-up's masks: the whole warm-up stays, the main run starts over
        metrics.resume_at(0, phase="train")
    elif is_warmup_checkpoint(point):
        metrics.resume_at(checkpoint_step(point), phase="warmup")
    else:  # a main-run checkpoint
        metrics.resume_at(checkpoint_step(point))


def _resume_totals(ckpt: Optional[str]) -> Optional[dict]:
    """The whole-run totals saved in ``ckpt``, the checkpoint a resume starts from; None if there are none."""
    if ckpt is None or not os.path.isfile(os.path.join(ckpt, TOTALS_FILE)):
        return None
    try:
        totals = read_json_object(os.path.join(ckpt, TOTALS_FILE))
    except (OSError, ValueError):
        return None
    ok = (isinstance(totals.get("global_step"), int)
          and all(isinstance(totals.get(k), (int, float)) for k in ("loss_sum", "train_time_s")))
    return totals if ok else None


def _run_totals_callback(base: Optional[dict]):
    class RunTotals(TrainerCallback):
        """Loss sum and wall time of the whole run (every session of it), saved into each checkpoint.

        The loss sum of this session is the Trainer's running total (``_total_loss_scalar``, reset by
        each ``train()``), complete at a checkpoint because a saving step is also made a logging step."""

        def __init__(self):
            self.trainer = None
            self.base = base
            self.start_step = 0
            self.t0 = time.time()

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step = state.global_step  # the last call is the main phase (after any warm-up)

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                control.should_log = True
            return control

        def session_loss_sum(self) -> float:
            return float(getattr(self.trainer, "_total_loss_scalar", 0.0))

        def totals(self, global_step: int) -> tuple[int, float, float]:
            """(steps, loss sum, seconds) covered: the whole run, or only this session without base totals."""
            elapsed = time.time() - self.t0
            if self.base is not None and self.base["global_step"] == self.start_step:
                return (global_step, self.base["loss_sum"] + self.session_loss_sum(),
                        self.base["train_time_s"] + elapsed)
            return global_step - self.start_step, self.session_loss_sum(), elapsed

        def on_save(self, args, state, control, **kwargs):
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if not state.is_world_process_zero or not os.path.isdir(ckpt):
                return
            steps, loss_sum, seconds = self.totals(state.global_step)
            if steps != state.global_step:  # resumed without totals: cannot speak for the whole run
                return
            atomic_write_text(os.path.join(ckpt, TOTALS_FILE), json.dumps(
                {"global_step": state.global_step, "loss_sum": loss_sum, "train_time_s": seconds}) + "\n")

    return RunTotals()


def run_training(opts: TrainOptions) -> dict:
    """Train, write the run directory, return the summary written to ``run_config.json``.

    With ``opts.resume`` on a finished run (see :func:`finished_run`) nothing is trained or written: it
    says so and returns the stored summary with ``already_complete: True`` added."""
    task, examples = validate(opts)
    schedule = _schedule(opts)  # checked before anything loads or is written
    out = os.path.abspath(opts.output_dir)
    main = is_main_process()
    if opts.resume:
        done = finished_run(opts, out)
        if done is not None:
            if main:
                print(f"run in {out} is already complete ({done['global_steps']} steps); nothing to do", flush=True)
            return {**done, "already_complete": True}
        check_resume_options(opts, out)  # before anything loads or is written
    if (main and os.path.isdir(out) and not opts.resume
            and any(not is_temp_name(n) for n in os.listdir(out))):
        raise FileExistsError(f"output directory {out} is not empty (pass --resume to continue it, or choose another)")
    torch.manual_seed(opts.seed)
    model, tokenizer, r, d = _build_model(opts)
    # content-keyed: a rerun (or a study's next cell) on the same examples / tokenizer / max_seq_len reuses it
    train_ds = build_dataset(examples, tokenizer, max_seq_len=opts.max_seq_len, cache=True)
    if len(train_ds) == 0:
        raise UserError(f"every training example of {opts.task!r} is longer than max_seq_len={opts.max_seq_len}")

    created = main and not os.path.isdir(out)
    if main:
        os.makedirs(out, exist_ok=True)
        for path in remove_stale_temp_files(out):
            log.info("removed %s, a temporary file left by a killed earlier run", path)
        _record_options(opts, out)
    try:
        metrics = MetricsWriter(os.path.join(out, "metrics.jsonl"), append=opts.resume, enabled=main)
        resume_ckpt = last_checkpoint(out) if opts.resume else None
        point = resume_point(out) if opts.resume else None
        if point is not None:
            _truncate_metrics(metrics, point)
        args = TrainingArguments(
            output_dir=os.path.join(out, CHECKPOINTS_DIR), per_device_train_batch_size=opts.batch_size,
            gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.lr, num_train_epochs=opts.epochs,
            max_steps=opts.max_steps, warmup_steps=opts.lr_warmup_steps or 0, lr_scheduler_type="linear",
            max_grad_norm=opts.max_grad_norm,
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=opts.logging_steps,
            save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500,
            save_total_limit=opts.save_total_limit or None,
            seed=opts.seed, data_seed=opts.seed, bf16=opts.bf16, use_cpu=not torch.cuda.is_available(),
            report_to=[], disable_tqdm=not opts.progress, remove_unused_columns=False,
            dataloader_num_workers=0, **_checkpointing_args(opts.gradient_checkpointing),
            **_sampling_args(opts.batch_size),
        )
        trainer = RosaTrainer(model=model, args=args, train_dataset=train_ds, data_collator=Collator(tokenizer),
                              schedule=schedule, lora_lr=opts.lora_lr, phase_listener=metrics.phase,
                              callbacks=[metrics], loss_average=opts.loss_average)
        opts.resolve_warmups(trainer.full_run_steps())  # a recipe that scales them needs the run's length
        args.warmup_steps = opts.lr_warmup_steps
        schedule = trainer.schedule = dataclasses.replace(schedule, warmup_steps=opts.warmup_steps)
        totals = _run_totals_callback(_resume_totals(resume_ckpt))
        totals.trainer = trainer
        trainer.add_callback(totals)
        totals.t0 = time.time()
        result = trainer.train(resume_from_checkpoint=True if opts.resume else None)
        counted, loss_sum, seconds = totals.totals(result.global_step)
        if counted != result.global_step:
            log.warning("the checkpoint resumed from has no %s: train_loss and train_time_s cover only the %d "
                        "steps of this session", TOTALS_FILE, counted)
        if isinstance(model, RosaModel):
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        else:
            trainable = sum(p.numel() for p in model.parameters())
        summary = {
            **{k: v for k, v in dataclasses.asdict(opts).items() if k != "extra"},
            "r": r, "density": d, "trainable_params": trainable, "schedule": schedule.to_dict(),
            "train_examples": len(train_ds), "dropped_examples": getattr(train_ds, "n_dropped", None),
            "train_loss": loss_sum / counted if counted > 0 else result.training_loss,
            "global_steps": result.global_step, "train_time_s": round(seconds, 2),
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
        plot_loss(metrics.path, os.path.join(out, "loss.png"), title=f"{opts.method} on {opts.task}")
        # last: its presence marks a finished run (see finished_run)
        atomic_write_text(os.path.join(out, RUN_CONFIG), json.dumps(summary, indent=2, default=str) + "\n")
        return summary
    except BaseException:
        if created and not opts.save_steps:  # nothing worth resuming: leave no partial directory
            shutil.rmtree(out, ignore_errors=True)
        raise
