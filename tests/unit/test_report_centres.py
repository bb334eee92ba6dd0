"""Report parts of the centres: point-mass counts (against centres.point_mass on the stored file), point-mass
neurons labelled in the atypical gallery and CSV, and the table of results against the peak's bin width."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from knockout.reporting import write_report
from knockout.reporting.eps import eps_rows, peak_variants
from knockout.reporting.figures import gallery_figure
from knockout.reporting.neurons import StatsFile, point_mass_counts, rank_atypical
from knockout.runfolder import ResultRow, write_rows
from knockout.stats import Statistics, centres

EPS = 0.05
METHODS = ("zero", "peak", "peak@fd", "peak@0.2", "peak@0.1", "peak@0.5std")
SEEDS = (0, 1)
FRACTIONS = (0.5, 0.9)
POINT_MASSES = {(0, 2): 2.5, (1, 4): -1.8, (1, 9): 3.1}  # (layer, neuron) -> spike value, far from the bulk
SHOULDER = (0, 6)  # a spike on the bulk's shoulder: under 5 times its neighbours, a point mass by the bulk test
OFF_MODE = (1, 12)  # 10% in a narrow N(2, 0.08): the histogram's peak, but not the KDE mode and not a point mass
PLANTED = {**POINT_MASSES, SHOULDER: 1.2}


def _ce(method: str, fraction: float, seed: int) -> float:
    return 2.0 + fraction * (1 + METHODS.index(method)) + 0.01 * seed


def make_stats() -> Statistics:
    """Two layers of 16 N(0, 1) neurons, 20,000 values each; the neurons of POINT_MASSES get 4% of their values
    replaced by one repeated value (as a common first token's pre-out at position 0), SHOULDER 350 values at 1.2 and
    OFF_MODE a narrow second component."""
    rng = np.random.default_rng(1)
    stats = Statistics([16, 16], eps=EPS, meta={"model": "{}", "data": "synthetic"})
    n = 20000
    for layer in range(2):
        x = rng.normal(0.0, 1.0, size=(n, 16))
        for (pl, neuron), value in POINT_MASSES.items():
            if pl == layer:
                x[rng.random(n) < 0.04, neuron] = value
        if layer == SHOULDER[0]:
            x[:350, SHOULDER[1]] = 1.2
        if layer == OFF_MODE[0]:
            narrow = rng.random(n) < 0.1
            x[narrow, OFF_MODE[1]] = rng.normal(2.0, 0.08, int(narrow.sum()))
        stats.add(layer, torch.from_numpy(x))
    return stats


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "run"
    path.mkdir()
    rows = []
    for seed in SEEDS:
        base = ResultRow.measured("baseline", 0.0, seed, 0.5, 2.0, 100, 0, 32, 0.5)
        rows.append(base)
        for m in METHODS:
            for f in FRACTIONS:
                rows.append(ResultRow.measured(m, f, seed, 0.4, _ce(m, f, seed), 100, round(32 * f), 32, 1.0, base))
    write_rows(path, rows)
    identity = {"name": "synthetic", "model_type": "llama", "n_layers": 2, "widths": [16, 16], "n_heads": 4}
    config = {
        "model": "synthetic",
        "data": "synthetic.txt",
        "methods": list(METHODS),
        "fractions": list(FRACTIONS),
        "seeds": list(SEEDS),
        "eps": EPS,
        "resolved": {"task": "causal", "model_identity": identity},
    }
    (path / "config.json").write_text(json.dumps(config))
    make_stats().save(path / "stats.safetensors")
    write_report(path, top_k=2)
    return path


def test_point_mass_counts_in_the_report_equal_centres_on_the_stored_file(run):
    stats = Statistics.load(run / "stats.safetensors")
    want = [int(centres.point_mass(layer).sum()) for layer in stats.layers]
    assert want == [2, 2]  # the planted ones, and no Gaussian neuron
    with open(run / "report" / "point_masses.csv") as f:
        got = [int(r["point_masses"]) for r in csv.DictReader(f)]
    assert got == want
    sentence = "Point-mass peaks: 4 of 32 neurons (12.50%)"
    assert sentence in (run / "report" / "report.md").read_text()
    assert sentence in (run / "report" / "report.html").read_text()
    assert "per layer: L0: 2, L1: 2." in (run / "report" / "report.md").read_text()
    assert "Peaks far from the KDE mode: 1 other neurons (3.12%)" in (run / "report" / "report.md").read_text()


def test_point_mass_neurons_are_labelled_in_the_csv(run):
    with open(run / "report" / "atypical_neurons.csv") as f:
        recs = {(int(r["layer"]), int(r["neuron"])): r for r in csv.DictReader(f)}
    assert len(recs) == 32
    for key, r in recs.items():
        assert (r["point_mass"] == "True") == (key in PLANTED)
        assert abs(float(r["mode"])) < 0.3  # every bulk is N(0, 1)
        assert (r["peak_off_mode"] == "True") == (key == OFF_MODE)
        if key in PLANTED:
            assert float(r["peak"]) == pytest.approx(PLANTED[key], abs=EPS)  # the stored peak is the spike
            assert abs(float(r["peak_nopm"])) < 0.3  # the bulk's peak
            assert float(r["offset"]) < 0.3  # ranked by the bulk, not by the spike


def test_gallery_ranks_by_the_bulk_and_labels_point_masses(run):
    stats = StatsFile(run / "stats.safetensors")
    scores, hists = rank_atypical(stats, top_k=32)
    assert point_mass_counts(scores, len(stats)) == [2, 2]
    assert not any(s.point_mass for s in scores[:3] if s.offset > 1)  # no spike outranks real shapes by its offset
    shown = [s for s in scores if s.point_mass] + scores[:3]  # the gallery draws what it is given
    off_mode = [s for s in scores if (s.layer, s.neuron) == OFF_MODE]
    shown = shown + off_mode
    fig = gallery_figure([(s, hists[(s.layer, s.neuron)]) for s in shown], n_heads=4)
    assert "peak far from the KDE mode" in fig.axes[len(shown) - 1].get_title()
    for s, ax in zip(shown, fig.axes):
        assert ("point mass" in ax.get_title()) == ((s.layer, s.neuron) in PLANTED)
        assert any(x.startswith("mode (KDE)") for x in [line.get_label() for line in ax.get_lines()])
        labels = [line.get_label() for line in ax.get_lines()]
        if s.point_mass:
            assert any("(point mass)" in x for x in labels) and any("w/o point mass" in x for x in labels)
        else:
            assert not any("point mass" in x for x in labels)


def test_eps_table_in_the_report(run):
    md = (run / "report" / "eps.md").read_text().splitlines()
    order = [line.split("|")[1].strip() for line in md[2:]]
    assert order == ["peak", "peak@0.1", "peak@0.2", "peak@0.5std", "peak@fd"]  # absolute ascending, relative, FD
    assert "0.05 (stored)" in md[2]
    peak = md[2].split("|")
    assert peak[3].strip() == f"{(_ce('peak', 0.5, 0) + _ce('peak', 0.5, 1)) / 2:.4f} ± {0.01 / 2**0.5:.4f}"
    report_md = (run / "report" / "report.md").read_text()
    assert (
        "## Peak against bin width" in report_md
        and "Peak against bin width" in (run / "report" / "report.html").read_text()
    )


def test_eps_table_only_with_peak_variants():
    summary = [{"method": m, "fraction": 0.5, "ce_mean": 1.0, "ce_std": 0.0, "top1_mean": 0.5, "top1_std": 0.0}
               for m in ("zero", "peak", "peak@0.1", "peak@bad")]  # fmt: skip
    assert eps_rows(summary, ["zero", "peak"], (0.5,), 0.01) == []
    assert eps_rows(summary, ["peak@0.1"], (0.5,), 0.01) == []  # one width: nothing to compare
    rows = eps_rows(summary, ["zero", "peak", "peak@0.1", "peak@bad"], (0.5, 0.9), 0.01)
    assert [r["method"] for r in rows] == ["peak", "peak@0.1"] and rows[0]["CE at 90%"] == "–"
    assert [m for m, _ in peak_variants(["peak", "peak@fd", "peak@0.02"], None)] == ["peak@0.02", "peak@fd"]


def test_the_peak_noise_note_uses_the_documents_both_methods_have():
    """Documents on demand may grow peak's rows and not peak-smooth's: the note compares them on the documents both
    have, as the same note on rows cut to those documents by hand."""
    from knockout.inference.paired import DocSums
    from knockout.reporting.centres import peak_noise_notes

    rng = np.random.default_rng(0)

    def sets(n_docs: int, shift: float) -> list[DocSums]:
        n = np.full(n_docs, 50, dtype=np.int64)
        return [DocSums(n, n * (3.0 + shift + rng.normal(0, 0.1, n_docs)), n // 2) for _ in range(4)]

    peak, smooth = sets(24, 0.05), sets(12, 0.0)
    cut = [DocSums(s.n[:12], s.ce_sum[:12], s.correct[:12]) for s in peak]
    (note,) = peak_noise_notes({"peak": peak, "peak-smooth": smooth}, 0.5)
    assert note == peak_noise_notes({"peak": cut, "peak-smooth": smooth}, 0.5)[0] and "4 sets" in note
