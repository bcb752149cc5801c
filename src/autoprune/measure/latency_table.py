"""Per-layer latency tables: each conv and linear layer timed alone at a few widths.

The NetAdapt / HALP habit: a layer's latency on the target depends on its shape (kernel,
stride, input size, batch) and its channel counts, so each distinct layer shape is rebuilt at
a few output widths (at full input width) and a few input widths (at full output width), and
timed in isolation on the backend, median of a few repeats. A layer is timed with the norm and
activation that alone consume its output in the model (:data:`FOLLOWERS`): ONNX Runtime fuses
them into the convolution, and eager runs them on the layer's output, where on large feature
maps they cost as much as the convolution itself. A layer at ``(cin, cout)`` is
then predicted as ``dense * r_out(cout) * r_in(cin)``, each ratio read at the nearest
measured width at or above: cheap to build (two short sweeps per distinct shape) and fine
enough to show the widths where a backend's kernels step.

Timers are a registry: one per latency backend (``eager``, ``onnxruntime``, ...), each
``(module, input shape without batch, batch size) -> median ms``; tests register a
deterministic one.
"""

from __future__ import annotations

import bisect
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .._registry import Registry
from .latency import BACKENDS, time_runner

# One median timing of a prepared model, in ms; called once per round.
Stopwatch = Callable[[], float]
# (module, input shape without the batch dimension, batch size) -> its stopwatch, prepared
# once (for a runtime of exported files: one export), so that rounds cost only timing.
Timer = Callable[[nn.Module, tuple[int, ...], int], Stopwatch]
TIMERS: Registry[Timer] = Registry("latency timer")


def _backend_timer(backend: str) -> Timer:
    def prepare(module: nn.Module, shape: tuple[int, ...], batch: int) -> Stopwatch:
        device = next(module.parameters()).device
        run = BACKENDS.get(backend)(module, torch.randn(1, *shape, device=device))

        def once() -> float:
            (lat,) = time_runner(
                run,
                shape,
                backend=backend,
                batch_sizes=(batch,),
                warmup=2,
                repeats=7,
                device=device,
            )
            return lat.median_ms

        return once

    return prepare


for _name in BACKENDS.names():
    TIMERS.register(_name)(_backend_timer(_name))


@dataclass(frozen=True)
class LayerShape:
    """What decides a conv or linear layer's latency apart from its channel counts."""

    kind: str  # "conv1d", "conv2d", "conv3d" or "linear"
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]  # without the batch; channels first (conv) or last (linear)
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    depthwise: bool = False  # groups == in == out: one width moves both sides
    bias: bool = True
    followers: tuple[str, ...] = ()  # FOLLOWERS keys of the modules run on the output, in order

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def build(self, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
        """A fresh layer of this shape at ``(cin, cout)``, with its followers, and its input
        shape."""
        layer, input_shape = self._layer(cin, cout)
        if not self.followers:
            return layer, input_shape
        return nn.Sequential(layer, *(build_follower(f, cout) for f in self.followers)), input_shape

    def _layer(self, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
        if self.kind == "linear":
            return nn.Linear(cin, cout, bias=self.bias), (*self.input_shape[:-1], cin)
        conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[self.kind]
        if self.depthwise:
            cin = cout
        layer = conv(
            cin,
            cout,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=cout if self.depthwise else 1,
            bias=self.bias,
        )
        return layer, (cin, *self.input_shape[1:])


# What may follow a layer in its table, by type name: norms (built at the layer's output
# width) and activations.
NORM_FOLLOWERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ACTIVATION_FOLLOWERS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.Mish)
FOLLOWERS: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in NORM_FOLLOWERS + ACTIVATION_FOLLOWERS
}


def build_follower(name: str, channels: int) -> nn.Module:
    cls = FOLLOWERS[name]
    return cls(channels) if cls in NORM_FOLLOWERS else cls()


def follower_name(module: nn.Module, layer: nn.Module) -> str | None:
    """The :data:`FOLLOWERS` key of ``module`` where it may follow ``layer`` in a table (None:
    it may not). Activations go after any layer, whatever their settings (the latency is the
    same); a BatchNorm only after a conv of its dimensions."""
    name = type(module).__name__
    if FOLLOWERS.get(name) is not type(module):
        return None
    if isinstance(module, NORM_FOLLOWERS):
        dims = len(getattr(layer, "kernel_size", ()))
        return name if dims and name.endswith(f"{dims}d") else None
    return name


