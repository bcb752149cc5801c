"""Where each channel goes: channel labels replayed through reshapes, permutes and einops.

Torch-Pruning carries a channel index unchanged through every op it does not know (a permute,
a view, an einops ``rearrange``). That is right when the op keeps each channel whole, in
order, in the dim its next layer reads, and silently wrong otherwise. To know which, every
traced tensor gets a *label*: a tensor of its shape whose entries say which channel of the
last layer that Torch-Pruning maps (a conv, a linear, a concat, ...) they came from. Labels
are replayed through the same ops as the activations (a permute of a label is the permute of
the activation's channels), stored compressed (one entry along every dim they do not vary
in) and checked where a layer reads channels: there the label must be ``0, 1, ..., C-1``
along the layer's channel dim and constant along the others (or, feeding a linear from a
flattened map, each channel repeated ``s`` times in a row: Torch-Pruning's flatten rule; or
any permutation of them, a channel shuffle: see ``._shuffle``). Anything else is a *break*:
the groups around it are frozen by the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ._shuffle import Permuted

Key = tuple[Any, int]  # (grad_fn, output_nr): one traced tensor

# Ops whose output entries are entries of their input, rearranged: replayed on the label.
MOVES = {
    "view",
    "reshape",
    "_reshape_alias",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "swapaxes",
    "swapdims",
    "movedim",
    "moveaxis",
    "contiguous",
    "clone",
    "squeeze",
    "unsqueeze",
    "t",
    "T",
    "mT",
    "expand",
    "expand_as",
    "repeat",
    "roll",
    "flip",
    "adaptive_avg_pool2d",
    "avg_pool2d",
    "max_pool2d",
    "adaptive_max_pool2d",
    "mean",
    "amax",
    "interpolate",
    "pad",
    "pixel_shuffle",
    "pixel_unshuffle",
    "narrow",
    "__getitem__",
    "dropout",
    "identity",
    "float",
    "to",
    "type_as",
    "index_select",
    "select",
}
# Layers that read channels along dim 1 (``FIRST``) or the last dim (``LAST``) and write new
# ones there: the label is checked at their input and starts afresh at their output.
MIXES_FIRST = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d"}
MIXES_LAST = {"linear", "embedding"}
# Per-channel layers: the label is checked at the input and passes through.
PER_CHANNEL_FIRST = {"batch_norm", "group_norm", "instance_norm", "prelu"}
PER_CHANNEL_LAST = {"layer_norm", "rms_norm"}
# Ops Torch-Pruning maps itself (concat and split offsets, slices): a fresh label after them.
# Moves that may select a part of the channels (by bounds fixed in the code).
SELECTS = {"__getitem__", "narrow", "index_select", "select"}
# Same-shape ops that mix entries along one dim: a break when that dim holds the channels.
ALONG_DIM = {"softmax", "log_softmax", "cumsum", "cumprod", "normalize", "logsumexp"}
MAPPED = {"cat", "concat", "concatenate", "split", "chunk", "split_with_sizes", "tensor_split"}


@dataclass(frozen=True)
class Break:
    """A place where channels are not carried one to one into the layer that reads them."""

    grad_fn: Any  # the traced tensor (its autograd node) where they are lost
    op: str
    detail: str


def fresh(shape: torch.Size, dim: int) -> torch.Tensor:
    """The label of a layer's own output: channel ``c`` at index ``c`` of ``dim``."""
    dim = dim % len(shape)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return torch.arange(shape[dim], dtype=torch.float64).view(view)


def compress(label: torch.Tensor) -> torch.Tensor:
    """The label with every dim it is constant along reduced to size 1 (expand it back)."""
    for d in range(label.dim()):
        if label.shape[d] > 1:
            first = label.narrow(d, 0, 1)
            if bool((label == first).all()):
                label = first
    return label.contiguous()


