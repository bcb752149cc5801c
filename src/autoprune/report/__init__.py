"""Reports of finished pruning runs: tables and plots in ``RUN/report.md`` and in a
self-contained ``RUN/report.html``. Plots are a registry (:data:`autoprune.report.plots.PLOTS`,
imported on first use since it needs matplotlib)."""

from ._write import write_report

__all__ = ["write_report"]
