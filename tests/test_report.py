"""Reports of pruning runs: every plot drawn and not blank, the HTML self-contained with the
summary's numbers, runs without data or iterations, bad directories, the CLI, a real browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _small import EXAMPLE, SMALL, TRAIN, VAL
from PIL import Image, ImageStat

import autoprune
from autoprune.errors import AutopruneError
from autoprune.report.plots import PLOTS


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run with data, recoveries and several criteria chosen, reported."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    # every candidate scored: a step of this run is then topped up from two groups, the
    # several-groups row the report must show
    autoprune.prune(
        "smallcnn",
        train_data=TRAIN,
        val_data=VAL,
        out_dir=out,
        progress=False,
        scorer_options={"shortlist": 1.0},
        **SMALL,
    )
    autoprune.write_report(out)
    return out


@pytest.fixture(scope="module")
def data_free_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run without data (no accuracy, no loss) whose target is met before any iteration."""
    out = tmp_path_factory.mktemp("free")
    autoprune.prune(
        "smallcnn",
        example_inputs=EXAMPLE,
        schedule="fixed",
        criteria="l1",
        target_macs_reduction=0.004,  # within the search's tolerance of the start
        out_dir=out,
        progress=False,
    )
    return out


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("name", PLOTS.names())
def test_every_plot_is_drawn_and_not_blank(run, name):
    png = run / "report" / f"{name}.png"
    assert png.stat().st_size > 4000
    with Image.open(png) as image:
        assert image.width >= 300 and image.height >= 200
        spread = ImageStat.Stat(image.convert("L")).stddev[0]
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert spread > 10  # a blank or single-colour image has none
    assert colours is None or len(colours) > 20


def test_html_is_self_contained_and_shows_the_summary(run):
    html = (run / "report.html").read_text(encoding="utf-8")
    pngs = sorted((run / "report").glob("*.png"))
    assert len(pngs) == len(PLOTS)
    for png in pngs:
        assert f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" in html
    assert html.count("<img ") == len(pngs)
    for external in ("<script", "<link", 'src="http', "url(", "@import"):
        assert external not in html
    summary = summary_of(run)
    base, pruned = summary["baseline"], summary["pruned"]
    numbers = [
        f"{base['accuracy']:.2f}",
        f"{pruned['accuracy']:.2f}",
        f"{base['macs']:,}",
        f"{pruned['macs']:,}",
        f"{base['params']:,}",
        f"{pruned['params']:,}",
        f"-{100 * summary['macs_reduction']:.2f} %",
        f"-{100 * summary['params_reduction']:.2f} %",
        f"{summary['timings']['total_s']:.1f}",
    ]
    numbers += [f'<td class="r">{layer["after"]}</td>' for layer in summary["layers"]]
    numbers += [f'{name}</td><td class="r">{n}<' for name, n in summary["criteria_chosen"].items()]
    for number in numbers:
        assert number in html, number


def test_markdown_links_the_plots_and_holds_the_tables(run):
    markdown = (run / "report.md").read_text(encoding="utf-8")
    for name in PLOTS.names():
        assert f"](report/{name}.png)" in markdown
    summary = summary_of(run)
    macs = f"| MACs | {summary['baseline']['macs']:,} | {summary['pruned']['macs']:,} | "
    assert macs in markdown
    for layer in summary["layers"]:
        assert f"| {layer['name']} | {layer['before']} | {layer['after']} | " in markdown
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == summary["iterations"] >= 2
    for h in history:  # a step topped up from several groups lists each
        removed = ", ".join(f"{group} -{n}" for group, n in h["removed"].items())
        assert f"| {h['iteration']} | {removed} | " in markdown
    assert any(len(h["removed"]) > 1 for h in history)


def test_run_without_data_or_iterations_is_reported(data_free_run):
    summary = summary_of(data_free_run)
    assert summary["iterations"] == 0 and summary["baseline"]["accuracy"] is None
    markdown_path, html_path = autoprune.write_report(data_free_run)
    drawn = sorted(p.stem for p in (data_free_run / "report").glob("*.png"))
    assert drawn == ["before_after", "channels"]  # no iterations to plot
    html = html_path.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 2
    assert "No iterations" in html and "no accuracy was measured" in html
    markdown = markdown_path.read_text(encoding="utf-8")
    assert "| top-1 accuracy (%) | – | – | – |" in markdown
    assert "| MACs | 2,444,544 | 2,444,544 | +0.00 % |" in markdown


def make_unfinished(path: Path) -> None:
    (path / "state.safetensors").write_bytes(b"")


def make_train_run(path: Path) -> None:
    (path / "summary.json").write_text(json.dumps({"dataset": "synthetic", "macs": 1}))


def make_broken_json(path: Path) -> None:
    (path / "summary.json").write_text("{not json")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (None, "is not a directory"),
        (lambda path: None, "no summary.json: give the --out directory"),
        (make_unfinished, "has not finished: finish it with `autoprune prune ... --resume`"),
        (make_train_run, "not a pruning run's summary (it lacks model, baseline"),
        (make_broken_json, "is not valid JSON"),
    ],
    ids=["missing", "empty", "unfinished", "train-run", "broken-json"],
)
def test_a_directory_without_a_finished_run_is_refused(tmp_path, make, expected):
    path = tmp_path / "run"
    if make is not None:
        path.mkdir()
        make(path)
    with pytest.raises(AutopruneError, match=re.escape(expected)):
        autoprune.write_report(path)


def test_a_history_that_disagrees_with_the_summary_is_refused(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    lines = (copy / "history.jsonl").read_text().splitlines()
    (copy / "history.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(AutopruneError, match="the directory was changed after the run"):
        autoprune.write_report(copy)


def test_cli_report_prints_the_two_paths(cli, data_free_run):
    run = data_free_run
    code, stdout, err = cli("report", str(run))
    assert code == 0, err
    assert stdout.splitlines() == [str(run / "report.md"), str(run / "report.html")]
    code, _, err = cli("report", str(run / "model"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "no summary.json" in err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Appended to a copy of the page: after loading, record how many images decoded.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const decoded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.decoded = `${decoded} of ${images.length}`;
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (Debian: apt-get install chromium)")
def test_html_loads_in_headless_chromium_with_every_image(run, tmp_path):
    page = (run / "report.html").read_text(encoding="utf-8")
    probed = tmp_path / "report.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu"]
    argv += [f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probed.as_uri()]
    dom = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    assert f'data-decoded="{len(PLOTS)} of {len(PLOTS)}"' in dom
    summary = summary_of(run)
    assert "<h1>Pruning report: smallcnn</h1>" in dom
    assert f"{summary['pruned']['macs']:,}" in dom
