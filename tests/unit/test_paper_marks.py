"""The marking rules of Table 2: the default rule reproduces the bold marks of the paper's own Table 2, and the
previous rule (``within-best-std``) is still available and behaves as before."""

from __future__ import annotations

import pytest

from knockout.errors import KnockoutError
from knockout.reporting.table import HIGHER_IS_BETTER, Cell, build_table, load_paper_table, mark_best

OPT, MISTRAL, VIT, ROBERTA = "OPT-1.3B", "Mistral-7B", "ViT-base-patch16-224", "RoBERTa-large"

# The bold cells of the paper's Table 2, as (metric, fraction, method, model), read from the <b>...</b> marks of
# /work/shared/paper/000_9e348c0ef298a3f6.txt (lines ~150-185) and matched to paper_table2.csv by value.
# The 50% rows convert cleanly (one value per model, in the order OPT, Mistral, ViT, RoBERTa). In the 90% blocks the
# conversion shifts the columns: the "90% Pruning Peak" line holds only three values, which are OPT's, Mistral's and
# ViT's peaks (top-1 12.81, 11.70, 0.20; CE 6.33, 6.45, 7.10: each equal to that model's peak in the CSV); RoBERTa's
# 90% peak is missing from the source, so it is neither in the CSV nor here. The ViT column has only peak, mean, zero
# and RS1 (random pixels, "resample-pixels"); the other lines' four values are OPT, Mistral, ViT, RoBERTa. So at 90%
# top-1 the bold 0.50 is ViT zero, 11.20 RoBERTa zero, 0.37 ViT RS1, and ViT peak 0.20 and RoBERTa mean 10.46 are
# not bold; at 90% CE the bold 6.35 is OPT mean, 6.99 ViT zero, 11.32 RoBERTa RS2 ("resample-tokens").
PAPER_MARKS = {
    # top-1, 50%
    ("top1", 0.5, "peak", OPT),
    ("top1", 0.5, "peak", MISTRAL),
    ("top1", 0.5, "peak", VIT),
    ("top1", 0.5, "mean", VIT),
    ("top1", 0.5, "zero", VIT),
    ("top1", 0.5, "peak", ROBERTA),
    # top-1, 90%
    ("top1", 0.9, "peak", OPT),
    ("top1", 0.9, "peak", MISTRAL),
    ("top1", 0.9, "zero", VIT),
    ("top1", 0.9, "resample-pixels", VIT),
    ("top1", 0.9, "zero", ROBERTA),
    # CE, 50%
    ("ce", 0.5, "peak", OPT),
    ("ce", 0.5, "peak", MISTRAL),
    ("ce", 0.5, "peak", VIT),
    ("ce", 0.5, "mean", VIT),
    ("ce", 0.5, "zero", VIT),
    ("ce", 0.5, "peak", ROBERTA),
    # CE, 90%
    ("ce", 0.9, "peak", OPT),
    ("ce", 0.9, "mean", OPT),
    ("ce", 0.9, "peak", MISTRAL),
    ("ce", 0.9, "zero", VIT),
    ("ce", 0.9, "resample-tokens", ROBERTA),
}


def _marks(rule: str | None) -> tuple[set[tuple], int]:
    """The cells ``rule`` marks on the paper's own table (None: the default rule), and the number of cells."""
    blocks: dict[tuple, list[dict]] = {}
    for r in load_paper_table():
        if r["method"] != "baseline":
            blocks.setdefault((r["metric"], r["fraction"], r["model"]), []).append(r)
    marked, n = set(), 0
    for (metric, fraction, model), rows in blocks.items():
        cells = [Cell(r["mean"], r["std"]) for r in rows]
        kwargs = {} if rule is None else {"rule": rule}
        mark_best(cells, HIGHER_IS_BETTER[metric], **kwargs)
        marked |= {(metric, fraction, r["method"], model) for r, c in zip(rows, cells) if c.best}
        n += len(cells)
    return marked, n


def test_paper_marks_read_from_the_table():
    """Every mark names a cell of the paper's table (so a misread method or model cannot pass silently)."""
    cells = {(r["metric"], r["fraction"], r["method"], r["model"]) for r in load_paper_table()}
    assert PAPER_MARKS <= cells
    assert ("top1", 0.9, "peak", ROBERTA) not in cells  # missing from the source


