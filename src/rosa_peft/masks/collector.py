"""GradientCollector: dense weight gradients dW = dOᵀ·X of RoSA layers, from hooks, per micro-batch.

A forward hook on each scored ``RosaLinear`` keeps its input X and puts a hook on its output tensor;
that hook receives dO during backward and forms dW in float32 (float64 for float64 inputs). W itself
never needs ``requires_grad`` (frozen or 4-bit bases work), and no parameter's ``.grad`` is touched.
A micro-batch is one backward pass: its dW (summed over the layer's calls) is folded into the
accumulator as the criterion's ``fold`` of dW (dW⊙dW for ``fisher``, dW for ``grad``) when the pass
ends; :meth:`GradientCollector.scores` applies its ``finish`` to the mean. Under several processes
(DDP), :meth:`GradientCollector.all_reduce` sums the statistics over the ranks before scoring.
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional

import torch
from torch import nn

from ..layer import RosaLayer
from .criteria import get_criterion, names_needing

GRAD_CRITERIA = names_needing("gradients")


def named_rosa_layers(model: nn.Module) -> list[tuple[str, RosaLayer]]:
    """(name, layer) for every RoSA layer; names are relative to the wrapped model for a RosaModel."""
    if hasattr(model, "rosa_layers"):
        return list(model.rosa_layers())
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RosaLayer)]


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation-checkpoint recomputation)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _at_end_of_backward(fn) -> bool:
    """Run ``fn`` when the current backward pass ends (the engine's final callbacks, as DDP/FSDP use)."""
    try:
        torch.autograd.Variable._execution_engine.queue_callback(fn)
        return True
    except (AttributeError, RuntimeError):  # not available: the micro-batch is closed lazily (flush)
        return False


def _comm_device(dist, group) -> torch.device:
    """Where tensors must live for the process group's backend (NCCL: the current GPU; else the CPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_world(group=None) -> int:
    """The number of processes in ``group`` when ``torch.distributed`` is initialised, else 1."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class GradientCollector:
    """Accumulate gradient statistics of RoSA layers over ordinary forward + backward micro-batches.

    ``criterion``: a registered criterion that needs gradients (:data:`GRAD_CRITERIA`): ``"fisher"``
    (mean over micro-batches of dW⊙dW, the paper's default) or ``"grad"`` (|mean of dW|), or one added
    since. ``device``: where the float32 accumulators live (default ``"cpu"``, as the
    reference; ``None`` = on each layer's own device). ``layers``: names to score (default: all).

    Attaches on construction; use as a context manager or call :meth:`detach`. While attached,
    training runs as usual: parameter gradients are unchanged. A layer whose output would not require
    grad (nothing trainable upstream, e.g. r = 0 before masks exist) gets ``output + 0`` with a
    private zero leaf so that dO still flows. Activation checkpointing must be non-reentrant.
    """

    def __init__(self, model: nn.Module, criterion: str = "fisher", device="cpu",
                 layers: Optional[Iterable[str]] = None):
        allowed = names_needing("gradients")
        if criterion not in allowed:
            raise ValueError(f"GradientCollector criterion must be one of {allowed}, got {criterion!r}")
        available = dict(named_rosa_layers(model))
        if not available:
            raise ValueError("the model has no RoSA layers to score (wrap it with get_rosa_model first)")
        if isinstance(layers, str):
            layers = [layers]
        names = list(available) if layers is None else list(dict.fromkeys(layers))
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"layers: {unknown[0]!r} is not a RoSA layer of the model")
        if not names:
            raise ValueError("layers is empty: nothing to score")
        self.criterion = criterion
        self._criterion = get_criterion(criterion)
        self.device = None if device is None else torch.device(device)
        self.layers = {n: available[n] for n in names}
        self.num_batches = 0
        self.tap_all = False  # compute_masks: tap every scored output (it differentiates w.r.t. the taps)
        self._acc: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._received: dict[str, int] = {}
        self._taps: dict[tuple, torch.Tensor] = {}
        self._hit = False
        self._queued = False
        self._handles = [layer.register_forward_hook(functools.partial(self._forward_hook, name), with_kwargs=True)
                         for name, layer in self.layers.items()]

    # ---- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> "GradientCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        """Remove the hooks (idempotent); the statistics collected so far stay available."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._taps.clear()

    def reset(self) -> None:
        """Forget the statistics collected so far (the hooks stay)."""
        self._acc.clear()
        self._pending.clear()
        self.num_batches = 0

    def taps(self) -> list[torch.Tensor]:
        """The zero leaves added to layer outputs so far (differentiate w.r.t. them to reach every tap)."""
        return list(self._taps.values())

    # ---- hooks -------------------------------------------------------------------------------------
    def _tap(self, out: torch.Tensor) -> torch.Tensor:
        key = (out.device, out.dtype)
        zero = self._taps.get(key)
        if zero is None:
            zero = self._taps[key] = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
        return out + zero

    def _forward_hook(self, name, module, args, kwargs, output):
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return None
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, torch.Tensor):
            return None
        tap = self.tap_all or not output.requires_grad
        if tap:
            output = self._tap(output)
        if _in_backward():  # checkpoint recomputation: same graph as the first forward, nothing recorded
            return output
        self.flush()
        output.register_hook(functools.partial(self._grad_hook, name, x, x._version))
        self._calls[name] = self._calls.get(name, 0) + 1
        return output

    def _grad_hook(self, name, x, version, grad):
        if x._version != version:
            raise RuntimeError(f"mask scoring: the input of {name!r} was modified in place after the forward "
                               "pass, so its weight gradient cannot be formed")
        # float64 if either is; bf16 x and dO (a bf16 model): one bf16 GEMM (float32 accumulation inside,
        # each dW entry rounded to bf16, like a bf16 model's own weight gradient), folded in float32;
        # else float32. Integer x (embedding ids) counts as neither.
        if torch.float64 in (x.dtype, grad.dtype):
            dt = torch.float64
        elif x.dtype == grad.dtype == torch.bfloat16:
            dt = torch.bfloat16
        else:
            dt = torch.float32
        with torch.no_grad():
            dw = self.layers[name].weight_grad(x, grad, dt)
            if dw.dtype == torch.bfloat16:
                dw = dw.float()
        self._received[name] = self._received.get(name, 0) + 1
        pending = self._pending.pop(name, None)
        if pending is not None:
            dw = pending.add_(dw.to(pending.device))
        if self._received[name] >= self._calls.get(name, 0):
            self._fold(name, dw)  # every call of this micro-batch has arrived
        else:
            self._pending[name] = dw.to((self.device if self.device is not None else dw.device))
        self._hit = True
        if not self._queued:
            self._queued = _at_end_of_backward(self._end_of_backward)
        return None

    @torch.no_grad()
    def _fold(self, name: str, dw: torch.Tensor) -> None:
        dw = self._criterion.fold(dw)
        dw = dw.to((self.device if self.device is not None else dw.device))
        acc = self._acc.get(name)
        if acc is None:
            self._acc[name] = dw
        else:
            acc.add_(dw)

    def flush(self) -> None:
        """Close the micro-batch whose backward has run (normally done at the end of each backward)."""
        if self._hit and not self._queued:
            self._end_of_backward()

    def _end_of_backward(self) -> None:
        self._queued = False
        for name in list(self._pending):
            self._fold(name, self._pending.pop(name))
        self._calls.clear()
        self._received.clear()
        if self._hit:
            self.num_batches += 1
            self._hit = False

    # ---- several processes (DDP) -------------------------------------------------------------------
    @torch.no_grad()
    def all_reduce(self, group=None) -> None:
        """Sum the statistics over the processes of ``group`` (``torch.distributed``; default: the world).

        Afterwards every rank holds the sums over *all* ranks' micro-batches and their total count, so
        :meth:`scores` is the mean over the global set — the same on every rank, and what one process
        would get from all the micro-batches. Every rank must call it, with the same layers. A layer
        that got no gradient on a rank contributes zeros there.
        """
        import torch.distributed as dist

        self.flush()
        if self._pending:
            raise RuntimeError("all_reduce: a backward pass is still in flight")
        comm = _comm_device(dist, group)
        count = torch.tensor([float(self.num_batches)], dtype=torch.float64, device=comm)
        dist.all_reduce(count, group=group)
        for name, layer in self.layers.items():
            acc = self._acc.get(name)
            if acc is None:
                acc = self._zeros(layer)
            buf = acc if acc.device == comm else acc.to(comm)
            dist.all_reduce(buf, group=group)
            self._acc[name] = buf if buf is acc else buf.to(acc.device)
        self.num_batches = int(round(float(count.item())))

    def _zeros(self, layer) -> torch.Tensor:
        """A float32 zero accumulator for a layer no gradient reached, where its accumulator would live."""
        dev = self.device if self.device is not None else layer.kind.weight(layer.base_layer).device
        return torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32, device=dev)

    # ---- results -----------------------------------------------------------------------------------
    def missing(self) -> list[str]:
        """Scored layers that have received no gradient yet."""
        return [n for n in self.layers if n not in self._acc]

    @torch.no_grad()
    def scores(self, release: bool = False) -> dict[str, torch.Tensor]:
        """{layer: score (out, in)}: mean dW⊙dW (fisher) or |mean dW| (grad); zeros for a layer that
        got no gradient. ``release=True`` hands over the accumulators without a copy and resets."""
        self.flush()
        if self.num_batches == 0:
            raise RuntimeError("GradientCollector has no micro-batch yet: run forward + backward while it is attached")
        n = self.num_batches
        out = {}
        for name, layer in self.layers.items():
            acc = self._acc.get(name)
            if acc is None:
                out[name] = self._zeros(layer)
                continue
            s = acc.div_(n) if release else acc / n
            out[name] = self._criterion.finish(s)
        if release:
            self.reset()
        return out
