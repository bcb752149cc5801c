"""Per-group filter statistics shared by the weight-based criteria, cached on the group.

A group channel's *filter* is the concatenation of what every producing layer of the group
(conv, depthwise conv or linear whose outputs are the group's channels) computes it with: the
rows ``weight[c]`` of all of them, flattened. On a residual stage that joins the filters of
every block's last conv, so the whole coupled set is judged at once. Consumers' input slices
and norm parameters are left out, as in the filter-pruning papers (L1, FPGM, LAASP); BatchNorm
scales have their own criterion.

Every weight-based criterion needs only two things of that concatenation: per-channel L1 norms
and the Gram matrix (all pairwise dot products: L2 norms, distances and cosines follow). Both
are sums over producers, so no concatenated copy is ever built, and one matrix product per
producer serves every Gram-based criterion, however long the filters are; each is cached on
its own (L1 needs no Gram). The cache key holds each weight's version counter, so training or
pruning in between invalidates it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import AutopruneError
from ..graph import ChannelGroup, Member
from ..graph.custom import filter_rows

PRODUCER_KINDS = ("conv", "depthwise", "linear", "custom")


def _weight(member: Member) -> torch.Tensor:
    """The member's weight, output channels first."""
    w = filter_rows(member.module)  # a user's registered layer: its output-channel tensors
    w = member.module.weight.detach() if w is None else w
    return w.transpose(0, 1) if getattr(member.module, "transposed", False) else w


def _rows(member: Member, channels: int) -> torch.Tensor | None:
    """The member's weight rows, ordered by group channel: (channels, k * d), or None."""
    w = _weight(member)
    ordered = torch.arange(channels)
    whole = w.shape[0] == channels  # else a slice of it: a depthwise conv after a concat
    if whole and torch.equal(member.group_idxs, ordered) and torch.equal(member.idxs, ordered):
        return w.reshape(channels, -1)  # the usual case: a view, no copy
    counts = torch.bincount(member.group_idxs, minlength=channels)
    if not bool((counts == counts[0]).all()):
        return None  # a channel slice: not every group channel has rows here
    order = torch.argsort(member.group_idxs, stable=True)
    return w[member.idxs[order].to(w.device)].reshape(channels, -1)


def filter_l1(group: ChannelGroup) -> torch.Tensor:
    """L1 norm per channel of the concatenated producer filters (float64), from the producers
    that give every group channel the same number of rows. Where none does (Res2NeXt's
    grouped convs on split pieces), each channel's L1 is that of all the rows it owns."""

    def even(member: Member, channels: int) -> torch.Tensor | None:
        rows = _rows(member, channels)
        return None if rows is None else rows.abs().sum(dim=1).cpu().double()

    def owned(member: Member, channels: int) -> torch.Tensor:
        w = _weight(member)
        per_row = w.reshape(w.shape[0], -1).abs().sum(dim=1)[member.idxs.to(w.device)]
        total = torch.zeros(channels, dtype=torch.float64)
        return total.index_add_(0, member.group_idxs, per_row.cpu().double())

    found = _cached(group, "l1", even)
    return found if found is not None else _required(group, _cached(group, "l1.owned", owned))


def filter_gram(group: ChannelGroup) -> torch.Tensor:
    """Float64 Gram matrix of the concatenated producer filters: its own cache entry, since
    it costs ``channels**2 * filter length`` (a wide RegNet stage: seconds) and L1 needs none."""

    def gram(member: Member, channels: int) -> torch.Tensor | None:
        rows = _rows(member, channels)
        return None if rows is None else (rows @ rows.T).cpu().double()

    return _required(group, _cached(group, "gram", gram))


def _required(group: ChannelGroup, value: torch.Tensor | None) -> torch.Tensor:
    if value is None:
        raise AutopruneError(f"group {group.name!r} has no weights to score its channels by")
    return value


def _cached(
    group: ChannelGroup,
    stat: str,
    per_producer: Callable[[Member, int], torch.Tensor | None],
) -> torch.Tensor | None:
    """``per_producer(member, channels)`` summed over the group's producers (None: none from
    that one, or from any), cached on the group."""
    producers = [m for m in group.members if m.out_channels and m.kind in PRODUCER_KINDS]
    key = tuple((id(p), p._version) for m in producers for p in m.module.parameters())
    cached = group.cache.get(f"filters.{stat}")
    if cached is not None and cached[0] == key:
        return cached[1]
    total: torch.Tensor | None = None
    for m in producers:
        value = per_producer(m, group.channels)
        if value is not None:
            total = value if total is None else total + value
    group.cache[f"filters.{stat}"] = (key, total)
    return total
