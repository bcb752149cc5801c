"""The process group as autoprune sees it: who this process is, and the few collectives it needs.

autoprune runs on torch.distributed as launched by ``torchrun``; nothing here is a launcher of
its own. Without an initialised process group (or with one of a single process) every function
answers for one process: rank 0 of 1, collectives return their input. So the rest of the code
calls these unconditionally and one process is the special case of N, not a separate path.

The search keeps every rank's model identical: all ranks score candidates on the same
calibration images, share the losses, and apply the same choice; training averages gradients.
:func:`check_in_sync` verifies that every iteration, since a silent divergence would make the
ranks prune different channels and hang or corrupt the run much later.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import AutopruneError

T = TypeVar("T")
R = TypeVar("R")

# What torchrun (and torch.distributed's env:// initialisation) puts in every worker's environment.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and shows progress."""
    return rank() == 0


def backend() -> str:
    """NCCL for CUDA tensors and gloo for CPU ones; gloo alone without CUDA.

    Naming both (``cuda:nccl,cpu:gloo``) lets ``--device cpu`` run on a GPU machine, and makes
    the object collectives (pickled on the CPU) go through gloo.
    """
    return "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_ENV)


@contextlib.contextmanager
def torchrun_session() -> Iterator[None]:
    """One command as one rank of a torchrun job; a plain run outside torchrun.

    Initialises the process group from torchrun's environment (each rank on GPU ``LOCAL_RANK``
    when there are GPUs), sends the standard output of ranks other than 0 to /dev/null (every
    rank computes the same result; it is printed once) and tears the group down at the end.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend())
    try:
        with contextlib.ExitStack() as stack:
            if not is_main():
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
            yield
        dist.barrier()  # no rank tears its connections down while a peer still uses them
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (e.g. all have read a file before rank 0 rewrites it)."""
    if is_distributed():
        dist.barrier()


def all_gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank (pickled: keep tensors on the CPU)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (and returned)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor.clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on the sum, hence on every rank's input.
        return all_reduce_sum(grad.clone(memory_format=torch.contiguous_format))


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, differentiably: the gradient reaches every rank's input."""
    return _SumOverRanks.apply(tensor)


def my_share(items: Sequence[T]) -> list[int]:
    """The positions of ``items`` this rank works on: every ``world_size``-th, from its rank.

    Round robin rather than contiguous blocks: candidates come in network order, and early
    groups cost more to score than late ones, so interleaving balances the ranks.
    """
    return list(range(rank(), len(items), world_size()))


def merge_shares(mine: dict[int, T]) -> dict[int, T]:
    """Each rank's ``{position: result}`` for its share, merged, on every rank."""
    merged: dict[int, T] = {}
    for part in all_gather(mine):
        merged.update(part)
    return merged


def share_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` with each item computed on one rank, all results on every rank.

    Results travel pickled: return Python numbers or CPU tensors.
    """
    merged = merge_shares({i: fn(items[i]) for i in my_share(items)})
    return [merged[i] for i in range(len(items))]


def broadcast_weights(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers, in place (what DDP does when built).

    A model built without a seed starts from other random weights in every process.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dense = tensor.contiguous()  # collectives need it; channels_last weights are not
            dist.broadcast(dense, src=0)
            if dense is not tensor:
                tensor.copy_(dense)


def checksum(model: nn.Module) -> list[tuple[str, tuple[int, ...], float, float]]:
    """Per state-dict entry: name, shape, the float64 sum, and a sum weighted by position.

    Cheap (one pass over the weights on their device, one transfer) and sensitive to the
    changes that matter: a different value, shape, or order of channels.
    """
    names, shapes, sums = [], [], []
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().flatten().double()
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
            sums.append(torch.stack([flat.sum(), (flat * weights).sum()]))
            names.append(name)
            shapes.append(tuple(tensor.shape))
    values = torch.stack(sums).tolist() if sums else []
    return [(n, s, a, b) for n, s, (a, b) in zip(names, shapes, values, strict=True)]


def check_in_sync(model: nn.Module, when: str) -> None:
    """Raise on every rank if any rank's ``model`` differs from rank 0's (no-op in one process)."""
    if not is_distributed():
        return
    everyone = all_gather(checksum(model))
    reference = everyone[0]
    for other, sums in enumerate(everyone[1:], start=1):
        if sums != reference:
            first = next(
                (a[0] for a, b in zip(reference, sums, strict=False) if a != b), "the layer list"
            )
            raise AutopruneError(
                f"the processes diverged {when}: rank {other}'s model differs from rank 0's "
                f"(first in {first}); every rank must run the same command on the same data"
            )
