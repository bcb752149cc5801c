"""MACs and parameter counts.

MACs come from PyTorch's own ``FlopCounterMode`` (FLOPs / 2), which counts convolutions,
linear layers and matmuls, including the fused ``scaled_dot_product_attention``; element-wise
ops, norms and biases are not counted, as in the papers we compare with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .._forward import eval_mode

Inputs = torch.Tensor | Sequence[torch.Tensor]


# On the CPU, scaled_dot_product_attention dispatches to a kernel that torch's counter has no
# formula for (it would count 0); it computes the same two matmuls as the GPU kernels.
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def as_inputs(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """MACs of one forward pass on ``example_inputs`` (per image when the batch is 1).

    Runs in eval mode so BatchNorm statistics are not touched; the model's mode is restored.
    Parameters are counted as constants: the counter's module tracker hooks the gradients of
    any module input that requires them, and fails on a parameter fed to a module as it is
    (CaiT's class token).
    """
    needs_grad = [p for p in model.parameters() if p.requires_grad]
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    try:
        for p in needs_grad:
            p.requires_grad_(False)
        with eval_mode(model), counter:
            model(*as_inputs(example_inputs))
    finally:
        for p in needs_grad:
            p.requires_grad_(True)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module, *, nonzero: bool = False) -> int:
    """Parameter count; ``nonzero=True`` counts only non-zero entries (sparse weights)."""
    params = model.parameters()
    if nonzero:
        return sum(int(torch.count_nonzero(p)) for p in params)
    return sum(p.numel() for p in params)
