"""Attention layers as the pruning graph sees them.

To Torch-Pruning an attention layer is one opaque layer (its trace is hidden, see
:func:`~._trace.sealed`) whose input width (the ``qkv`` linear's inputs) and output width
(the ``proj`` linear's outputs) are separate dependencies, like a linear layer's: so the
embedding width is coupled through the residual stream as usual, and :class:`AttentionPruner`
slices ``qkv``'s columns and ``proj``'s rows. What happens between ``qkv`` and ``proj`` is ours:
every attention layer adds up to three groups of its own (:func:`attention_groups`):

- ``heads``: whole heads (their q, k and v rows of ``qkv`` and their ``proj`` columns, plus
  per-head parameters such as attention biases), ``num_heads`` updated;
- ``head_dim``: the same query/key dimensions of every head (and value dimensions where an
  implementation has one size for all three), ``head_dim`` updated;
- ``value_dim``: the same value dimensions of every head.

Masking zeroes the chosen ``qkv`` outputs (and ``proj`` inputs): a head whose q, k and v are
zero adds exactly nothing, and a zero query/key dimension adds nothing to any logit, so masked
equals pruned as long as the softmax scale stays the trained one, which every supported layer
keeps as an attribute. An adapter per implementation (:data:`ADAPTERS`, foreign classes by
name) says how its rows are laid out and which attributes its reshapes read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch_pruning as tp
from torch import nn

from ..attention import MultiHeadAttention
from ..errors import AutopruneError
from .groups import ChannelGroup, MacTable, Member

HEAD_KINDS = ("heads", "head_dim", "value_dim")


@dataclass(frozen=True)
class HeadShape:
    """Heads and per-head widths of an attention layer (queries and keys share ``qk_dim``)."""

    num_heads: int
    qk_dim: int
    v_dim: int


class AttentionAdapter:
    """How pruning reads and changes one attention implementation.

    Every supported layer computes ``proj(attention(split(qkv(x))))`` with two linears named
    ``qkv`` and ``proj``, and keeps its softmax scale fixed.
    ``head_major``: ``qkv`` rows are ``[q k v]`` per head (EfficientFormer) rather than
    ``[q | k | v]``, each of ``num_heads`` blocks. ``tied``: one size for q, k and v (the
    ``head_dim`` group then removes value dimensions too). ``per_head``: parameters with one
    entry per head along dim 0. ``attributes``: what :meth:`set_shape` writes (saving a pruned
    model records them).
    """

    head_major = False
    tied = False
    per_head: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()

    def shape(self, m: nn.Module) -> HeadShape:
        raise NotImplementedError

    def set_shape(self, m: nn.Module, shape: HeadShape) -> None:
        raise NotImplementedError

    def kinds(self, m: nn.Module) -> tuple[str, ...]:
        """The head groups whose masking is exactly their removal in this layer."""
        return HEAD_KINDS[:2] if self.tied else HEAD_KINDS

    def check(self, m: nn.Module) -> None:
        """Refuse a configuration whose embedding width cannot be pruned by qkv and proj alone."""

    def drop_heads(self, m: nn.Module, heads: torch.Tensor) -> None:
        """Remove the per-head parameters of ``heads`` (``qkv`` and ``proj`` are done)."""
        for name in self.per_head:
            slice_parameter(m, name, 0, heads)

    def head_members(self, name: str, m: nn.Module) -> list[Member]:
        """Layers (other than ``qkv`` and ``proj``) with one output per head, so the MACs
        of the ``heads`` group count them; :meth:`drop_heads` cuts them."""
        return []

    def matmul_unit(self, m: nn.Module, x: torch.Tensor) -> int:
        """MACs of ``q @ k^T`` per query/key feature (:class:`~.groups.MacTable`) on input ``x``:
        batch x tokens^2 for global attention over ``(batch, tokens, dim)``."""
        batch, tokens = x.shape[:2]
        return batch * tokens * tokens


ADAPTERS: dict[type[nn.Module] | str, AttentionAdapter] = {}


Adapter = type[AttentionAdapter]


def register_attention(*keys: type[nn.Module] | str) -> Callable[[Adapter], Adapter]:
    """Register an :class:`AttentionAdapter` subclass for classes or "module.QualName" names."""

    def decorator(cls: Adapter) -> Adapter:
        for key in keys:
            ADAPTERS[key] = cls()
        return cls

    return decorator


def attention_adapter(module: nn.Module) -> AttentionAdapter | None:
    """The adapter of ``module``'s class (or a base class), None for other layers."""
    for cls in type(module).__mro__:
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
            if key in ADAPTERS:
                return ADAPTERS[key]
    return None


def is_attention(module: nn.Module) -> bool:
    return attention_adapter(module) is not None