def test_default_rule_reproduces_the_papers_marks():
    marked, n = _marks(None)
    assert n == 86  # 2 metrics x 2 fractions x (6 + 6 + 4 + 6 methods), less RoBERTa's 90% peak (top-1, CE)
    assert marked == PAPER_MARKS
    assert _marks("paper")[0] == PAPER_MARKS


def test_within_best_std_on_the_papers_table():
    """The previous rule marks three cells the paper does not (the reason it is no longer the default)."""
    marked, _ = _marks("within-best-std")
    assert marked - PAPER_MARKS == {("top1", 0.9, "mean", OPT), ("top1", 0.9, "peak", VIT), ("top1", 0.9, "mean", VIT)}
    assert PAPER_MARKS <= marked


def test_paper_rule_on_hand_made_cells():
    # best 2.0 ± 0.3 (lower is better); 2.25 is 0.25 away, more than half its own std 0.01; 2.1 ± 0.2 is exactly
    # half its std away (marked: the boundary is included, with a slack against float rounding); 2.31 ± 0 is not.
    cells = [Cell(2.0, 0.3), Cell(2.25, 0.01), Cell(2.1, 0.2), Cell(2.31, 0.0), None]
    mark_best(cells, higher_is_better=False)
    assert [c.best for c in cells[:4]] == [True, False, True, False]
    # a far-away method with a large std is marked: the best lies inside its own half-std band
    cells = [Cell(50.0, 0.1), Cell(47.0, 6.0), Cell(47.0, 5.0)]
    mark_best(cells, higher_is_better=True)
    assert [c.best for c in cells] == [True, True, False]
    # single seed: only exact ties
    cells = [Cell(10.0, 0.0), Cell(10.0, 0.0), Cell(9.99, 0.0)]
    mark_best(cells, higher_is_better=True)
    assert [c.best for c in cells] == [True, True, False]


def test_within_best_std_on_hand_made_cells():
    """The previous default, unchanged: every method within one std of the best entry (the best's std)."""
    cells = [Cell(2.0, 0.3), Cell(2.25, 0.01), Cell(2.31, 0.0), None]
    mark_best(cells, higher_is_better=False, rule="within-best-std")
    assert [c.best for c in cells[:3]] == [True, True, False]  # 0.25 <= 0.3 < 0.31
    cells = [Cell(50.0, 0.1), Cell(47.0, 6.0)]
    mark_best(cells, higher_is_better=True, rule="within-best-std")
    assert [c.best for c in cells] == [True, False]  # 3 > 0.1, whatever the candidate's own std
    cells = [Cell(10.0, 0.0), Cell(10.0, 0.0), Cell(9.99, 0.0)]
    mark_best(cells, higher_is_better=True, rule="within-best-std")
    assert [c.best for c in cells] == [True, True, False]


def _summary(values: dict[tuple[str, float], tuple[float, float]]) -> list[dict]:
    """A summarize()-like list: top-1 as a fraction with its std, CE fixed."""
    return [
        {"method": m, "fraction": f, "n_seeds": 3, "top1_mean": mean, "top1_std": std, "ce_mean": 1.0, "ce_std": 0.0}
        for (m, f), (mean, std) in values.items()
    ]


def test_build_table_rule():
    # top-1 in %: peak 45 ± 0.8 best; mean 44 ± 3 is 1 point below: more than the best's std 0.8, within half its own
    # std 1.5; zero 40 ± 2 is 5 points below: neither.
    summary = _summary({("peak", 0.5): (0.45, 0.008), ("mean", 0.5): (0.44, 0.03), ("zero", 0.5): (0.40, 0.02)})
    marks = {}
    for rule in ("paper", "within-best-std"):
        table = build_table([("r", summary)], (0.5,), ["peak", "mean", "zero"], rule=rule)
        marks[rule] = [row.cells["r:top1"].best for row in table.rows[1:]]
    assert marks["paper"] == [True, True, False]
    assert marks["within-best-std"] == [True, False, False]
    default = build_table([("r", summary)], (0.5,), ["peak", "mean", "zero"])
    assert [row.cells["r:top1"].best for row in default.rows[1:]] == marks["paper"]
    with pytest.raises(KnockoutError, match="marking rule"):
        build_table([("r", summary)], (0.5,), rule="best")
    with pytest.raises(KnockoutError, match="marking rule"):
        mark_best([Cell(1.0, 0.0)], True, rule="best")
