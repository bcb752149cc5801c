"""Per-group weight matrices shared by the weight-based criteria, cached on the group.

A group channel's *filter* is the concatenation of what every producing layer of the group
(conv, depthwise conv or linear whose outputs are the group's channels) computes it with: the
rows ``weight[c]`` of all of them, flattened. On a residual stage that joins the filters of
every block's last conv, so the whole coupled set is judged at once. Consumers' input slices
and norm parameters are left out, as in the filter-pruning papers (L1, FPGM, LAASP); BatchNorm
scales have their own criterion. The cache key holds each weight's version counter, so
training or pruning in between invalidates it.
"""

from __future__ import annotations

import torch

from ..errors import AutopruneError
from ..graph import ChannelGroup, Member

PRODUCER_KINDS = ("conv", "depthwise", "linear")


def _rows(member: Member, channels: int) -> torch.Tensor | None:
    """The member's weight rows, ordered by group channel: (channels, k * d), or None."""
    w = member.module.weight.detach()
    if getattr(member.module, "transposed", False):
        w = w.transpose(0, 1)
    counts = torch.bincount(member.group_idxs, minlength=channels)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        return None  # a channel slice: not every group channel has rows here
    order = torch.argsort(member.group_idxs, stable=True)
    return w[member.idxs[order].to(w.device)].reshape(channels, -1)


def filter_matrix(group: ChannelGroup) -> torch.Tensor:
    """(channels, features) matrix of every channel's concatenated producer filters."""
    producers = [m for m in group.members if m.out_channels and m.kind in PRODUCER_KINDS]
    key = tuple((id(m.module.weight), m.module.weight._version) for m in producers)
    cached = group.cache.get("filters")
    if cached is not None and cached[0] == key:
        return cached[1]
    parts = [r for m in producers if (r := _rows(m, group.channels)) is not None]
    if not parts:
        raise AutopruneError(f"group {group.name!r} has no weights to score its channels by")
    matrix = torch.cat([p.to(parts[0].dtype) for p in parts], dim=1)
    group.cache["filters"] = (key, matrix)
    return matrix
