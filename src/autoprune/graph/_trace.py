"""One traced forward that gives Torch-Pruning its graph and records what it does not keep.

Torch-Pruning rebuilds the graph from autograd nodes, which carry no shapes. Running its trace
under a :class:`~torch.overrides.TorchFunctionMode` lets us see every op's operand shapes, so we
can tell where channels are *not* carried one to one (an op that would silently merge or break
groups), where they meet a tensor that cannot be pruned (the model input, a constant), and how
many MACs each conv/linear costs per channel pair.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .._forward import patched_forwards
from ..layers import ChannelSplit
from ._attention import attention_adapter
from ._labels import ChannelLabels
from ._rules import CONV_TYPES, channels_of, channelwise_dim

if TYPE_CHECKING:
    from .custom import CustomLayers


@dataclass(frozen=True)
class OpRecord:
    """Shapes around one functional op whose output has autograd history."""

    name: str
    operands: tuple[torch.Size, ...]  # operands with autograd history
    constants: tuple[torch.Size, ...]  # operands without it (model input, buffers, literals)
    output: torch.Size
    internal: bool  # ran inside a layer with its own pruner (its internals are its business)


class TraceRecorder(TorchFunctionMode):
    """Records op shapes, per-layer MAC units and the widths of black-box layers.

    ``mac_units[layer]`` is the factor with ``MACs(layer) = unit * w.shape[0] * w.shape[1]``
    (batch x output positions x kernel size for a conv, rows for a linear): it does not change
    when channels are removed, so MACs after pruning follow from weight shapes alone. This is
    the count :func:`torch.utils.flop_counter.FlopCounterMode` makes (FLOPs / 2, no bias).
    ``attention_units[layer]`` is batch x tokens^2 of a self-attention layer (see
    :class:`~.groups.MacTable`). ``order`` lists the conv, linear and attention layers in the
    order they first ran.
    """

    def __init__(
        self,
        model: nn.Module,
        black_boxes: Iterable[nn.Module],
        attention: Iterable[nn.Module] = (),
        channelwise: Iterable[nn.Module] = (),
        custom: CustomLayers | None = None,
    ) -> None:
        super().__init__()
        self.ops: dict[Any, OpRecord] = {}
        self.mac_units: dict[nn.Module, int] = defaultdict(int)
        self.attention_units: dict[nn.Module, int] = defaultdict(int)
        self.order: dict[nn.Module, int] = {}
        self.widths: dict[nn.Module, tuple[int, int]] = {}
        self.channels: dict[nn.Module, int] = {}  # traced widths of channel-wise layers
        self.outputs: set[Any] = set()  # grad_fns of the model's outputs
        self.labels = ChannelLabels()  # where every traced tensor's channels come from
        self.split_layers: dict[Any, nn.Module] = {}  # grad_fn of its pieces -> ChannelSplit
        self._depth = 0
        self._handles = [model.register_forward_hook(self._model_output)]
        if custom is not None:  # registered layers count their own MACs, sublayers' included
            self._handles += custom.hooks(self)
        covered = custom.covered if custom is not None else set()
        for m in model.modules():
            if isinstance(m, (*CONV_TYPES, nn.Linear)) and m not in covered:
                self._handles.append(m.register_forward_hook(self._count_macs))
            if isinstance(m, ChannelSplit):
                self._handles.append(m.register_forward_hook(self._split))
        for m in attention:
            self._handles.append(m.register_forward_hook(self._count_attention))
        for m in channelwise:
            self._handles.append(m.register_forward_hook(self._channelwise))
        for m in black_boxes:
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._leave))

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for h in self._handles:
            h.remove()

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        before = self.labels.snapshot(args, kwargs or {}) if self._depth == 0 else []
        out = func(*args, **(kwargs or {}))
        grad_fn = getattr(out, "grad_fn", None) if isinstance(out, torch.Tensor) else None
        if grad_fn is not None and grad_fn not in self.ops:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.ops[grad_fn] = OpRecord(
                name=getattr(func, "__name__", str(func)),
                operands=tuple(t.shape for t in tensors if t.requires_grad),
                constants=tuple(t.shape for t in tensors if not t.requires_grad),
                output=out.shape,
                internal=self._depth > 0,
            )
        if self._depth == 0:
            name = getattr(func, "__name__", str(func))
            self.labels.record(func, name, args, kwargs or {}, out, before)
        return out

    def _model_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.outputs.update(
            t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn
        )

    def _split(self, module: nn.Module, args: tuple, output: tuple) -> None:
        self.split_layers[output[0].grad_fn] = module

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth -= 1
        first_in = next((t for t in tree_leaves(args) if isinstance(t, torch.Tensor)), None)
        first_out = next((t for t in tree_leaves(output) if isinstance(t, torch.Tensor)), None)
        if first_in is not None and first_out is not None and first_in.dim() > 1:
            self.widths[module] = (first_in.shape[1], first_out.shape[1])
            self.labels.start(first_out, 1)

    def _count_attention(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.order.setdefault(module, len(self.order))
        adapter = attention_adapter(module)
        assert adapter is not None
        self.attention_units[module] += adapter.matmul_unit(module, args[0])
        self.labels.start(output, -1)

    def _channelwise(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.channels.setdefault(module, channels_of(output))
        self.labels.start(output, channelwise_dim(module, output))

    def _count_macs(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.order.setdefault(module, len(self.order))
        self.labels.start(output, -1 if isinstance(module, nn.Linear) else 1)  # sealed or not
        w = module.weight
        if isinstance(module, nn.Linear):
            self.mac_units[module] += output.numel() // output.shape[-1]
            return
        transposed = getattr(module, "transposed", False)
        positions = (args[0] if transposed else output).shape
        self.mac_units[module] += prod(positions[:1]) * prod(positions[2:]) * prod(w.shape[2:])


def channel_dim(ndim: int, tokens_last: bool) -> int:
    """Torch-Pruning's convention: channels are dim 1, except in (batch, tokens, dim) tensors."""
    return -1 if ndim == 3 and tokens_last else 1


def meets_constant(rec: OpRecord, tokens_last: bool) -> bool:
    """Whether an element-wise op combines channels with a tensor that cannot be pruned."""
    if len(rec.output) < 2:
        return False
    width = rec.output[channel_dim(len(rec.output), tokens_last)]
    return width > 1 and any(
        len(s) >= 2 and s[channel_dim(len(s), tokens_last)] == width for s in rec.constants
    )


class _Sealed(torch.autograd.Function):
    """Runs a layer's forward as one autograd node: its internals leave no trace. The layer's
    own parameters follow its ``n`` arguments, unused: they give the output autograd history
    where the input has none (a weight-standardising conv reading the model input)."""

    @staticmethod
    def forward(ctx: Any, forward: Callable[..., torch.Tensor], n: int, *args: Any) -> torch.Tensor:
        return forward(*args[:n]).clone()  # never a view of an input

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        raise RuntimeError("a sealed layer is only ever traced, never trained")


def _sealed_call(
    module: nn.Module, forward: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
) -> torch.Tensor:
    params = tuple(module.parameters(recurse=False))
    return _Sealed.apply(functools.partial(forward, **kwargs), len(args), *args, *params)


@contextmanager
def sealed(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Hide the internals of ``modules`` from an autograd trace for the duration.

    Torch-Pruning follows the autograd graph; through an attention layer's reshapes and splits
    it would couple the wrong channels. A sealed layer is one node from its input to its
    output (its hooks and sublayers still run, so MACs are still counted).
    """
    with patched_forwards({m: functools.partial(_sealed_call, m, m.forward) for m in modules}):
        yield
