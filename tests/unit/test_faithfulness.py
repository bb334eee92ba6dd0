"""Faithfulness of circuits: hand-computed values, exact 1 and 0, a hand-written bootstrap over prompts, and curve
areas of known piecewise-linear curves."""

from __future__ import annotations

import numpy as np
import pytest

from knockout.errors import KnockoutError
from knockout.inference.faithfulness import (
    curve_areas,
    curve_difference,
    faithfulness,
    faithfulness_curve,
    faithfulness_difference,
    smallest_reaching,
)
from knockout.inference.paired import DocSums


def row(ld=None, ce=None, n=None):
    """Per-prompt sums as read from a run folder (``n``, ``ce_sum``, ``correct``, ``ld_sum``)."""
    size = len(ld if ld is not None else ce)
    n = np.ones(size, dtype=np.int64) if n is None else np.asarray(n)
    out = {"n": n, "ce_sum": np.asarray(ce if ce is not None else np.zeros(size), dtype=np.float64)}
    out["correct"] = np.zeros(size, dtype=np.int64)
    if ld is not None:
        out["ld_sum"] = np.asarray(ld, dtype=np.float64)
    return out


def noisy(rng, size, centre, spread=1.0):
    return centre + spread * rng.standard_normal(size)


def hand_bootstrap(rows: dict, field: str, n_boot: int, seed: int) -> dict:
    """Per row, its metric on each resample of the prompts (the same indices for every row), by a plain loop."""
    n = rows["full"]["n"].astype(np.float64)
    d = len(n)
    idx = np.random.default_rng(seed).integers(0, d, size=(n_boot, d))  # one chunk for few prompts
    return {k: np.array([r[field][i].sum() / n[i].sum() for i in idx]) for k, r in rows.items()}


def test_faithfulness_of_hand_built_sums():
    full, empty, circuit = row(ld=[4, 5, 6, 5, 5]), row(ld=[0, 1, -1, 0, 0]), row(ld=[2, 3, 2, 2, 1])
    f = faithfulness(full, circuit, empty, "ld")
    assert (f.full, f.empty, f.circuit) == (5.0, 0.0, 2.0)
    assert f.estimate == pytest.approx(0.4, abs=1e-15) and f.low <= 0.4 <= f.high and f.n_docs == 5
    # CE on the answer tokens, with several scored tokens per prompt: ratios of sums
    n = [1, 2, 1, 3, 1]
    full, empty, circuit = row(ce=[1, 2, 1, 3, 1], n=n), row(ce=[3, 6, 3, 9, 3], n=n), row(ce=[2, 5, 2, 6, 1], n=n)
    f = faithfulness(full, circuit, empty, "ce")
    assert f.full == 1.0 and f.empty == 3.0 and f.circuit == pytest.approx(16 / 8)
    assert f.estimate == pytest.approx((16 / 8 - 3) / (1 - 3))


@pytest.mark.parametrize("metric", ["ld", "ce"])
def test_circuit_equal_to_full_is_1_and_equal_to_empty_is_0_exactly(metric):
    rng = np.random.default_rng(1)
    make = lambda c: row(ld=noisy(rng, 40, c), ce=np.abs(noisy(rng, 40, c + 3)))  # noqa: E731
    full, empty = make(5.0), make(0.5)
    copy = lambda r: {k: v.copy() for k, v in r.items()}  # noqa: E731
    one = faithfulness(full, copy(full), empty, metric)
    assert (one.estimate, one.low, one.high) == (1.0, 1.0, 1.0)
    zero = faithfulness(full, copy(empty), empty, metric)
    assert (zero.estimate, zero.low, zero.high) == (0.0, 0.0, 0.0)
    assert one.n_resamples == zero.n_resamples == 2000


