"""Unstructured weight masks: the finest granularity, zeros inside the remaining layers.

A masked layer keeps its dense ``weight`` (with zeros where the mask is off) and a boolean
``weight_mask`` buffer of the same shape, so the model stays a plain module: it runs,
exports and saves like a dense one, and ``autoprune.io`` stores the mask in safetensors. What
keeps the zeros zero while training is :func:`masks_held`: after every optimizer step (any
optimizer, any training loop inside it) the masks are applied again, so a masked weight is
zero at every forward pass and after the last step. Zeros save no dense MACs:
:func:`sparse_macs` estimates what a sparse kernel would compute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ._rules import CONV_TYPES

MASK = "weight_mask"
WEIGHT_TYPES = (*CONV_TYPES, nn.Linear)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The conv and linear layers whose weights may be masked, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)}


def attach_mask(module: nn.Module) -> torch.Tensor:
    """The layer's mask, created all on (nothing masked) when it has none yet."""
    mask = getattr(module, MASK, None)
    if mask is None:
        weight = module.weight
        mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        module.register_buffer(MASK, mask)
    return mask


def mask_weights(module: nn.Module, idxs: torch.Tensor) -> None:
    """Mask the weights at flat positions ``idxs`` (in the weight's logical order), for good."""
    mask = attach_mask(module)
    flat = mask.reshape(-1).clone()  # logical order, whatever the memory format
    flat[idxs.to(mask.device)] = False
    mask.copy_(flat.view(mask.shape))
    apply_mask(module)


@torch.no_grad()
def apply_mask(module: nn.Module) -> None:
    module.weight.masked_fill_(~getattr(module, MASK), 0.0)


@contextmanager
def zeroed(module: nn.Module, idxs: torch.Tensor) -> Iterator[None]:
    """The weights at ``idxs`` zero for the duration, as if masked: a trial removal."""
    weight = module.weight
    saved = weight.detach().clone()
    off = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    off[idxs.to(weight.device)] = True
    off = off.view(weight.shape)
    with torch.no_grad():
        weight.masked_fill_(off, 0.0)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if getattr(m, MASK, None) is not None}


@contextmanager
def masks_held(model: nn.Module) -> Iterator[None]:
    """Re-apply ``model``'s masks after every optimizer step taken inside the block."""
    layers = list(masked_layers(model).values())
    if not layers:
        yield
        return

    def reapply(*_: object) -> None:
        for module in layers:
            apply_mask(module)

    handle = register_optimizer_step_post_hook(reapply)
    try:
        yield
    finally:
        handle.remove()


def restore_weights(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Load ``saved`` (a state dict taken before some masking) into ``model``: weights and
    masks as they were, and the masks made since then gone."""
    for name, module in masked_layers(model).items():
        if f"{name}.{MASK}".lstrip(".") not in saved:
            del module._buffers[MASK]
    model.load_state_dict(saved)


def masked_count(model: nn.Module) -> tuple[int, int]:
    """(masked weights, all weights) of the conv and linear layers."""
    masked = total = 0
    for module in weight_layers(model).values():
        total += module.weight.numel()
        mask = getattr(module, MASK, None)
        if mask is not None:
            masked += int((~mask).sum())
    return masked, total


@torch.no_grad()
def sparse_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...], dense_macs: int) -> int:
    """``dense_macs`` less what the masked weights compute: a zero weight of a conv saves one
    MAC per output position of its channel, of a linear layer one per token."""
    saved = 0
    handles = []

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal saved
        channels = out.shape[1] if isinstance(module, CONV_TYPES) else out.shape[-1]
        saved += out.numel() // channels * int((~getattr(module, MASK)).sum())

    for module in masked_layers(model).values():
        if not getattr(module, "transposed", False):
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return dense_macs - saved
