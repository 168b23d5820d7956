"""The ``random`` criterion: uniform [0, 1) scores seeded by (seed, layer name), no data."""
from __future__ import annotations

import zlib

import torch

from . import Criterion, register


def random_scores(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """Uniform [0, 1) float32 scores on the CPU from a generator seeded by (seed, layer name): the same
    for a layer whatever the other layers or the grouping are."""
    layer_seed = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)
    return torch.rand(shape, generator=torch.Generator().manual_seed(layer_seed))


def _score(name: str, layer, adapter: str, seed: int) -> torch.Tensor:
    return random_scores(name, (layer.out_features, layer.in_features), seed)


RANDOM = register(Criterion("random", needs="nothing", score=_score))
