"""A latency model of the user's target: per-layer tables, cached, checked on the whole model.

:func:`build_latency_model` traces which conv and linear layers a model runs and on what
input shapes, times every distinct layer shape at a few widths (:mod:`.latency_table`), and
times the whole model once. Layers are not all a model does (norms, activations, additions,
pooling, the framework's overhead), so the sum of the layer tables is scaled by
``measured / sum`` of the dense model: :attr:`LatencyModel.ratio` is that check, reported.

Tables are cached as JSON per model (its layer shapes), backend, batch size and machine, in
``$AUTOPRUNE_CACHE/latency`` (default ``~/.cache/autoprune/latency``): a second run on the
same machine measures only the whole model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Set
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._forward import eval_mode, hooked, run_eval
from ..errors import AutopruneError
from ..io._atomic import write_text_atomic
from .latency_table import (
    TIMERS,
    LayerShape,
    LayerTable,
    follower_name,
    layer_shape,
    measure_tables,
    median_rounds,
)

# layer -> (output channels removed, input channels removed), as a channel group reports it
Removed = Mapping[nn.Module, tuple[int, int]]
CACHE_FORMAT = 2  # 2: tables time each layer with its followers


@dataclass(frozen=True)
class Thinned:
    """A copy of the model thinned in one region, as the fit sees it."""

    region: int
    tables_ms: float  # its layer tables summed (every region)
    channels: int  # its region's layers' output channels summed
    measured_ms: float


@dataclass
class LatencyModel:
    """Predicted latency of a model as its layers' widths change, on one backend and batch.

    ``layers`` maps each modelled module (of the model it was built on, which may then be
    pruned in place) to its table. Layers are grouped in *regions*: those whose outputs have
    one feature-map size (``regions``). A layer costs ``scale * (s * table + c * channels)``
    with its region's table scale ``s`` (``scales``, default 1) and cost per output channel
    ``c`` (``channel_ms``, default 0); the model costs the layers' sum plus ``fixed_ms``.
    Built, ``scale`` makes the dense model's prediction its measurement (``dense_ms``);
    :meth:`fit_regions` fits the rest through copies thinned one region at a time. Every
    saving from the dense model is then scaled by ``savings``, which measuring the pruned
    model corrects (a closed loop, as NetAdapt measures each proposal).
    """

    backend: str
    batch: int
    layers: dict[nn.Module, LayerTable]
    dense_ms: float  # the whole dense model, measured
    tables_ms: float  # sum of the layer tables at full width
    cache_file: str | None = None
    fixed_ms: float = 0.0
    scale: float = 0.0
    regions: dict[nn.Module, int] = field(default_factory=dict)  # layer -> output map size
    scales: dict[int, float] = field(default_factory=dict)  # region -> table scale
    channel_ms: dict[int, float] = field(default_factory=dict)  # region -> ms per channel
    savings: float = 1.0  # measured over predicted savings of a pruned model

    def __post_init__(self) -> None:
        if not self.scale:
            self.scale = (self.dense_ms - self.fixed_ms) / self.tables_ms

    @property
    def ratio(self) -> float:
        """Whole dense model measured over the sum of its layers measured alone."""
        return self.dense_ms / self.tables_ms

    def fit_regions(self, thinned: Iterable[Thinned]) -> None:
        """Fit each thinned region's costs to what thinning it saved, as measured.

        Where it saved more than its tables say, the rest is cost per output channel that no
        table holds (additions, pads, memory traffic: it weighs most on large feature maps);
        where less, its tables are scaled down (per-op overhead that does not shrink). What
        the dense measurement leaves over is ``fixed_ms`` (>= 0), and ``scale`` makes the
        dense prediction the measurement.
        """
        channels = self.region_channels()
        self.scales, self.channel_ms = {}, {}
        for copy in thinned:
            saved, by_tables = self.dense_ms - copy.measured_ms, self.tables_ms - copy.tables_ms
            fewer = channels[copy.region] - copy.channels
            if saved >= by_tables and fewer > 0:
                self.channel_ms[copy.region] = (saved - by_tables) / fewer
            elif by_tables > 0:
                self.scales[copy.region] = max(0.0, saved) / by_tables
        self.scale = 1.0
        layers = sum(self._layer_ms(m) for m in self.layers)
        self.fixed_ms = max(0.0, self.dense_ms - layers)
        self.scale = (self.dense_ms - self.fixed_ms) / layers

    def region_channels(
        self, widths: Mapping[nn.Module, tuple[int, int]] | None = None
    ) -> dict[int, int]:
        """The output channels of each region's layers, now or at ``widths`` (layer -> (in,
        out) channels)."""
        out: dict[int, int] = {}
        for m in self.layers:
            region = self.regions.get(m, 0)
            out[region] = out.get(region, 0) + ((widths or {}).get(m) or channel_counts(m))[1]
        return out

    def tables_at(self, widths: Mapping[nn.Module, tuple[int, int]]) -> float:
        """The layer tables summed at ``widths`` (layer -> (in, out) channels)."""
        return sum(t.predict(*widths.get(m, channel_counts(m))) for m, t in self.layers.items())

    def layers_ms(
        self, removed: Removed | None = None, live: Set[nn.Module] | None = None
    ) -> float:
        """Scaled sum of the tables of the layers still in the model (``live``: those modules;
        None: all), at their widths now less ``removed`` channels."""
        removed = removed or {}
        return sum(
            self._layer_ms(m, *removed.get(m, (0, 0)))
            for m in self.layers
            if live is None or m in live
        )

    def predict(self, removed: Removed | None = None, live: Set[nn.Module] | None = None) -> float:
        """Milliseconds predicted for the model as it is now (``live``: the modules still in it;
        None: every modelled layer is), less ``removed`` channels. The fixed part is spread over
        the modelled layers: a layer removed whole takes its share of the per-op cost along."""
        share = 1.0 if live is None else sum(m in live for m in self.layers) / len(self.layers)
        unscaled = self.fixed_ms * share + self.layers_ms(removed, live)
        return self.dense_ms - self.savings * (self.dense_ms - unscaled)

    def saved(self, removed: Removed) -> float:
        """Milliseconds predicted to be saved by removing ``removed`` from the model now."""
        layers = [(m, r) for m, r in removed.items() if m in self.layers]
        return self.savings * sum(self._layer_ms(m) - self._layer_ms(m, *r) for m, r in layers)

    def saved_whole(self, modules: Iterable[nn.Module]) -> float:
        """Milliseconds predicted to be saved by removing the modelled layers among ``modules``
        (and their submodules) whole: their tables and their share of the fixed part."""
        layers = {m for module in modules for m in module.modules() if m in self.layers}
        fixed = self.fixed_ms * len(layers) / len(self.layers)
        return self.savings * (fixed + sum(self._layer_ms(m) for m in layers))

    def _layer_ms(self, module: nn.Module, out_removed: int = 0, in_removed: int = 0) -> float:
        """The layer's cost at its width now less what is removed."""
        cin, cout = channel_counts(module)
        region = self.regions.get(module, 0)
        table = self.layers[module].predict(cin - in_removed, cout - out_removed)
        per_channel = self.channel_ms.get(region, 0.0)
        return self.scale * (
            self.scales.get(region, 1.0) * table + per_channel * (cout - out_removed)
        )