def test_interval_is_a_percentile_bootstrap_over_prompts_shared_by_the_rows():
    rng = np.random.default_rng(2)
    rows = {"full": row(ld=noisy(rng, 30, 5)), "circuit": row(ld=noisy(rng, 30, 3)), "empty": row(ld=noisy(rng, 30, 0))}
    got = faithfulness(rows["full"], rows["circuit"], rows["empty"], "ld", level=0.9, n_boot=500, seed=7)
    m = hand_bootstrap(rows, "ld_sum", 500, 7)
    f = (m["circuit"] - m["empty"]) / (m["full"] - m["empty"])
    assert (got.low, got.high) == pytest.approx(tuple(np.quantile(f, [0.05, 0.95])), rel=1e-9)
    again = faithfulness(rows["full"], rows["circuit"], rows["empty"], "ld", level=0.9, n_boot=500, seed=7)
    assert again == got  # deterministic


def test_paired_difference_of_two_methods():
    rng = np.random.default_rng(3)
    rows = {
        "full": row(ld=noisy(rng, 50, 5)),
        "ca": row(ld=noisy(rng, 50, 4, 0.5)),
        "ea": row(ld=noisy(rng, 50, 0)),
        "cb": row(ld=noisy(rng, 50, 1, 0.5)),
        "eb": row(ld=noisy(rng, 50, -1)),
    }
    r = rows
    d = faithfulness_difference(r["full"], r["ca"], r["ea"], r["cb"], r["eb"], "ld", n_boot=800, seed=4)
    fa = faithfulness(r["full"], r["ca"], r["ea"], "ld").estimate
    fb = faithfulness(r["full"], r["cb"], r["eb"], "ld").estimate
    assert d.a == fa and d.b == fb and d.difference.estimate == pytest.approx(fa - fb)
    m = hand_bootstrap(rows, "ld_sum", 800, 4)
    diff = (m["ca"] - m["ea"]) / (m["full"] - m["ea"]) - (m["cb"] - m["eb"]) / (m["full"] - m["eb"])
    assert (d.difference.low, d.difference.high) == pytest.approx(tuple(np.quantile(diff, [0.025, 0.975])), rel=1e-9)
    assert d.decided and d.difference.low > 0
    same = faithfulness_difference(r["full"], r["ca"], r["ea"], r["ca"], r["ea"], "ld")
    assert (same.difference.estimate, same.difference.low, same.difference.high) == (0.0, 0.0, 0.0)
    assert not same.decided


def test_curve_areas_of_known_piecewise_linear_curves():
    cpr, cmd = curve_areas([0, 0.25, 0.5, 1], [0, 0.5, 1, 1])
    assert cpr == pytest.approx(0.75) and cmd == pytest.approx(0.25)
    cpr, cmd = curve_areas([0, 0.5, 1], [0, 1.5, 1])  # above 1: CMD counts |1 - f|
    assert cpr == pytest.approx(1.0) and cmd == pytest.approx(0.5)
    cpr, cmd = curve_areas([0.1, 0.3], [[0.2, 0.4], [1, 1]])  # one curve per leading index, over [0.1, 0.3] only
    assert cpr == pytest.approx([0.06, 0.2]) and cmd == pytest.approx([0.14, 0.0])
    assert smallest_reaching([1, 2, 4, 8], [0.1, 0.79, 0.8, 0.7]) == 4
    assert smallest_reaching([1, 2], [0.1, 0.2]) is None


def _scaled_rows(full, empty, fs):
    """Circuit rows whose faithfulness is exactly ``f`` on every prompt subset: empty + f * (full - empty)."""
    return [row(ld=empty["ld_sum"] + f * (full["ld_sum"] - empty["ld_sum"])) for f in fs]


def test_faithfulness_curve_of_a_known_curve():
    rng = np.random.default_rng(5)
    full, empty = row(ld=noisy(rng, 20, 5)), row(ld=noisy(rng, 20, 0, 0.3))
    circuits = [empty, *_scaled_rows(full, empty, [0.5]), full, full]  # k = 0 is the empty row, k = total the full
    curve = faithfulness_curve(full, circuits, empty, sizes=[0, 2, 4, 8], total=8, metric="ld")
    assert curve.x == (0, 0.25, 0.5, 1) and curve.faithfulness[0] == 0.0 and curve.faithfulness[2:] == (1.0, 1.0)
    assert curve.faithfulness[1] == pytest.approx(0.5)
    assert curve.cpr.estimate == pytest.approx(0.75) and curve.cmd.estimate == pytest.approx(0.25)
    assert curve.cpr.low == pytest.approx(0.75) and curve.cpr.high == pytest.approx(0.75)  # exact in every resample
    assert curve.k_reached == 4 and curve.threshold == 0.8