def reading(label: torch.Tensor, dim: int) -> tuple[str, int] | None:
    """How a layer reading ``dim`` sees the label: ``("identity", 1)``, ``("flatten", s)``,
    ``("unflatten", s)`` (each channel read is ``s`` channels of the labelled layer, in order
    along the other dims: a linear's rows viewed as a feature map), or None when channels are
    mixed into other dims or out of order."""
    dim = dim % label.dim()
    if any(label.shape[d] > 1 for d in range(label.dim()) if d != dim):
        return _unflatten(label, dim)
    values = label.flatten()
    n = values.numel()
    if n == 0:
        return None
    ids = torch.arange(n, dtype=values.dtype)
    if torch.equal(values, ids):
        return ("identity", 1)
    # each channel repeated s times in a row (a flattened feature map into a linear layer)
    for s in range(2, n + 1):
        if n % s == 0 and torch.equal(values, torch.div(ids, s, rounding_mode="floor")):
            return ("flatten", s)
        if values[s - 1] != 0:
            break
    return None


def _fewer(selected: torch.Tensor, label: torch.Tensor) -> bool:
    """Whether a selection dropped some of the channels the label holds."""
    return compress(selected).unique().numel() < compress(label).unique().numel()


def _pads_uniform(label: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether ``F.pad`` grows only dims the label is constant along (the token grid of a
    channels-last map): pruning a channel removes its border too, so its label carries over."""
    pad = kwargs.get("pad", args[1] if len(args) > 1 else None)
    if not isinstance(pad, (list, tuple)):
        return False
    label = compress(label)
    grown = {label.dim() - 1 - k // 2 for k, p in enumerate(pad) if p}
    return all(0 <= d < label.dim() and label.shape[d] == 1 for d in grown)


def _varying(label: torch.Tensor) -> list[int]:
    """The dims a compressed label varies along."""
    return [d for d in range(label.dim()) if label.shape[d] > 1]


def _permutation(label: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The channel order a layer reading ``dim`` sees, when it is a permutation (a shuffle)."""
    if _varying(label) != [dim % label.dim()]:
        return None
    values = label.flatten()
    order = values.long()
    ids = torch.arange(values.numel())
    if not torch.equal(order.to(values), values) or not torch.equal(order.sort().values, ids):
        return None
    return order


def _unflatten(label: torch.Tensor, dim: int) -> tuple[str, int] | None:
    values = label.movedim(dim, 0).flatten()
    if label.shape[dim] < 2 or not torch.equal(values, torch.arange(values.numel()).to(values)):
        return None
    return ("unflatten", values.numel() // label.shape[dim])


class ChannelLabels:
    """Labels of the traced tensors, updated op by op (driven by the trace recorder)."""

    def __init__(self) -> None:
        self.labels: dict[Key, torch.Tensor] = {}
        self.made_by: dict[Any, str] = {}  # grad_fn -> the op that moved its channels last
        self.breaks: list[Break] = []
        self.flattens: dict[Any, int] = {}  # grad_fn of a linear's input -> repeat factor
        self.unflattens: dict[Any, int] = {}  # grad_fn of a conv's input -> rows per channel
        self.splits: dict[Any, list[int]] = {}  # channel splits: grad_fn -> piece sizes
        self.orders: dict[Any, Permuted] = {}  # permuted reads (shuffles): grad_fn -> order
        # tensors whose channels a reshape split into rows: (that reshape, row length)
        self.factored: dict[Key, tuple[Any, int]] = {}
        # channel concats: grad_fn -> (input grad_fn, output_nr) per input, in order; widths
        self.concats: dict[Any, list[tuple[Any, int]]] = {}
        self.concat_widths: dict[Any, list[int]] = {}

    # --------------------------------------------------------------------------- lookups
    def get(self, t: Any) -> torch.Tensor | None:
        if not isinstance(t, torch.Tensor) or t.grad_fn is None:
            return None
        label = self.labels.get((t.grad_fn, t.output_nr))
        return None if label is None else label.expand(t.shape)

    def set(self, t: torch.Tensor, label: torch.Tensor, op: str | None = None) -> None:
        if t.grad_fn is not None:
            self.labels[(t.grad_fn, t.output_nr)] = compress(label)
            if op is not None:
                self.made_by[t.grad_fn] = op

    def start(self, t: torch.Tensor, dim: int) -> None:
        """``t`` holds channels of its own along ``dim`` (a layer's output)."""
        if t.grad_fn is not None and t.dim() > 0:
            self.labels[(t.grad_fn, t.output_nr)] = fresh(t.shape, dim)

    # ---------------------------------------------------------------------------- ops
    def snapshot(self, args: tuple, kwargs: dict) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The operands of an op and their labels, taken before it runs (an in-place op gives
        its operand a new autograd node)."""
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        return [(t, self.get(t)) for t in leaves]

    def record(
        self, func: Callable, name: str, args: tuple, kwargs: dict, out: Any, before: list
    ) -> None:
        """Update the labels for one traced op (``out`` its result, ``before`` its snapshot)."""
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs or all(t.grad_fn is None for t in outs):
            return
        leaves = [t for t, _ in before]
        labelled = [(t, lab) for t, lab in before if lab is not None]
        first = before[0][1] if before else None
        if name in MIXES_FIRST or name in MIXES_LAST:
            dim = 1 if name in MIXES_FIRST else -1
            if name != "embedding" and leaves:
                self._check(leaves[0], first, dim, name)
            for t in outs:
                self.start(t, dim)
            return
        if name in PER_CHANNEL_FIRST or name in PER_CHANNEL_LAST:
            dim = 1 if name in PER_CHANNEL_FIRST else -1
            if leaves and self._check(leaves[0], first, dim, name):
                self.set(outs[0], first)  # type: ignore[arg-type]
            else:
                self.start(outs[0], dim)
            return
        if not labelled:
            return
        if name in MAPPED:
            self._mapped(func, name, args, kwargs, outs, labelled)
            return
        if name == "pad" and _pads_other_dims(labelled[0][1], args, kwargs):
            self.set(outs[0], labelled[0][1], name)  # zeros added along the tokens
            return
        if name in MOVES:
            self._replay(func, name, args, kwargs, outs, labelled)
            return
        if name in ALONG_DIM:
            dim = _dim_arg(name, args, kwargs)
            label = compress(labelled[0][1])
            if label.dim() and label.shape[dim % label.dim()] > 1:
                self.breaks.append(Break(outs[0].grad_fn, name, "it mixes channels"))
                return
        self._elementwise(name, outs, labelled)

    def _check(self, t: torch.Tensor, label: torch.Tensor | None, dim: int, op: str) -> bool:
        if label is None:
            return False
        how = reading(compress(label), dim)
        if how is None and (order := _permutation(compress(label), dim)) is not None:
            split_by, inner = self.factored.get((t.grad_fn, t.output_nr), (None, len(order)))
            self.orders[t.grad_fn] = Permuted(order, len(order) // inner, split_by)
            return True
        if how is None:
            culprit = self.made_by.get(t.grad_fn, op)
            self.breaks.append(Break(t.grad_fn, culprit, f"{op!r} reads them moved or mixed"))
            return False
        if how[0] == "flatten":
            self.flattens[t.grad_fn] = how[1]
        elif how[0] == "unflatten":
            self.unflattens[t.grad_fn] = how[1]
        return True

    def _replay(
        self, func: Callable, name: str, args: tuple, kwargs: dict, outs: list, labelled: list
    ) -> None:
        if name == "pad" and _pads_uniform(labelled[0][1], args, kwargs):
            self.set(outs[0], labelled[0][1], name)  # a border of tokens: each keeps its channel
            return
        swap = {id(t): lab for t, lab in labelled}
        try:
            with torch.no_grad():
                replayed = func(*_swap(args, swap), **_swap(kwargs, swap))
        except (RuntimeError, TypeError, ValueError, IndexError):
            self._elementwise(name, outs, labelled)
            return
        results = [r for r in tree_flatten(replayed)[0] if isinstance(r, torch.Tensor)]
        source, label = labelled[0]
        if name in SELECTS and results and _fewer(results[0], label):
            # x[:, a:b] keeps bounds written in the code; pruning would shift what it selects
            self.breaks.append(Break(outs[0].grad_fn, name, "it selects channels by position"))
            return
        factored = self.factored.get((source.grad_fn, source.output_nr))
        for t, r in zip(outs, results, strict=False):
            if r.shape == t.shape:
                self.set(t, r.to(torch.float64), name)
                rows = _varying(compress(r))
                if len(rows) > 1 and len(_varying(compress(label))) == 1:
                    factored = (t.grad_fn, int(r.shape[rows[-1]]))  # channels split into rows
                if factored is not None and rows:
                    self.factored[(t.grad_fn, t.output_nr)] = factored

    def _mapped(
        self, func: Callable, name: str, args: tuple, kwargs: dict, outs: list, labelled: list
    ) -> None:
        """Concat and split: along the labelled channel dim Torch-Pruning maps the offsets
        (the label starts afresh); along any other dim they move entries (replayed, with
        unlabelled operands, a class token say, taken as aligned with the labelled one)."""
        source, label = labelled[0]
        dims = [d for d in range(label.dim()) if compress(label).shape[d] > 1]
        dim = _dim_arg(name, args, kwargs) % source.dim()
        if dims in ([dim], []) or len(dims) > 1:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            for t, lab in labelled:  # Torch-Pruning maps offsets of channels kept in order
                self._check(t, lab, dim, name)
            if name in ("cat", "concat", "concatenate"):
                self.concats[outs[0].grad_fn] = [(t.grad_fn, t.output_nr) for t in tensors]
                self.concat_widths[outs[0].grad_fn] = [t.shape[dim] for t in tensors]
            else:
                self.splits[outs[0].grad_fn] = [t.shape[dim] for t in outs]
            for t in outs:
                self.start(t, dim)
            return
        known = {id(t) for t, _ in labelled}
        extra = [
            (t, fresh(t.shape, dims[0]))
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and id(t) not in known and t.dim() == source.dim()
        ]
        self._replay(func, name, args, kwargs, outs, labelled + extra)

    def _elementwise(self, name: str, outs: list, labelled: list) -> None:
        """An op that keeps every entry where it is: its operands' channels must agree."""
        out = outs[0]
        matching = []
        for _, lab in labelled:
            try:
                matching.append(lab.expand(out.shape))
            except RuntimeError:
                continue  # an operand reduced or reshaped by the op: not element-wise
        if len(matching) < len(labelled) and not matching:
            self.breaks.append(Break(out.grad_fn, name, "it mixes channels with other dims"))
            return
        first = matching[0]
        if any(not torch.equal(first, m) for m in matching[1:]):
            self.breaks.append(Break(out.grad_fn, name, "it combines different channels"))
            return
        if len(matching) < len(labelled):
            self.breaks.append(Break(out.grad_fn, name, "it mixes channels with other dims"))
            return
        for t in outs:
            if t.shape == out.shape:
                self.set(t, first)


def _swap(tree: Any, swap: dict[int, torch.Tensor]) -> Any:
    return tree_map(lambda x: swap.get(id(x), x) if isinstance(x, torch.Tensor) else x, tree)


def _dim_arg(name: str, args: tuple, kwargs: dict) -> int:
    """The ``dim`` argument of a concat, split or along-a-dim op (its default: 0)."""
    if "dim" in kwargs:
        return int(kwargs["dim"])
    position = 1 if name in ("cat", "concat", "concatenate") or name in ALONG_DIM else 2
    return int(args[position]) if len(args) > position else 0


def _pads_other_dims(label: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether an ``F.pad`` only grows dims the label is constant along (a window padding of
    channels-last tokens): every channel stays where it is, padded positions included. A
    replayed pad would write its fill value into the label there, as if channels moved."""
    pad = kwargs.get("pad", args[1] if len(args) > 1 else None)
    if not isinstance(pad, (tuple, list)):
        return False
    compressed = compress(label)
    grown = [label.dim() - 1 - k // 2 for k, p in enumerate(pad) if p]
    return all(compressed.shape[d] == 1 for d in grown)
