"""Reports from synthetic run folders with known numbers: table values and markings, figures, HTML, partial runs,
atypical-neuron ranking, comparison and the CLI."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from knockout.cli import main
from knockout.errors import KnockoutError
from knockout.reporting import compare_runs, write_report
from knockout.reporting.figures import curves_figure
from knockout.reporting.neurons import StatsFile, prominences, rank_atypical, score_layer
from knockout.reporting.summary import summarize
from knockout.reporting.table import Cell, build_table, mark_best, paper_model
from knockout.runfolder import ResultRow, RunFolder, write_rows
from knockout.stats import Statistics

METHODS = ("zero", "mean", "peak")
SEEDS = (0, 1, 2)
FRACTIONS = (0.0, 0.5, 0.9, 1.0)
BASE = (0.50, 2.0)  # top-1, CE of every seed's baseline

# (method, fraction) -> (top-1 per seed, CE per seed)
VALUES = {
    ("peak", 0.5): ([0.44, 0.45, 0.46], [3.0, 3.1, 3.2]),  # top-1 45.00 ± 1.00 (best), CE 3.1 ± 0.1
    ("mean", 0.5): ([0.425, 0.445, 0.465], [2.9, 2.9, 2.9]),  # top-1 44.50 ± 2.00 (within 1 std), CE 2.9 ± 0 (best)
    ("zero", 0.5): ([0.40, 0.41, 0.42], [2.95, 3.0, 3.05]),  # top-1 41 ± 1, CE 3.0 ± 0.05 (not within 0 of 2.9)
    ("peak", 0.9): ([0.10, 0.12, 0.14], [6.0, 6.2, 6.4]),  # top-1 12 ± 2 (1 below: half its std), CE 6.2 ± 0.2 (best)
    ("mean", 0.9): ([0.13, 0.13, 0.13], [6.3, 6.3, 6.3]),  # top-1 13 ± 0 (best), CE 6.3 ± 0 (0.1 above the best)
    ("zero", 0.9): ([0.05, 0.06, 0.07], [7.0, 7.0, 7.0]),
    ("peak", 1.0): ([0.01, 0.01, 0.01], [9.0, 9.0, 9.0]),
    ("mean", 1.0): ([0.01, 0.01, 0.01], [9.5, 9.5, 9.5]),
    ("zero", 1.0): ([0.0, 0.0, 0.0], [10.0, 10.0, 10.0]),
}


def _row(method, fraction, seed, top1, ce):
    base = None if method == "baseline" else ResultRow.measured("baseline", 0.0, seed, *BASE, 100, 0, 32, 0.0)
    seconds = 0.5 if method == "baseline" else 1.25
    return ResultRow.measured(method, fraction, seed, top1, ce, 100, int(round(fraction * 32)), 32, seconds, base)


def make_run(path, model="synthetic/tiny-model", shift=0.0, drop=(), stats=True):
    """A run folder with VALUES (top-1 lowered by ``shift``); rows in ``drop`` (method, fraction, seed) left out."""
    path.mkdir(parents=True)
    rows = []
    for seed in SEEDS:
        rows.append(_row("baseline", 0.0, seed, *BASE))
        for m in METHODS:
            for f in FRACTIONS:
                if (m, f, seed) in drop:
                    continue
                top1, ce = (BASE[0], BASE[1]) if f == 0 else (VALUES[(m, f)][0][seed], VALUES[(m, f)][1][seed])
                rows.append(_row(m, f, seed, top1 - shift, ce))
    write_rows(path, rows)
    identity = {"name": model, "model_type": "llama", "n_layers": 2, "widths": [16, 16], "n_heads": 4}
    config = {
        "model": model,
        "out": str(path),
        "data": "synthetic.txt",
        "methods": list(METHODS),
        "fractions": list(FRACTIONS),
        "seeds": list(SEEDS),
        "eval_tokens": 100,
        "stats_tokens": 1000,
        "max_length": 64,
        "batch_size": 8,
        "eps": 0.05,
        "hist_limit": 20.0,
        "selection": "per-layer",
        "task": "causal",
        "device": "cpu",
        "dtype": "float32",
        "resolved": {
            "task": "causal",
            "model_identity": identity,
            "device": "cpu",
            "dtype": "torch.float32",
            "environment": {"knockout": "0.1.0", "torch": "x", "transformers": "y", "python": "3"},
        },
    }
    (path / "config.json").write_text(json.dumps(config))
    if stats:
        make_stats(identity).save(path / "stats.safetensors")
    return path


BIMODAL = (1, 5)
SKEWED = (1, 11)
CONSTANT = (0, 3)


def make_stats(identity: dict) -> Statistics:
    """Two layers of 16 Gaussian N(0, 1) neurons; in layer 1, neuron 5 is bimodal (-2 and +2.5) and neuron 11 is
    exponential (mode at 0, mean 1); in layer 0, neuron 3 is nearly constant (std far below eps)."""
    rng = np.random.default_rng(0)
    stats = Statistics([16, 16], eps=0.05, limit=20.0, meta={"model": json.dumps(identity), "data": "synthetic"})
    n = 20000
    for layer in range(2):
        x = rng.normal(0.0, 1.0, size=(n, 16))
        if layer == 0:
            x[:, CONSTANT[1]] = rng.normal(0.123, 0.001, n)
        if layer == 1:
            side = rng.random(n) < 0.5
            x[:, BIMODAL[1]] = np.where(side, rng.normal(-2.0, 0.4, n), rng.normal(2.5, 0.4, n))
            x[:, SKEWED[1]] = rng.exponential(1.0, n)
        stats.add(layer, torch.from_numpy(x))
    return stats


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "run")


@pytest.fixture(scope="module")
def report(run):
    return write_report(run)


def _cell(table, method, fraction, col):
    for row in table.rows:
        if row.method == method and row.fraction == fraction:
            return row.cells[col]
    raise KeyError((method, fraction))


def test_table_values_std_and_marks(run):
    data = RunFolder.with_results(run)
    table = build_table([("r", summarize(data.table_rows()))], (0.5, 0.9), list(METHODS), {"r": 3})
    t = lambda m, f: _cell(table, m, f, "r:top1")  # noqa: E731
    c = lambda m, f: _cell(table, m, f, "r:ce")  # noqa: E731
    # hand-computed means and sample stds (ddof=1)
    assert t("peak", 0.5).mean == pytest.approx(45.0) and t("peak", 0.5).std == pytest.approx(1.0)
    assert t("mean", 0.5).mean == pytest.approx(44.5) and t("mean", 0.5).std == pytest.approx(2.0)
    assert c("peak", 0.5).mean == pytest.approx(3.1) and c("peak", 0.5).std == pytest.approx(0.1)
    assert c("zero", 0.5).std == pytest.approx(0.05)
    assert _cell(table, "baseline", None, "r:top1").mean == pytest.approx(50.0)
    assert _cell(table, "baseline", None, "r:ce").std == pytest.approx(0.0)
    # marks (default rule "paper"): the best, and every method within half of its own std of the best mean
    assert [t(m, 0.5).best for m in METHODS] == [False, True, True]  # peak best; mean 0.5 below, half its std 1
    assert [c(m, 0.5).best for m in METHODS] == [False, True, False]  # mean 2.9 best; zero 0.1 > 0.025, peak 0.2 > 0.05
    assert [t(m, 0.9).best for m in METHODS] == [False, True, True]  # mean 13 best; peak 12 ± 2: 1 <= 1 (boundary)
    assert [c(m, 0.9).best for m in METHODS] == [False, False, True]  # peak 6.2 best; mean 6.3 ± 0: 0.1 > 0
    assert not _cell(table, "baseline", None, "r:top1").best
    assert [r.method for r in table.rows] == ["baseline", *METHODS, *METHODS]

    md = table.to_markdown()
    assert "**45.00 ± 1.00**" in md and "**44.50 ± 2.00**" in md and "41.00 ± 1.00 |" in md
    tex = table.to_latex()
    assert (
        r"$\mathbf{45.00 \pm 1.00}$" in tex and r"-- & baseline" in tex and r"\toprule" in tex and r"Top-1 (\%)" in tex
    )
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    peak = [r for r in rows if (r["method"], r["fraction"], r["metric"]) == ("peak", "0.5", "top1")][0]
    assert float(peak["mean"]) == pytest.approx(45.0) and peak["best"] == "1" and peak["n_seeds"] == "3"


def test_mark_best_ties_and_single_seed():
    cells = [Cell(10.0, 0.0), Cell(10.0, 0.0), Cell(9.99, 0.0)]
    mark_best(cells, higher_is_better=True)
    assert [x.best for x in cells] == [True, True, False]
    cells = [Cell(2.0, 0.3), Cell(2.25, 0.01), Cell(2.31, 0.0), None]
    mark_best(cells, higher_is_better=False)
    assert [x.best for x in cells[:3]] == [True, False, False]  # 0.25 > 0.01 / 2 and 0.31 > 0 (default rule "paper")


def test_paper_model_and_column(run):
    assert paper_model("facebook/opt-1.3b") == "OPT-1.3B"
    assert paper_model("mistralai/Mistral-7B-v0.1") == "Mistral-7B"
    assert paper_model("FacebookAI/roberta-large") == "RoBERTa-large"
    assert paper_model("google/vit-base-patch16-224") == "ViT-base-patch16-224"
    assert paper_model("facebook/opt-125m") is None and paper_model("smollm2-135m") is None
    data = RunFolder.with_results(run)
    table = build_table([("r", summarize(data.table_rows()))], (0.5, 0.9), list(METHODS), paper={"r": "OPT-1.3B"})
    assert _cell(table, "peak", 0.5, "r:paper:top1").mean == pytest.approx(44.54)
    assert _cell(table, "baseline", None, "r:paper:ce").mean == pytest.approx(2.24)
    assert not _cell(table, "peak", 0.5, "r:paper:top1").best


def _not_blank(png):
    img = imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.02


def test_report_files(run, report):
    out = run / "report"
    assert report == out / "report.html"
    for name in ("curves", "hist_layers", "atypical"):
        _not_blank(out / f"{name}.png")
        assert (out / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    for name in ("table2.md", "table2.csv", "table2.tex", "summary.csv", "atypical_neurons.csv", "report.md"):
        assert (out / name).stat().st_size > 0
    html = report.read_text()
    assert '<table class="t2">' in html and "45.00 ± 1.00" in html and '<td class="best">45.00 ± 1.00</td>' in html
    assert html.count("data:image/png;base64,") == 3
    assert "synthetic/tiny-model" in html and "synthetic.txt" in html and "Timings" in html
    assert "PARTIAL" not in html
    assert 'src="http' not in html  # self-contained
    md = (out / "report.md").read_text()
    assert "](curves.png)" in md and "**45.00 ± 1.00**" in md
    # timings: 3 baselines x 0.5 s + 36 rows x 1.25 s
    assert "Total 46.5 s over 39 rows" in md


def test_curves_figure_draws_one_line_per_method(run):
    data = RunFolder.with_results(run)
    fig = curves_figure([("r", summarize(data.table_rows()))], list(METHODS))
    top, bottom = fig.axes  # one run: Δtop-1 above, ΔCE below
    for ax in (top, bottom):
        labels = [line.get_label() for line in ax.get_lines()]
        assert sorted(m for m in labels if m in METHODS) == sorted(METHODS)
    peak = [line for line in top.get_lines() if line.get_label() == "peak"][0]
    x, y = peak.get_data()
    np.testing.assert_allclose(x, [0, 50, 90, 100])
    np.testing.assert_allclose(y, [0, -5, -38, -49], atol=1e-9)  # Δtop-1 in percentage points


def test_atypical_ranking_puts_planted_neurons_first(run):
    stats = StatsFile(run / "stats.safetensors")
    scores, hists = rank_atypical(stats, top_k=3)
    assert (scores[0].layer, scores[0].neuron) == BIMODAL
    assert (scores[1].layer, scores[1].neuron) == SKEWED
    assert scores[0].modes == 2 and scores[1].modes == 1
    assert scores[0].second > 0.5 and scores[1].offset == pytest.approx(1.0, abs=0.15)
    assert scores[2].score < 0.5  # Gaussians are typical
    assert set(hists) == {(s.layer, s.neuron) for s in scores[:3]}
    layer0 = score_layer(stats.layer(0))
    assert all(s.modes == 1 for s in layer0) and max(s.offset for s in layer0) < 0.4
    # a nearly constant neuron is not atypical for the histogram's rounding (peak 0.125 is a bin centre)
    const = layer0[CONSTANT[1]]
    assert const.peak == pytest.approx(0.125) and const.offset == 0.0 and const.score == 0.0


def test_prominences():
    assert prominences(np.array([0, 1, 0.2, 0.8, 0])) == pytest.approx([1.0, 0.6])
    assert prominences(np.array([0.2, 1, 1, 0.3, 0.5, 0.1])) == pytest.approx([1.0, 0.2])
    assert prominences(np.array([1.0, 0.5, 0.2])) == pytest.approx([1.0])


def test_partial_run_says_so(tmp_path):
    drop = {("peak", 0.9, 2), ("peak", 1.0, 2), ("zero", 1.0, 1)}
    part = make_run(tmp_path / "part", drop=drop, stats=False)
    data = RunFolder.with_results(part)
    assert data.n_expected == 3 * (1 + 3 * 4) and len(data.rows) == data.n_expected - 3
    assert data.missing() == sorted([("peak", 0.9, 2, ""), ("peak", 1.0, 2, ""), ("zero", 1.0, 1, "")])
    html = write_report(part).read_text()
    assert "PARTIAL RUN: 36 of 39 expected rows" in html and "peak at 0.9 (seed 2)" in html
    assert "11.00 ± 1.41 (n=2)" in html  # peak at 90% over seeds 0, 1 only
    assert "No stats.safetensors" in html
    everything = {(m, f, s) for m in METHODS for f in FRACTIONS for s in SEEDS}
    only_base = make_run(tmp_path / "base", drop=everything, stats=False)
    table = write_report(only_base).with_name("table2.md").read_text()  # methods without rows yet show "–"
    assert "| 50% | peak | – | – |" in table and "| – | baseline | 50.00 ± 0.00 |" in table
    assert "PARTIAL RUN" in (part / "report" / "report.md").read_text()


def test_compare_two_runs(tmp_path):
    a = make_run(tmp_path / "a", model="org/model-a", stats=False)
    b = make_run(tmp_path / "b", model="org/model-b", shift=0.02, stats=False)
    path = compare_runs([a, b], tmp_path / "cmp")
    assert path == tmp_path / "cmp" / "compare.html"
    html = path.read_text()
    assert "model-a" in html and "model-b" in html and "45.00 ± 1.00" in html and "43.00 ± 1.00" in html
    _not_blank(tmp_path / "cmp" / "curves.png")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "cmp" / "table2.csv").read_text())))
    assert {r["run"] for r in rows} == {"model-a", "model-b"}
    md = (tmp_path / "cmp" / "table2.md").read_text()
    assert "model-a Top-1 (%)" in md and "model-b CE (nats)" in md


def test_cli_report_and_compare(run, tmp_path, capsys):
    assert main(["report", str(run), "--out", str(tmp_path / "r"), "--fractions", "0.5", "--layers", "1"]) == 0
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "hist_layers.png").is_file()
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r" / "table2.csv").read_text())))
    assert {r["fraction"] for r in rows} == {"0.0", "0.5"}
    assert "report.html" in capsys.readouterr().out
    copy = shutil.copytree(run, tmp_path / "copy")
    assert main(["compare", str(run), str(copy), "--out", str(tmp_path / "c"), "--labels", "x,y"]) == 0
    assert (tmp_path / "c" / "compare.html").is_file()
    (tmp_path / "link").symlink_to(run)
    assert main(["compare", str(run), str(tmp_path / "link"), "--out", str(tmp_path / "c2")]) == 2
    assert "given twice" in capsys.readouterr().err and not (tmp_path / "c2").exists()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert main(["report", str(run), "--out", str(tmp_path / "r2"), "--layers", "7"]) == 2


def test_compare_keeps_same_model_same_folder_name_runs_apart(tmp_path):
    a = make_run(tmp_path / "x" / "run", model="org/model", stats=False)
    b = make_run(tmp_path / "y" / "run", model="org/model", shift=0.02, stats=False)
    compare_runs([a, b], tmp_path / "cmp")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "cmp" / "table2.csv").read_text())))
    assert len({r["run"] for r in rows}) == 2
    md = (tmp_path / "cmp" / "table2.md").read_text()
    assert "45.00 ± 1.00" in md and "43.00 ± 1.00" in md  # both runs' numbers, not one run twice
    with pytest.raises(KnockoutError, match="distinct"):
        compare_runs([a, b], tmp_path / "cmp2", labels=["same", "same"])


def test_report_refuses_bad_options(run, tmp_path, capsys):
    assert main(["report", str(run), "--out", str(tmp_path / "a"), "--top-k", "0"]) == 2
    assert "top_k" in capsys.readouterr().err
    assert main(["report", str(run), "--out", str(tmp_path / "b"), "--fractions", "2"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_agreement_where_no_model_has_a_comparison_says_so():
    from knockout.reporting.answer import FractionAnswer, agreement

    assert agreement([FractionAnswer(0.9, []), FractionAnswer(0.9, [])]) == "no comparison on any model"
