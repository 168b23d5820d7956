"""One profiled training step (torch.profiler): where the time of a method's step goes."""
from __future__ import annotations

import torch

from .step import synchronize, train_step


def profile_step(model, optimizer, ids: torch.Tensor, device: str, rows: int = 25) -> str:
    """Run one step under the profiler; return the top ``rows`` ops by self time as a text table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    train_step(model, optimizer, ids)  # not profiled: caches, lazy state
    synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        train_step(model, optimizer, ids)
        synchronize(device)
    return prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=rows, max_name_column_width=48,
                                                              max_shapes_column_width=60)