def test_curve_difference_pairs_the_areas_over_prompts():
    rng = np.random.default_rng(6)
    full, ea, eb = row(ld=noisy(rng, 25, 5)), row(ld=noisy(rng, 25, 0)), row(ld=noisy(rng, 25, -0.5))
    ca = [row(ld=noisy(rng, 25, c)) for c in (1, 3, 4.5)]
    cb = [row(ld=noisy(rng, 25, c)) for c in (0, 1, 2)]
    sizes, total = [1, 3, 9], 9
    got = curve_difference(full, ca, ea, cb, eb, sizes, total, "ld", n_boot=600, seed=2)
    a = faithfulness_curve(full, ca, ea, sizes, total, "ld", n_boot=600, seed=2)
    assert got.a.faithfulness == a.faithfulness and got.a.cpr.estimate == a.cpr.estimate
    rows = {"full": full, "ea": ea, "eb": eb, **{f"a{i}": r for i, r in enumerate(ca)}}
    rows |= {f"b{i}": r for i, r in enumerate(cb)}
    m = hand_bootstrap(rows, "ld_sum", 600, 2)
    x = np.array(sizes) / total
    fa = np.stack([(m[f"a{i}"] - m["ea"]) / (m["full"] - m["ea"]) for i in range(3)], axis=1)
    fb = np.stack([(m[f"b{i}"] - m["eb"]) / (m["full"] - m["eb"]) for i in range(3)], axis=1)
    trap = lambda f: ((f[:, 1:] + f[:, :-1]) / 2 * np.diff(x)).sum(1)  # noqa: E731
    dcpr, dcmd = trap(fa) - trap(fb), trap(np.abs(1 - fa)) - trap(np.abs(1 - fb))
    assert (got.cpr.low, got.cpr.high) == pytest.approx(tuple(np.quantile(dcpr, [0.025, 0.975])), rel=1e-9)
    assert (got.cmd.low, got.cmd.high) == pytest.approx(tuple(np.quantile(dcmd, [0.025, 0.975])), rel=1e-9)
    assert got.cpr.estimate == pytest.approx(got.a.cpr.estimate - got.b.cpr.estimate)
    assert got.cpr.decided and got.cpr.estimate > 0 and got.cmd.estimate < 0


def test_docsums_serve_ce_and_bad_input_is_refused():
    d = lambda ce: DocSums(n=np.ones(4, dtype=int), ce_sum=np.asarray(ce, float), correct=np.zeros(4, int))  # noqa: E731
    f = faithfulness(d([1, 1, 1, 1]), d([2, 2, 2, 2]), d([3, 3, 3, 3]), "ce")
    assert f.estimate == 0.5
    with pytest.raises(KnockoutError, match="has no 'ld_sum'"):
        faithfulness(d([1, 1, 1, 1]), d([2, 2, 2, 2]), d([3, 3, 3, 3]), "ld")
    full, empty = row(ld=[1, 2, 3]), row(ld=[0, 0, 0])
    with pytest.raises(KnockoutError, match="scored other targets"):
        faithfulness(full, row(ld=[1, 1, 1], n=[1, 2, 1]), empty)
    with pytest.raises(KnockoutError, match="undefined"):
        faithfulness(full, row(ld=[1, 1, 1]), full)
    with pytest.raises(KnockoutError, match="unknown faithfulness metric"):
        faithfulness(full, full, empty, "top1")
    with pytest.raises(KnockoutError, match="strictly increasing"):
        faithfulness_curve(full, [full, full], empty, [2, 2], 4)
    with pytest.raises(KnockoutError, match="one row per size"):
        faithfulness_curve(full, [full], empty, [1, 2], 4)
    with pytest.raises(KnockoutError, match=r"lie in \[0, total"):
        faithfulness_curve(full, [full], empty, [5], 4)
    with pytest.raises(KnockoutError, match="level"):
        faithfulness(full, full, empty, level=1.5)
