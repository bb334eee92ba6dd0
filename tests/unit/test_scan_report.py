"""The scan report's statistics and its answer, on hand-made effects: ranks, correlations, top-k, the three answers,
and whether the evaluation set resolves a disagreement."""

from pathlib import Path

import numpy as np
import pytest

from knockout.config import SweepConfig
from knockout.reporting.scan import ScanData, agreement, heatmap_figure, ranks, spearman, top_k, verdict

UNITS = ["L0.H0", "L0.H1", "L1.H0", "L1.H1", "L2.H0", "L2.H1"]


def _data(effects: dict[str, list[float]], docs: dict | None = None, k: int = 2) -> ScanData:
    eff = {m: dict(zip(UNITS, v)) for m, v in effects.items()}
    se = {m: {u: 0.01 for u in UNITS} for m in effects}
    return ScanData(
        Path("."), SweepConfig(model="tiny", scan={"unit": "head", "top_k": k}), UNITS, list(effects), "ce", eff,
        {m: {} for m in effects}, se, {}, 5, [0], docs=docs or {},
    )  # fmt: skip


def test_ranks_and_spearman_match_a_hand_computation():
    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 40.0, 30.0])
    assert spearman(x, y) == pytest.approx(np.corrcoef([1, 2, 3, 4], [1, 2, 4, 3])[0, 1])
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert np.isnan(spearman(x, np.ones(4)))


def test_top_k_orders_by_size_of_the_effect_and_keeps_unit_order_on_ties():
    effects = {"a": 0.1, "b": -0.5, "c": 0.5, "d": 0.0}
    assert top_k(["a", "b", "c", "d"], effects, 3) == ["b", "c", "a"]


def test_no_when_every_method_has_the_same_top_k():
    data = _data({"zero": [5, 4, 1, 0, 0, 0], "mean": [5, -4.5, 0, 1, 0, 0]})  # same top-1 and top-2 set
    level, text = verdict(data, agreement(data))
    assert level == "no" and text.startswith("No: every method finds the same top-2 heads")


def test_partly_when_the_top_unit_agrees_but_the_top_k_does_not():
    data = _data({"zero": [5, 4, 1, 0, 0, 0], "mean": [5, 0, 4, 0, 0, 0]})
    pairs = agreement(data)
    assert pairs[0]["top_k_overlap"] == 1 and pairs[0]["only_a"] == "L0.H1" and pairs[0]["only_b"] == "L1.H0"
    level, text = verdict(data, pairs)
    assert level == "partly" and "agree on the most important unit (L0.H0)" in text
    assert "L0.H1: zero +4 ± 0.01, mean +0 ± 0.01" in text


def _docs(first: dict[str, list[float]], second: dict[str, list[float]]) -> dict:
    """Per-document sums: five documents of one target each, baseline 0, the two top units under each method."""
    n = np.ones(5)
    return {
        "n": {"": n},
        "baseline": {"": np.zeros(5)},
        **{m: {"L0.H0": np.array(first[m]), "L1.H0": np.array(second[m])} for m in first},
    }


def test_yes_and_whether_the_disagreement_is_resolved():
    effects = {"zero": [5, 0, 1, 0, 0, 0], "mean": [1, 0, 5, 0, 0, 0]}
    clear = _docs({"zero": [5, 5.1, 4.9, 5, 5], "mean": [1, 1, 1.1, 0.9, 1]},
                  {"zero": [1, 1, 1, 1.1, 0.9], "mean": [5, 5, 5.2, 4.8, 5]})  # fmt: skip
    level, text = verdict(_data(effects, clear), agreement(_data(effects, clear)))
    assert level == "yes" and "differs between methods (zero L0.H0, mean L1.H0)" in text
    assert "The evaluation set resolves this" in text and "under zero, L0.H0 leads L1.H0 by 4 ±" in text
    noisy = _docs({"zero": [15, -5, 9, 1, 5], "mean": [1, 1, 1.1, 0.9, 1]},
                  {"zero": [1, 1, 1, 1.1, 0.9], "mean": [9, 1, 8, 2, 5]})  # fmt: skip
    level, text = verdict(_data(effects, noisy), agreement(_data(effects, noisy)))
    assert level == "yes" and "does not resolve it" in text


def test_lead_is_a_paired_difference_of_sizes():
    effects = {"zero": [2, 0, -3, 0, 0, 0]}
    docs = _docs({"zero": [2, 2, 2, 2, 2]}, {"zero": [-3, -3, -2, -4, -3]})
    value, se = _data(effects, docs).lead("zero", "L1.H0", "L0.H0")  # |-3| - |2| per document: 1, 1, 0, 2, 1
    assert value == pytest.approx(1.0)
    assert se == pytest.approx(np.std([1, 1, 0, 2, 1], ddof=1) / np.sqrt(5))


def test_heatmap_leaves_missing_units_blank():
    data = _data({"zero": [1, 2, 3, 4, 5, 6]})
    del data.effects["zero"]["L2.H1"]
    fig = heatmap_figure(data, "zero", 6.0)
    grid = fig.axes[0].images[0].get_array()
    values = np.ma.filled(grid.astype(float), np.nan)
    assert values.shape == (3, 2) and values[1, 0] == 3 and values[0, 1] == 2 and np.isnan(values[2, 1])
