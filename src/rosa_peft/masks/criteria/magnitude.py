"""The ``magnitude`` criterion: |W0| of the frozen base weight (de-quantised for 4-bit bases), no data."""
from __future__ import annotations

from typing import Optional

import torch

from . import Criterion, register


@torch.no_grad()
def magnitude_scores(layer, adapter_name: Optional[str] = None) -> torch.Tensor:
    """|W0| of a RosaLinear in float32 (float64 for float64 bases), on the weight's device.

    W0 is the frozen base weight: de-quantised for 4-bit bases, and with the pretrained values put
    back at the mask positions when the ``merged`` implementation holds W0 + S in the base weight.
    """
    if layer.merged_adapters:
        raise ValueError(f"{layer.module_name!r}: adapters are merged into the base weight; unmerge before "
                         "computing magnitude scores")
    dtype = torch.float64 if layer.kind.compute_dtype(layer.base_layer) == torch.float64 else torch.float32
    scores = layer.base_weight(dtype).abs_()
    return scores


def _score(name: str, layer, adapter: str, seed: int) -> torch.Tensor:
    return magnitude_scores(layer, adapter)


MAGNITUDE = register(Criterion("magnitude", needs="nothing", score=_score))
