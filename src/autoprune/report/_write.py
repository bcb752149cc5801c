"""``write_report``: a finished run's summary and history as tables and plots, in Markdown and
in one self-contained HTML page."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from ._render import Block, Document, Image, Section, Table, to_html, to_markdown
from ._run import Run, read_run

DPI = 100
NA = "–"  # a value the run did not measure
GRAINS = ("blocks", "layers", "channels", "weights")  # summary["removed"], coarse to fine


def write_report(run_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into a finished pruning run's directory, with
    the plots as PNGs under ``report/``; returns the paths of the two reports.

    The Markdown links the PNGs; the HTML embeds them, so that file alone opens in any
    browser. Writing again replaces them. A directory that holds no finished pruning run
    raises :class:`~autoprune.errors.AutopruneError`.
    """
    run = read_run(run_dir)
    doc = _document(run, _draw(run, run.path / "report"))
    markdown, page = run.path / "report.md", run.path / "report.html"
    markdown.write_text(to_markdown(doc, run.path), encoding="utf-8")
    page.write_text(to_html(doc), encoding="utf-8")
    return markdown, page


def _draw(run: Run, folder: Path) -> dict[str, list[Image]]:
    """Every plot that has something to show, as a PNG, by the section that shows it."""
    # matplotlib takes half a second to import: only writing a report pays for it.
    from matplotlib.figure import Figure

    from .plots import PLOTS

    folder.mkdir(exist_ok=True)
    placed: dict[str, list[Image]] = defaultdict(list)
    for entry in PLOTS:
        fig = Figure(layout="constrained")
        if entry.obj(run, fig):
            path = folder / f"{entry.name}.png"
            fig.savefig(path, dpi=DPI)
            placed[entry.meta["section"]].append(Image(path, entry.meta["title"]))
    return placed


def _document(run: Run, plots: dict[str, list[Image]]) -> Document:
    parts = [
        ("summary", "Before and after", _before_after(run)),
        *([("latency", "Latency", _latency(run))] if "latency" in run.summary else []),
        ("layers", "Channels per layer", _layers(run)),
        ("iterations", "Iterations", _iterations(run)),
        ("criteria", "Criteria chosen", _criteria(run)),
        ("timings", "Timings", _timings(run)),
        ("settings", "Settings", _settings(run)),
    ]
    sections = [Section(title, [*plots.get(key, []), *blocks]) for key, title, blocks in parts]
    return Document(f"Pruning report: {run.summary['model']}", _intro(run), sections)


def _intro(run: Run) -> str:
    s = run.summary
    base, pruned = s["baseline"], s["pruned"]
    data = f"on {s['dataset']}" if s.get("dataset") else "without data"
    text = (
        f"{s['model']} {data}: MACs {_reduction(s['macs_reduction'])}, "
        f"parameters {_reduction(s['params_reduction'])}"
    )
    if base["accuracy"] is not None and pruned["accuracy"] is not None:
        text += f", top-1 accuracy {base['accuracy']:.2f} % -> {pruned['accuracy']:.2f} %"
    elif base.get("loss") is not None and pruned.get("loss") is not None:
        text += f", validation loss {base['loss']:.4g} -> {pruned['loss']:.4g}"
    total = s["timings"].get("total_s")
    took = f" in {total:.1f} s" if total is not None else ""
    return f"{text}; {s['iterations']} iterations{took}. Run directory: {run.path}."


def _before_after(run: Run) -> list[Block]:
    s = run.summary
    base, pruned = s["baseline"], s["pruned"]

    def measured(key: str, label: str, digits: int, unit: str = "") -> tuple[str, ...]:
        before, after = base.get(key), pruned.get(key)
        change = NA if before is None or after is None else f"{after - before:+.{digits}f}{unit}"
        return (label, _fixed(before, digits), _fixed(after, digits), change)

    no_metric = base["accuracy"] is None and base.get("loss") is not None  # a custom loss
    rows = [
        *([] if no_metric else [measured("accuracy", "top-1 accuracy (%)", 2, " points")]),
        measured("loss", "validation loss", 4),
        measured("calib_loss", "calibration loss", 4),
        ("MACs", f"{base['macs']:,}", f"{pruned['macs']:,}", _reduction(s["macs_reduction"])),
        (
            "parameters",
            f"{base['params']:,}",
            f"{pruned['params']:,}",
            _reduction(s["params_reduction"]),
        ),
    ]
    removed = s.get("removed", {})
    if removed.get("weights"):  # zeros save no dense MACs or parameters: count them apart
        sparse = pruned["sparse_macs"]
        rows += [
            (
                "non-zero parameters",
                f"{base['params']:,}",
                f"{s['nonzero_params']:,}",
                f"{s['compression_ratio']:.1f}x compression",
            ),
            (
                "sparse MACs (estimate)",
                f"{base['macs']:,}",
                f"{sparse:,}",
                _reduction(1 - sparse / base["macs"]),
            ),
        ]
    blocks: list[Block] = [Table(("", "baseline", "pruned", "change"), rows)]
    if set(s["config"].get("granularity", ["channel"])) != {"channel"}:
        counts = [(n, what) for what in GRAINS if (n := removed.get(what))]
        text = ", ".join(f"{n:,} {what if n > 1 else what[:-1]}" for n, what in counts)
        blocks.append(f"Removed: {text or 'nothing'}.")
    for grain, why in s.get("ended_early", {}).items():
        blocks.append(f"The {grain} phase ended before its goal: {why}.")
    if base["accuracy"] is None and base.get("loss") is None:
        blocks.append("No validation data was given, so no accuracy was measured.")
    elif base["accuracy"] is None:
        blocks.append("The task has a custom loss and no metric: the validation loss is shown.")
    return blocks