def build_latency_model(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    backend: str = "eager",
    batch: int = 1,
    points: int = 16,
    rounds: int = 3,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LatencyModel:
    """Measure (or load from the cache) the tables of ``model``'s layers on ``backend`` at
    ``batch`` images, ``points`` widths per side, and time the whole model (each the median
    of ``rounds`` rounds)."""
    if not isinstance(example_inputs, torch.Tensor):
        raise AutopruneError(
            "a latency target needs a model with one input tensor; use target_macs_reduction"
        )
    timer = TIMERS.get(backend)
    device = example_inputs.device
    calls = _record_calls(model, example_inputs)
    shapes = _shapes(calls)
    if not shapes:
        raise AutopruneError("the model has no conv or linear layer to model the latency of")
    keys = sorted({s.key for s in shapes.values()})
    name = cache_key(keys, backend, batch, points, device)
    path = Path(cache_dir or default_cache_dir()) / f"{name}.json"
    tables = _load(path)
    if tables is None or set(tables) != set(keys):
        by_key = {s.key: s for s in shapes.values()}
        measured = measure_tables([by_key[k] for k in keys], timer, batch, points, device, rounds)
        tables = dict(zip(keys, measured, strict=True))
        _save(path, tables, backend, batch)
    input_shape = tuple(example_inputs.shape[1:])
    with eval_mode(model):
        (dense_ms,) = median_rounds([model], input_shape, timer, batch, rounds)
    layers = {m: tables[shapes[m].key] for m in shapes}
    tables_ms = sum(table.predict(*channel_counts(m)) for m, table in layers.items())
    regions = {m: _map_size(m, calls[m][1]) for m in shapes}
    return LatencyModel(backend, batch, layers, dense_ms, tables_ms, str(path), regions=regions)


# module -> (its first call's input, its output), the tensors held so that ids stay unique
Calls = dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]


