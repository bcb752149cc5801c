"""Parameters that live outside conv, linear and norm layers: layer scales (``gamma``), a ViT's
``cls_token`` / ``pos_embed`` / ``dist_token``, a user's per-channel ``scale`` and ``bias``.

Torch-Pruning traces such a parameter as an "unwrapped parameter" and slices its last
non-singleton dim with the channels it meets. That is right only where the parameter meets
them element-wise (``x * gamma``, ``x + pos_embed``, ``cat((cls_token, x), dim=1)``), possibly
after a view or an expand, and where no other dim of it could be the channels. Each traced
parameter is checked here; one used any other way (a matmul, a conv weight, an index) freezes
the groups it is coupled with, and the rest of the model still prunes. A parameter the forward
never uses is not traced and is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ._trace import OpRecord, TraceRecorder, channel_dim

# Ops through which a parameter reaches the channels unchanged (a view of it, broadcast).
_PASS_THROUGH = frozenset(
    {"view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as", "broadcast_to",
     "flatten", "contiguous", "clone", "to", "type", "float", "half", "bfloat16"}
)  # fmt: skip
# Functions of one element: a gate's ``sigmoid(alpha)`` keeps every channel where it is.
_UNARY = frozenset(
    {"sigmoid", "tanh", "exp", "log", "neg", "abs", "relu", "softplus", "sqrt", "rsqrt",
     "reciprocal", "__neg__", "__abs__"}
)  # fmt: skip
# Indexing; passed through only where it picks along leading dims, keeping the channels whole.
_INDEXING = frozenset({"__getitem__", "select"})
# Ops that combine a parameter with the channels one to one.
_ELEMENTWISE = frozenset(
    {"add", "sub", "mul", "div", "addcmul", "addcdiv", "cat", "concat", "where", "lerp",
     "maximum", "minimum", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__",
     "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__",
     "__itruediv__", "add_", "sub_", "mul_", "div_"}
)  # fmt: skip


@dataclass(frozen=True)
class ParamUse:
    """A traced parameter: its name, the module owning it, and why it cannot lose channels
    (None: it is pruned with the channels it meets)."""

    name: str
    owner: nn.Module
    problem: str | None


def parameter_uses(
    dg: tp.DependencyGraph, recorder: TraceRecorder, model: nn.Module
) -> dict[str, ParamUse]:
    """Every unwrapped parameter of the trace, by name (pruning replaces the tensor), and
    whether it meets channels element-wise."""
    tokens_last = not dg._2d_4d
    uses: dict[str, ParamUse] = {}
    for node in dg.module2node.values():
        param = node.module
        if not isinstance(param, nn.Parameter):
            continue
        name = dg._param_to_name[param]
        owner = model.get_submodule(name.rpartition(".")[0])
        problem = _problem(node, param, recorder, tokens_last)
        uses[name] = ParamUse(name, owner, problem)
    return uses


def _problem(
    node: tp.dependency.Node, param: nn.Parameter, recorder: TraceRecorder, tokens_last: bool
) -> str | None:
    dim = node.pruning_dim
    stack, seen = list(node.outputs), set()
    while stack:
        op = stack.pop()
        if op in seen:
            continue
        seen.add(op)
        rec = recorder.ops.get(op.grad_fn)
        name = rec.name if rec is not None else type(op.grad_fn).__name__
        through = name in _PASS_THROUGH or name in _UNARY
        if isinstance(op.module, tp.ops._ReshapeOp) or through or _leading_pick(rec, param, dim):
            stack.extend(op.outputs)
            continue
        if name not in _ELEMENTWISE or rec is None or len(rec.output) < 2:
            return f"it is used in {name!r}, not element-wise with the channels"
        width = rec.output[channel_dim(len(rec.output), tokens_last)]
        shape = tuple(param.shape)
        if dim is None or shape[dim] != width:
            return f"none of its dims {shape} is the {width} channels it meets in {name!r}"
        if shape.count(width) > 1:
            return f"more than one of its dims {shape} could be the {width} channels"
    return None


def _leading_pick(rec: OpRecord | None, param: nn.Parameter, dim: int | None) -> bool:
    """``alpha[0]`` of a ``(4, C, 1, 1)`` gate: the output is the operand without some leading
    dims, and the parameter's channels are still among its dims (EfficientViM's gates)."""
    if rec is None or rec.name not in _INDEXING or len(rec.operands) != 1 or dim is None:
        return False
    shape, out = tuple(rec.operands[0]), tuple(rec.output)
    cut = len(shape) - len(out)
    return cut >= 1 and shape[cut:] == out and param.shape[dim] in out


def drop_derived_caches(model: nn.Module) -> None:
    """Empty the dicts in which layers cache tensors computed from their parameters (timm's
    LeViT keeps ``attention_biases[:, idxs]`` per device in eval mode). Filled while tracing,
    they hold autograd history (no deepcopy) and, after pruning, tensors of the old shape."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, dict) and any(
                isinstance(v, torch.Tensor) and v.grad_fn is not None for v in value.values()
            ):
                value.clear()