def _latency(run: Run) -> list[Block]:
    """The latency target's model against the backend: dense and pruned, both measured."""
    lat = run.summary["latency"]
    rows = [
        (
            "dense",
            _fixed(lat["dense_measured_ms"], 3),
            _fixed(lat["dense_measured_ms"], 3),
            "1.00x",
        ),
        (
            "pruned",
            _fixed(lat["predicted_ms"], 3),
            _fixed(lat["measured_ms"], 3),
            f"{lat['speedup_measured']:.2f}x (predicted {lat['speedup_predicted']:.2f}x)",
        ),
    ]
    checks = [
        (
            f"after iteration {c['iteration']}" + ("" if c.get("final") else " (on the way)"),
            f"{100 * c['predicted_reduction']:.1f} %",
            f"{100 * c['measured_reduction']:.1f} %",
            f"{c['savings']:.3f}" + (" (short: pruning went on)" if c["short"] else ""),
        )
        for c in lat.get("checks", [])
    ]
    check_table = (
        [
            "The model was measured on the way and when the prediction said the target was "
            "reached; predicted savings were scaled to the measurement on the way, and at the "
            "end where it fell short (pruning then went on).",
            Table(
                ("measured", "predicted reduction", "measured reduction", "savings scale"), checks
            ),
        ]
        if checks
        else []
    )
    return [
        Table(("model", "predicted (ms)", "measured (ms)", "speed-up"), rows),
        f"On {lat['backend']} at batch {lat['batch']}; the prediction is "
        f"{100 * lat['prediction_error']:+.1f} % off the measurement. The dense model measured "
        f"{lat['tables_ratio']:.2f}x the sum of its layers timed alone.",
        *check_table,
    ]


def _layers(run: Run) -> list[Block]:
    rows = [
        (
            layer["name"],
            str(layer["before"]),
            str(layer["after"]),
            str(layer["before"] - layer["after"]),
            _fixed(100 * (1 - layer["after"] / layer["before"]), 1),
        )
        for layer in run.summary["layers"]
    ]
    return [Table(("layer", "before", "after", "removed", "removed (%)"), rows)]


def _iterations(run: Run) -> list[Block]:
    if not run.history:
        return ["No iterations: the model met the target before any pruning."]
    latency = "latency_predicted_ms" in run.history[0]  # a latency target: show its prediction
    rows = [
        (
            str(h["iteration"]),
            ", ".join(f"{group} -{n}" for group, n in h["removed"].items()),
            ", ".join(h["criteria"]),
            _fixed(h["loss"], 4),
            _fixed(h["loss_recovered"], 4),
            _fixed(100 * h["macs_reduction"], 2),
            *([_fixed(h["latency_predicted_ms"], 3)] if latency else []),
            str(h["candidates"]),
            _fixed(h["seconds"], 2),
            _fixed(h["recovery_s"], 2),
        )
        for h in run.history
    ]
    header = (
        "#",
        "channels removed",
        "criteria",
        "calibration loss",
        "after recovery",
        "MACs reduction (%)",
        *(["latency predicted (ms)"] if latency else []),
        "candidates",
        "search (s)",
        "recovery (s)",
    )
    return [Table(header, rows, align="rll" + "r" * (len(header) - 3))]


def _criteria(run: Run) -> list[Block]:
    counts = run.summary["criteria_chosen"]
    if not counts:
        return ["No criterion was chosen: there were no iterations."]
    iterations = run.summary["iterations"]
    rows = [(name, str(n), _fixed(100 * n / iterations, 1)) for name, n in counts.items()]
    return [
        Table(("criterion", "iterations", "share of iterations (%)"), rows),
        "Criteria that picked the same channels in an iteration are each counted, so the "
        "shares can add up to more than 100 %.",
    ]


def _timings(run: Run) -> list[Block]:
    timings = run.summary["timings"]
    total = timings.get("total_s") or 0.0
    rows = [
        (
            key.removesuffix("_s"),
            _fixed(seconds, 1),
            _fixed(100 * seconds / total, 1) if total else NA,
        )
        for key, seconds in timings.items()
    ]
    return [Table(("phase", "seconds", "share of total (%)"), rows)]


def _settings(run: Run) -> list[Block]:
    if not run.config:
        return ["The summary records no settings."]
    rows = [(key, _setting(value)) for key, value in run.config.items()]
    return [Table(("setting", "value"), rows, align="ll")]


def _setting(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_setting(v)}" for k, v in value.items()) or NA
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or NA
    return str(value)


def _fixed(value: float | None, digits: int) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def _reduction(fraction: float) -> str:
    return f"{0.0 - 100 * fraction:+.2f} %"  # 0.0 - 0.0 is +0.0, not -0.0
