"""DistributedDataParallel around a model for the length of one training, with global batch norm.

:func:`~autoprune.train.fit` wraps the model afresh on every call and lets go of the wrapper
when it returns. The search removes channels between trainings, and a DDP wrapper keeps
gradient buckets and autograd hooks for the parameters it was built on: one that outlived a
removal would reduce the wrong tensors. Optimizers are built per call for the same reason.

While wrapped, every BatchNorm in training mode normalises with the mean and variance of the
*global* batch, as ``nn.SyncBatchNorm`` does (which runs on GPUs only, and would replace the
modules the pruning graph refers to). So N processes each given 1/N of a batch train like one
process given all of it, up to float rounding, and the running statistics stay identical on
every rank. It costs one small all-reduce per BatchNorm layer forward and one backward.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from .._forward import patched_forwards


@contextmanager
def data_parallel(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` wrapped in DDP with global batch norm under a process group; else ``model``.

    The wrapper shares ``model``'s parameters (no copy): train the yielded module, read and
    save ``model``.
    """
    if not distributed.is_distributed():
        yield model
        return
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    device = next(model.parameters()).device
    with patched_forwards({n: functools.partial(_global_batch_norm, n) for n in norms}):
        yield DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )


def _global_batch_norm(norm: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` with batch statistics over the whole batch, all ranks' parts together.

    Each rank's count, mean and sum of squared deviations are combined exactly (Chan et al.),
    which is stable where ``E[x^2] - E[x]^2`` is not. The all-reduce is differentiable, so
    the gradient flows to every rank's part as in one process.
    """
    if not norm.training:
        return type(norm).forward(norm, x)  # running statistics: nothing to share
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    var, mean = torch.var_mean(xf, dims, correction=0)
    count = torch.full_like(mean, x.numel() // x.shape[1])
    local = torch.stack([count, mean, var * count])
    here, world = distributed.rank(), distributed.world_size()
    slots = [local if r == here else torch.zeros_like(local) for r in range(world)]
    counts, means, m2s = distributed.sum_over_ranks(torch.stack(slots)).unbind(1)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    var = (m2s + counts * (means - mean) ** 2).sum(0) / total
    if norm.track_running_stats and norm.running_mean is not None:
        _update_running_stats(norm, mean.detach(), var.detach() * total / (total - 1).clamp(min=1))
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    shape = [1, -1] + [1] * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), xf, scale.view(shape)).to(x.dtype)


def _update_running_stats(norm: _BatchNorm, mean: torch.Tensor, unbiased: torch.Tensor) -> None:
    """What ``F.batch_norm`` does to the buffers in training mode."""
    assert norm.running_mean is not None and norm.running_var is not None
    assert norm.num_batches_tracked is not None
    norm.num_batches_tracked.add_(1)
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    with torch.no_grad():
        norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
        norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), factor)