def traced_shapes(model: nn.Module, example_inputs: torch.Tensor) -> dict[nn.Module, LayerShape]:
    """Every modelled layer that a forward pass of ``example_inputs`` runs, with its shape and
    the norm and activation modules run on its output alone after it (its followers)."""
    return _shapes(_record_calls(model, example_inputs))


def _record_calls(model: nn.Module, example_inputs: torch.Tensor) -> Calls:
    calls: Calls = {}

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            calls.setdefault(module, (args[0], output))

    leaves = (m for m in model.modules() if next(m.children(), None) is None)
    with hooked((m, record) for m in leaves):
        run_eval(model, (example_inputs[:1],))
    return calls


def _shapes(calls: Calls) -> dict[nn.Module, LayerShape]:
    readers: dict[int, list[nn.Module]] = {}
    for module, (given, _) in calls.items():
        readers.setdefault(id(given), []).append(module)
    shapes: dict[nn.Module, LayerShape] = {}
    for layer, (given, output) in calls.items():
        followers: list[str] = []
        last = layer
        while len(after := [r for r in readers.get(id(output), []) if r is not last]) == 1:
            name = follower_name(after[0], layer)
            if name is None:
                break
            followers.append(name)
            last, output = after[0], calls[after[0]][1]
        shape = layer_shape(layer, tuple(given.shape[1:]), tuple(followers))
        if shape is not None:
            shapes[layer] = shape
    return shapes


def _map_size(layer: nn.Module, output: torch.Tensor) -> int:
    """The feature-map size of a layer's output: positions per channel (a linear layer's
    channels are last)."""
    dims = output.shape[1:-1] if isinstance(layer, nn.Linear) else output.shape[2:]
    return math.prod(dims)


def default_cache_dir() -> Path:
    root = os.environ.get("AUTOPRUNE_CACHE") or Path.home() / ".cache" / "autoprune"
    return Path(root) / "latency"


def machine() -> dict[str, str | int]:
    """What makes one machine's timings differ from another's."""
    return {
        "node": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "",
    }


def cache_key(
    shape_keys: list[str], backend: str, batch: int, points: int, device: torch.device
) -> str:
    """The cache file's name: the backend and batch, then a digest of everything else."""
    blob = json.dumps(
        [CACHE_FORMAT, shape_keys, points, str(device.type), machine()], sort_keys=True
    )
    return f"{backend}-b{batch}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _load(path: Path) -> dict[str, LayerTable] | None:
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        return {k: LayerTable(**t) for k, t in saved["tables"].items()}
    except (ValueError, KeyError, TypeError):
        return None  # an unreadable or older cache file is measured again


def _save(path: Path, tables: dict[str, LayerTable], backend: str, batch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": CACHE_FORMAT,
        "backend": backend,
        "batch": batch,
        "machine": machine(),
        "tables": {k: asdict(t) for k, t in tables.items()},
    }
    write_text_atomic(path, json.dumps(data, indent=1))


def channel_counts(module: nn.Module) -> tuple[int, int]:
    """A conv's or linear layer's (input, output) channels as they are now."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels  # type: ignore[return-value]