@register_attention(MultiHeadAttention)
class _Ours(AttentionAdapter):
    attributes = ("num_heads", "head_dim", "value_dim")

    def shape(self, m: nn.Module) -> HeadShape:
        return HeadShape(m.num_heads, m.head_dim, m.value_dim)

    def set_shape(self, m: nn.Module, shape: HeadShape) -> None:
        m.num_heads, m.head_dim, m.value_dim = shape.num_heads, shape.qk_dim, shape.v_dim


@register_attention("timm.layers.attention.Attention")
class _TimmAttention(AttentionAdapter):
    """timm's ViT attention: one ``head_dim`` for q, k and v; its fused kernel takes the scale
    from the current head size, so head dimensions are pruned only where it runs unfused."""

    tied = True
    attributes = ("num_heads", "head_dim", "attn_dim")

    def shape(self, m: nn.Module) -> HeadShape:
        return HeadShape(m.num_heads, m.head_dim, m.head_dim)

    def set_shape(self, m: nn.Module, shape: HeadShape) -> None:
        m.num_heads, m.head_dim = shape.num_heads, shape.qk_dim
        m.attn_dim = shape.num_heads * shape.qk_dim

    def kinds(self, m: nn.Module) -> tuple[str, ...]:
        plain = all(isinstance(getattr(m, n), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
        if not plain:
            return ()
        return ("heads",) if getattr(m, "fused_attn", False) else ("heads", "head_dim")

    def check(self, m: nn.Module) -> None:
        if getattr(m, "gate", None) is not None:
            raise AutopruneError(
                "gated timm attention is not supported: pass its name in ignored_layers"
            )


@register_attention("timm.layers.attention.AttentionRope")
class _TimmAttentionRope(_TimmAttention):
    """timm's RoPE attention (EVA, DeepSeek-ViT): the rotation mixes query/key dimension
    ``i`` with its partner, so only whole heads go; a zero head stays zero through the
    rotation and through per-head ``q_norm``/``k_norm`` (its values are zero)."""

    attributes = ("num_heads", "num_kv_heads", "head_dim", "attn_dim", "kv_dim")

    def set_shape(self, m: nn.Module, shape: HeadShape) -> None:
        super().set_shape(m, shape)
        m.num_kv_heads, m.kv_dim = shape.num_heads, m.attn_dim

    def kinds(self, m: nn.Module) -> tuple[str, ...]:
        return ("heads",) if isinstance(m.norm, nn.Identity) else ()

    def check(self, m: nn.Module) -> None:
        super().check(m)
        if m.qkv is None:
            raise AutopruneError(
                "timm RoPE attention with separate q/k/v projections is not supported: "
                "pass its name in ignored_layers"
            )


@register_attention("timm.models.efficientformer.Attention")
class _EfficientFormerAttention(AttentionAdapter):
    head_major = True
    per_head = ("attention_biases",)
    attributes = ("num_heads", "key_dim", "val_dim", "key_attn_dim", "val_attn_dim")

    def shape(self, m: nn.Module) -> HeadShape:
        return HeadShape(m.num_heads, m.key_dim, m.val_dim)

    def set_shape(self, m: nn.Module, shape: HeadShape) -> None:
        m.num_heads, m.key_dim, m.val_dim = shape.num_heads, shape.qk_dim, shape.v_dim
        m.key_attn_dim = shape.num_heads * shape.qk_dim
        m.val_attn_dim = shape.num_heads * shape.v_dim
        m.attention_bias_cache = {}  # biases of the old heads


# ----------------------------------------------------------------------------- row layout
def qkv_rows(
    shape: HeadShape, head_major: bool, part: int, heads: torch.Tensor, dims: torch.Tensor
) -> torch.Tensor:
    """``qkv`` rows of ``part`` (0 q, 1 k, 2 v) for every (head, dim) pair, head-major order."""
    h, dq, dv = shape.num_heads, shape.qk_dim, shape.v_dim
    if head_major:
        base = heads * (2 * dq + dv) + part * dq
    else:
        size = dv if part == 2 else dq
        base = part * h * dq + heads * size
    return (base[:, None] + dims[None, :]).flatten()


def proj_cols(shape: HeadShape, heads: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    return (heads[:, None] * shape.v_dim + dims[None, :]).flatten()


@dataclass(frozen=True)
class HeadSelection:
    """What one channel of a head group owns: ``qkv`` rows and ``proj`` columns."""

    rows: torch.Tensor
    cols: torch.Tensor


def owned(adapter: AttentionAdapter, shape: HeadShape, kind: str, channel: int) -> HeadSelection:
    """The rows and columns that channel ``channel`` of the ``kind`` group stands for."""
    c = torch.tensor([channel])
    heads = torch.arange(shape.num_heads)
    if kind == "heads":
        dims = [torch.arange(shape.qk_dim)] * 2 + [torch.arange(shape.v_dim)]
        rows = [qkv_rows(shape, adapter.head_major, p, c, d) for p, d in enumerate(dims)]
        return HeadSelection(torch.cat(rows), proj_cols(shape, c, dims[2]))
    if kind == "head_dim":
        parts = (0, 1, 2) if adapter.tied else (0, 1)
        rows = [qkv_rows(shape, adapter.head_major, p, heads, c) for p in parts]
        cols = proj_cols(shape, heads, c) if adapter.tied else torch.empty(0, dtype=torch.long)
        return HeadSelection(torch.cat(rows), cols)
    return HeadSelection(
        qkv_rows(shape, adapter.head_major, 2, heads, c), proj_cols(shape, heads, c)
    )


def group_size(shape: HeadShape, kind: str) -> int:
    return {"heads": shape.num_heads, "head_dim": shape.qk_dim, "value_dim": shape.v_dim}[kind]


# ---------------------------------------------------------------------------- pruning
def _keep(size: int, drop: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[drop] = False
    return keep.nonzero().flatten()


def slice_parameter(owner: nn.Module, name: str, dim: int, drop: torch.Tensor) -> None:
    tensor = getattr(owner, name)
    if tensor is None or not drop.numel():
        return
    keep = _keep(tensor.shape[dim], drop).to(tensor.device)
    new = tensor.detach().index_select(dim, keep).clone()
    setattr(owner, name, nn.Parameter(new, requires_grad=tensor.requires_grad))


@dataclass(frozen=True)
class HeadPruning:
    """The physical removal behind one head group (its ``ChannelGroup.root`` handler)."""

    kind: str

    def __call__(self, module: nn.Module, idxs: Sequence[int]) -> None:
        adapter = attention_adapter(module)
        assert adapter is not None
        shape = adapter.shape(module)
        picked = [owned(adapter, shape, self.kind, int(c)) for c in idxs]
        rows = torch.cat([p.rows for p in picked])
        cols = torch.cat([p.cols for p in picked])
        qkv, proj = module.qkv, module.proj
        slice_parameter(qkv, "weight", 0, rows)
        slice_parameter(qkv, "bias", 0, rows)
        slice_parameter(proj, "weight", 1, cols)
        qkv.out_features, proj.in_features = qkv.weight.shape[0], proj.weight.shape[1]
        n = len(idxs)
        if self.kind == "heads":
            adapter.drop_heads(module, torch.as_tensor(list(idxs), dtype=torch.long))
            shape = replace(shape, num_heads=shape.num_heads - n)
        elif self.kind == "head_dim":
            v_dim = shape.v_dim - n if adapter.tied else shape.v_dim
            shape = replace(shape, qk_dim=shape.qk_dim - n, v_dim=v_dim)
        else:
            shape = replace(shape, v_dim=shape.v_dim - n)
        adapter.set_shape(module, shape)


class AttentionPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning's view of an attention layer: ``qkv`` inputs in, ``proj`` outputs out."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        tp.pruner.function.prune_linear_out_channels(layer.proj, idxs)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        tp.pruner.function.prune_linear_in_channels(layer.qkv, idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.proj.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.qkv.in_features


# ----------------------------------------------------------------------------- groups
def attention_groups(
    name: str, module: nn.Module, macs: MacTable, version: int
) -> list[ChannelGroup]:
    """The head groups of attention layer ``name`` (those its adapter says are exact).

    Masking zeroes the ``qkv`` rows at its output (their only reader is the attention) and the
    ``proj`` columns at its input, as for any consumer.
    """
    adapter = attention_adapter(module)
    assert adapter is not None
    shape = adapter.shape(module)
    groups = []
    for kind in adapter.kinds(module):
        channels = group_size(shape, kind)
        if channels < 2:
            continue
        picked = [owned(adapter, shape, kind, c) for c in range(channels)]
        rows = torch.cat([p.rows for p in picked])
        cols = torch.cat([p.cols for p in picked])
        row_ids = torch.cat([torch.full((len(p.rows),), c) for c, p in enumerate(picked)])
        col_ids = torch.cat([torch.full((len(p.cols),), c) for c, p in enumerate(picked)])
        members = [
            Member(
                f"{name}.qkv",
                "linear",
                in_channels=False,
                out_channels=True,
                module=module.qkv,
                idxs=rows,
                group_idxs=row_ids,
                mask_output=True,
            )
        ]
        if cols.numel():
            members.append(
                Member(
                    f"{name}.proj",
                    "linear",
                    in_channels=True,
                    out_channels=False,
                    module=module.proj,
                    idxs=cols,
                    group_idxs=col_ids,
                )
            )
        if kind == "heads":
            members += adapter.head_members(name, module)
        root = (module, HeadPruning(kind))
        groups.append(ChannelGroup(f"{name}[{kind}]", members, channels, macs, root, version))
    return groups


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every attention layer of ``model`` that pruning knows, checked to be supported."""
    found = [m for m in model.modules() if is_attention(m)]
    for m in found:
        attention_adapter(m).check(m)  # type: ignore[union-attr]
    return found
