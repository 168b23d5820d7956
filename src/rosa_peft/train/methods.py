"""The training methods (rosa, lora, spa, fft): one registry entry each, read by every place that differs by method.

A :class:`Method` says what the method trains (a low-rank part, a sparse part, or, with neither, the
full model), its default ``(r, density)``, how a parameter budget splits between its parts, which
schedule it runs, and how tables, figures and study cell names show it. ``rosa train``, ``rosa
study``, ``rosa eval --compare`` and the benchmarks look a method up in :data:`METHODS` instead of
comparing its name, so a new method or a new default is one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from ..utils.checks import UserError  # a ValueError the ``rosa`` CLI prints as one line

# the files a finished run's weights are in: an adapter, or (full fine-tuning) the whole model
ADAPTER_FILES = ("adapter_model.safetensors",)
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class Method:
    """One training method. ``low_rank`` / ``sparse``: which adapter parts it trains (neither: the full
    model, no adapter); ``defaults``: ``(r, density)`` when neither ``--r``/``--density`` nor ``--budget``
    is given; ``schedule_mode``: its :class:`~rosa_peft.train.schedule.ScheduleConfig` mode; ``label``,
    ``table_order`` (inside one budget of the study table) and ``marker`` (matplotlib): how it is shown."""

    name: str
    label: str
    low_rank: bool
    sparse: bool
    defaults: Tuple[int, float]
    schedule_mode: str
    table_order: int
    marker: str

    @property
    def wraps_adapter(self) -> bool:
        """False for full fine-tuning: the model itself is trained, with no adapter and no budget."""
        return self.low_rank or self.sparse

    @property
    def mixed(self) -> bool:
        """Both a low-rank and a sparse part (RoSA): its entries differ by how the budget is split."""
        return self.low_rank and self.sparse

    @property
    def rank_only(self) -> bool:
        """Only a low-rank part (LoRA): the reference a budget is anchored on."""
        return self.low_rank and not self.sparse

    @property
    def weight_files(self) -> Tuple[str, ...]:
        """The files of which one holds a finished run's weights."""
        return ADAPTER_FILES if self.wraps_adapter else MODEL_FILES

    def schedule(self, masks_file: bool = False) -> str:
        """The schedule mode; a masks file replaces the mask scoring of a method with a sparse part."""
        return "masks_file" if masks_file and self.sparse else self.schedule_mode

    def resolve(self, r=None, density=None) -> Tuple[int, float]:
        """``(r, density)`` from explicit values, else the defaults; a part the method lacks is 0.
        UserError (naming the flag) when a part it has would be empty."""
        r0, d0 = self.defaults
        r = (r0 if r is None else r) if self.low_rank else 0
        d = (d0 if density is None else density) if self.sparse else 0.0
        if self.low_rank and r < 1:
            raise UserError(f"--method {self.name} needs --r >= 1")
        if self.sparse and not d > 0:
            raise UserError(f"--method {self.name} needs --density > 0")
        return r, d

    def at_budget(self, lora_rank: int, rosa_rank: int, per_rank: int, total: int) -> Tuple[int, float]:
        """``(r, density)`` that spend what LoRA at ``lora_rank`` trains: all as rank, all as density, or
        (both parts) ``rosa_rank`` as rank and the rest as density. ``per_rank``: parameters of one rank,
        ``total``: the weight entries over the adapted layers."""
        r = rosa_rank if self.mixed else (lora_rank if self.low_rank else 0)
        d = (lora_rank * per_rank - r * per_rank) / total if self.sparse else 0.0
        return r, d

    def split_budget(self, budget: int, lora_rank: int, per_rank: int, total: int,
                     rosa_lora_fraction: float) -> Tuple[int, float]:
        """``(r, density)`` of a ``--budget`` rounded to ``lora_rank`` LoRA ranks; a mixed method puts
        ``rosa_lora_fraction`` of it into the low-rank part. UserError when the parts do not fit."""
        if not self.wraps_adapter:
            raise not_budgeted(self.name)
        anchored = lora_rank * per_rank
        rosa_rank = int(round(rosa_lora_fraction * anchored / per_rank))
        if self.mixed and (rosa_rank < 1 or rosa_rank >= lora_rank):
            raise UserError(f"budget {budget:,} is too small for {self.label}: it needs at least 2 LoRA ranks' "
                             f"worth ({2 * per_rank:,} parameters) to hold both a low-rank and a sparse part")
        r, d = self.at_budget(lora_rank, rosa_rank, per_rank, total)
        if d >= 1.0:
            raise UserError(f"budget {budget:,} exceeds the {total:,} weight entries {self.label} can train")
        return r, d

    def cell_name(self, r, density, budget=None) -> str:
        """How a study names an entry of this method: ``rosa-r16-d0.006``, ``lora-r8``, ``spa-d0.023``,
        ``fft``, or ``lora-b1200000`` for a budget."""
        if budget is not None:
            return f"{self.name}-b{budget}"
        return self.name + (f"-r{r}" if self.low_rank else "") + (f"-d{density:g}" if self.sparse else "")


METHODS: Dict[str, Method] = {m.name: m for m in (
    # defaults: the paper's 80M-budget cells
    Method("rosa", "RoSA", low_rank=True, sparse=True, defaults=(16, 0.006), schedule_mode="rosa",
           table_order=1, marker="^"),
    Method("lora", "LoRA", low_rank=True, sparse=False, defaults=(32, 0.0), schedule_mode="lora_only",
           table_order=0, marker="o"),
    Method("spa", "SpA", low_rank=False, sparse=True, defaults=(0, 0.012), schedule_mode="spa_only",
           table_order=2, marker="s"),
    Method("fft", "FFT", low_rank=False, sparse=False, defaults=(0, 0.0), schedule_mode="lora_only",
           table_order=3, marker="*"),
)}


def not_budgeted(name: str) -> UserError:
    """The error for a ``--budget`` given to a method without an adapter (or to no known method)."""
    names = [n for n, m in METHODS.items() if m.wraps_adapter]
    return UserError(f"--budget applies to {', '.join(names[:-1])} and {names[-1]}, not {name!r}")


def label_of(name: str) -> str:
    """The display label of method ``name`` (any case); ``name`` itself when it is no known method."""
    method = METHODS.get(str(name).lower())
    return method.label if method else name
