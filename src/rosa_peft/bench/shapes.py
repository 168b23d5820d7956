"""Model presets for the benchmarks: randomly initialised LLaMA-shaped decoder stacks.

A preset fixes the shapes that matter for speed (hidden size, MLP size, heads, number of decoder layers).
The vocabulary is kept small on purpose: the output head is not adapted by any method ("all-linear"
leaves it alone) and would otherwise dominate small models; its size is reported with the results.
Weights are random: adapter speed and memory do not depend on the values.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from ..utils.checks import UserError

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int = 512

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(name, out, in) of the seven adapted projections of one decoder layer."""
        h, i = self.hidden, self.intermediate
        kv = h // self.heads * self.kv_heads
        return [("q_proj", h, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, h),
                ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # One decoder layer of LLaMA-2-7B (hidden 4096, MLP 11008, 32 heads, no GQA).
    "llama2-7b": ModelPreset("llama2-7b", 4096, 11008, 32, 32, 1),
    # SmolLM2-135M: hidden 576, MLP 1536, 9 heads / 3 KV heads; 4 of its 30 layers by default.
    "smollm2-135m": ModelPreset("smollm2-135m", 576, 1536, 9, 3, 4),
    # Tiny: tests and smoke runs.
    "tiny": ModelPreset("tiny", 64, 160, 4, 2, 1, vocab=128),
}
ALIASES = {"llama2": "llama2-7b", "7b": "llama2-7b", "smollm2": "smollm2-135m", "smollm": "smollm2-135m"}
_CUSTOM = re.compile(r"^llama:(\d+):(\d+):(\d+)(?::(\d+))?(?::(\d+))?$")


def resolve_preset(spec: str, layers: int | None = None) -> ModelPreset:
    """A preset name, or ``llama:HIDDEN:INTERMEDIATE:HEADS[:KV_HEADS[:LAYERS]]``."""
    key = ALIASES.get(spec, spec)
    if key in PRESETS:
        p = PRESETS[key]
    else:
        m = _CUSTOM.match(spec)
        if not m:
            raise UserError(f"--shapes {spec!r}: not a model preset ({', '.join(PRESETS)}) nor "
                             "llama:HIDDEN:INTERMEDIATE:HEADS[:KV_HEADS[:LAYERS]]")
        h, i, heads = int(m.group(1)), int(m.group(2)), int(m.group(3))
        kv = int(m.group(4) or heads)
        if h % heads or heads % kv:
            raise UserError(f"--shapes {spec!r}: hidden must be divisible by heads and heads by kv heads")
        p = ModelPreset(spec, h, i, heads, kv, int(m.group(5) or 1))
    if layers is not None:
        p = ModelPreset(p.name, p.hidden, p.intermediate, p.heads, p.kv_heads, layers, p.vocab)
    return p


def build_model(preset: ModelPreset, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` with the preset's shapes, built directly in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
        max_position_embeddings=8192, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    try:  # skip transformers' (slow) init; the weights are filled below
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of the weights ever exists
    try:
        with torch.device(device), no_init_weights():
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:  # RMSNorm scales
                p.fill_(1.0)
    model.config.use_cache = False
    return model.train()


def adapted_shapes(model) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of the Linear layers every method adapts (all but the output head)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in LINEAR_NAMES:
            out[name] = (m.out_features, m.in_features)
    return out