def layer_shape(
    module: nn.Module, input_shape: tuple[int, ...], followers: tuple[str, ...] = ()
) -> LayerShape | None:
    """The shape record of a conv (not transposed, not grouped other than depthwise) or linear
    layer fed ``input_shape`` (without batch) and followed by ``followers``; None for any other
    layer (not modelled)."""
    if isinstance(module, nn.Linear):
        features = (module.in_features, module.out_features)
        return LayerShape(
            "linear", *features, input_shape, bias=module.bias is not None, followers=followers
        )
    if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return None
    depthwise = module.groups == module.in_channels == module.out_channels
    if module.groups != 1 and not depthwise:
        return None
    return LayerShape(
        f"conv{len(module.kernel_size)}d",
        module.in_channels,
        module.out_channels,
        input_shape,
        tuple(module.kernel_size),
        tuple(module.stride),
        module.padding if isinstance(module.padding, str) else tuple(module.padding),
        tuple(module.dilation),
        depthwise,
        module.bias is not None,
        followers,
    )


def probe_widths(full: int, points: int) -> list[int]:
    """Up to ``points`` widths from ``full`` down, evenly spaced, every width when few."""
    stride = max(1, -(-full // points))
    return sorted({*range(full, 0, -stride), full})


@dataclass
class LayerTable:
    """Measured latency of one layer shape: ``out_ms[i]`` at ``out_widths[i]`` output channels
    (full input), ``in_ms[i]`` at ``in_widths[i]`` input channels (full output)."""

    out_widths: list[int]
    out_ms: list[float]
    in_widths: list[int]
    in_ms: list[float]

    @property
    def dense_ms(self) -> float:
        return self.out_ms[-1]

    def predict(self, cin: int, cout: int) -> float:
        """Latency at ``(cin, cout)``: the dense one times the two ratios read in the tables."""
        ratio_out = _at_or_above(self.out_widths, self.out_ms, cout) / self.dense_ms
        if not self.in_widths:  # depthwise: one width
            return self.dense_ms * ratio_out
        ratio_in = _at_or_above(self.in_widths, self.in_ms, cin) / self.in_ms[-1]
        return self.dense_ms * ratio_out * ratio_in


def measure_tables(
    shapes: list[LayerShape],
    timer: Timer,
    batch: int,
    points: int,
    device: torch.device | str = "cpu",
    rounds: int = 3,
) -> list[LayerTable]:
    """Time each shape on ``device`` at ``points`` output widths and ``points`` input widths
    (one sweep for a depthwise conv, whose sides move together): the median of ``rounds``
    rounds that each visit every width of every shape, so that a burst of load from other
    processes lands on one round of everything rather than on a few widths, which would fake
    a kernel step."""
    sweeps = []
    for shape in shapes:
        outs = probe_widths(shape.out_channels, points)
        ins = [] if shape.depthwise else probe_widths(shape.in_channels, points)
        pairs = [(shape.in_channels, w) for w in outs] + [(w, shape.out_channels) for w in ins]
        sweeps.append((shape, outs, ins, pairs))
    watches = {}
    with torch.no_grad():
        for shape, _, _, pairs in sweeps:
            for pair in pairs:
                layer, input_shape = shape.build(*pair)
                watches[shape, pair] = timer(layer.to(device).eval(), input_shape, batch)
    times = median_rounds_of(watches, rounds)
    tables = []
    for shape, outs, ins, pairs in sweeps:
        ms = [max(1e-6, times[shape, pair]) for pair in pairs]
        tables.append(LayerTable(outs, ms[: len(outs)], ins, ms[len(outs) :]))
    return tables


def median_rounds_of(watches: dict[Any, Stopwatch], rounds: int) -> dict[Any, float]:
    """Each stopwatch's median over ``rounds`` rounds that each call every one in turn."""
    times: dict[Any, list[float]] = {key: [] for key in watches}
    with torch.no_grad():
        for _ in range(rounds):
            for key, watch in watches.items():
                times[key].append(watch())
    return {key: statistics.median(t) for key, t in times.items()}


def median_rounds(
    models: list[nn.Module], input_shape: tuple[int, ...], timer: Timer, batch: int, rounds: int
) -> list[float]:
    """Each model's median latency over ``rounds`` rounds that each time every model in turn:
    models compared in one run see the same load."""
    with torch.no_grad():
        watches = {i: timer(model, input_shape, batch) for i, model in enumerate(models)}
    times = median_rounds_of(watches, rounds)
    return [times[i] for i in range(len(models))]


def _at_or_above(xs: list[int], ys: list[float], x: int) -> float:
    """The latency of the nearest measured width at or above ``x``: a step function, so the
    widths a search may snap to are the measured ones (a kernel's steps are not smoothed over)."""
    return ys[min(bisect.bisect_left(xs, x), len(xs) - 1)]
