"""Paired method comparisons, checked against independent computations: textbook t intervals, the delta-method
(linearised) variance of a ratio of sums computed by hand, known standard errors of simulated data, coverage over
simulated data sets, and hand-counted top-1 numbers."""

from __future__ import annotations

import math
import time
from statistics import NormalDist

import numpy as np
import pytest

from knockout.errors import KnockoutError
from knockout.inference.paired import DocSums, paired_difference
from knockout.inference.paired import _t_quantile as t_quantile
from knockout.inference.sequential import Plan, SequentialTest

# Student t quantiles from printed tables (two-sided 95% unless stated).
T_TABLE = {(0.975, 1): 12.706205, (0.975, 2): 4.302653, (0.975, 5): 2.570582, (0.975, 30): 2.042272}
T_TABLE[(0.995, 10)] = 3.169273


def _pair(n, x_a, x_b=None, metric="ce") -> tuple[DocSums, DocSums]:
    """Rows A and B on the same documents; B's values default to a fixed positive baseline."""
    n = np.asarray(n)
    if metric == "ce":
        base = 2.0 * n if x_b is None else x_b
        return DocSums(n, base + x_a, np.zeros_like(n)), DocSums(n, base, np.zeros_like(n))
    base = np.zeros_like(n) if x_b is None else x_b
    return DocSums(n, np.zeros(len(n)), base + x_a), DocSums(n, np.zeros(len(n)), base)


def _simulate(rng, n_seeds, n_docs, delta, tau, shared_sd, own_sd, equal_n=False):
    """CE rows with per-token difference ``delta + u_s + a_d + b_sd`` averaged within each document.

    ``u_s ~ N(0, tau)`` is the seed effect, ``a_d ~ N(0, shared_sd)`` a document effect shared by all seeds and
    ``b_sd ~ N(0, own_sd)`` per seed and document. ``n`` is 8 per document or uniform on 1..15.
    """
    shared = rng.normal(0, shared_sd, n_docs)
    a, b = [], []
    for _ in range(n_seeds):
        n = np.full(n_docs, 8) if equal_n else rng.integers(1, 16, n_docs)
        per_token = delta + rng.normal(0, tau) + shared + rng.normal(0, own_sd, n_docs)
        ra, rb = _pair(n, n * per_token, x_b=rng.gamma(2.0, 1.0, n_docs) * n)
        a.append(ra)
        b.append(rb)
    return a, b


def _delta_method(a, b):
    """By hand: each seed's ratio ``D_s``, and the ``[S, S]`` covariance of the ratios under document sampling,
    linearised and unbiased: ``C[s, t] = N / (N - 1) sum_d z[s, d] z[t, d]`` with
    ``z[s, d] = (x[s, d] - D_s n[s, d]) / N_s`` (``N_s`` the seed's targets, ``N`` the documents)."""
    x = np.stack([ra.ce_sum - rb.ce_sum for ra, rb in zip(a, b)])
    n = np.stack([ra.n for ra in a]).astype(float)
    ratio = x.sum(1) / n.sum(1)
    z = (x - ratio[:, None] * n) / n.sum(1)[:, None]
    n_docs = x.shape[1]
    return ratio, z @ z.T * n_docs / (n_docs - 1)


def _docs_df(a):
    """Satterthwaite's degrees of freedom of a weighted mean's variance: ``(N - 1) (sum w^2)^2 / (N sum w^4)``, with
    ``w_d`` document ``d``'s length over the mean length, averaged over seeds."""
    n = np.stack([ra.n for ra in a]).astype(float)
    w = (n / n.mean(1, keepdims=True)).mean(0)
    return (len(w) - 1) * (w**2).sum() ** 2 / (len(w) * (w**4).sum())


@pytest.mark.parametrize("metric", ["ce", "top1"])
@pytest.mark.parametrize("n_seeds", [1, 3])
def test_identical_methods_give_exactly_zero(metric, n_seeds):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n_seeds):
        n = rng.integers(1, 10, 50)
        rows.append(DocSums(n, rng.gamma(2.0, 1.0, 50) * n, rng.binomial(n, 0.4)))
    d = paired_difference(rows, list(rows), metric)
    assert (d.estimate, d.low, d.high, d.se) == (0.0, 0.0, 0.0, 0.0)
    assert not d.significant
    assert (d.n_seeds, d.n_docs, d.metric) == (n_seeds, 50, metric)


def test_top1_and_ce_are_ratios_of_sums_by_hand():
    n0, n1 = np.array([1, 3, 6]), np.array([2, 2, 4])
    a = [DocSums(n0, [1.0, 6.0, 9.0], [1, 2, 3]), DocSums(n1, [4.0, 2.0, 6.0], [2, 1, 1])]
    b = [DocSums(n0, [1.0, 3.0, 6.0], [0, 3, 1]), DocSums(n1, [2.0, 2.0, 4.0], [1, 1, 0])]
    # top-1: seed 0 is 6/10 - 4/10 = 0.2, seed 1 is 4/8 - 2/8 = 0.25 (not the mean of per-document ratios).
    assert a[0].metric("top1") == pytest.approx(0.6) and b[1].metric("top1") == pytest.approx(0.25)
    assert paired_difference(a, b, "top1").estimate == pytest.approx(0.225)
    # CE: seed 0 is 16/10 - 10/10 = 0.6, seed 1 is 12/8 - 8/8 = 0.5.
    assert a[0].metric("ce") == pytest.approx(1.6)
    assert paired_difference(a, b, "ce").estimate == pytest.approx(0.55)


def test_seed_variation_only_gives_the_textbook_t_interval():
    # Every document's top-1 difference is d_s * n: resampling documents never changes a seed's ratio, so only the
    # seeds vary and the interval must be mean ± t(S-1) * s / sqrt(S), here 0.5 ± 4.302653 * 0.25 / sqrt(3).
    a, b = [], []
    rng = np.random.default_rng(1)
    for d_s in (0.25, 0.5, 0.75):
        n = 4 * rng.integers(1, 6, 40)
        ra, rb = _pair(n, (d_s * n).astype(int), x_b=np.zeros(40, int), metric="top1")
        a.append(ra)
        b.append(rb)
    d = paired_difference(a, b, "top1")
    half = T_TABLE[(0.975, 2)] * 0.25 / math.sqrt(3)
    assert d.estimate == pytest.approx(0.5)
    assert d.se == pytest.approx(0.25 / math.sqrt(3), abs=1e-12) and d.se_docs == pytest.approx(0, abs=1e-12)
    assert (d.low, d.high) == (pytest.approx(0.5 - half, abs=1e-6), pytest.approx(0.5 + half, abs=1e-6))
    assert not d.significant  # three seeds this far apart do not establish the difference: half = 0.62 > 0.5


def test_one_seed_matches_the_known_standard_error():
    # 2000 documents of 8 tokens, per-document mean difference 0.05 + N(0, 0.4): SE of the mean is 0.4 / sqrt(2000).
    rng = np.random.default_rng(2)
    a, b = _simulate(rng, 1, 2000, delta=0.05, tau=0.0, shared_sd=0.4, own_sd=0.0, equal_n=True)
    d = paired_difference(a, b, "ce")
    true_se = 0.4 / math.sqrt(2000)
    per_doc = (a[0].ce_sum - b[0].ce_sum) / 8
    sample_se = per_doc.std(ddof=1) / math.sqrt(2000)  # equal lengths: the textbook standard error of a mean
    assert d.se == pytest.approx(sample_se, rel=1e-9)
    # Against the truth, the sample's own error adds another 1.6% (sd): 10% is > 4 combined sd.
    assert d.se == pytest.approx(true_se, rel=0.10)
    assert abs(d.estimate - 0.05) < 4 * true_se
    assert d.estimate == pytest.approx(per_doc.mean())
    # One seed: estimate ± t(1999) * se, and t(1999) lies between the normal quantile and t(30).
    ratio = (d.high - d.low) / 2 / d.se
    assert NormalDist().inv_cdf(0.975) < ratio < 1.962
    assert d.se_docs == pytest.approx(d.se) and d.significant


def test_one_seed_unequal_lengths_match_the_delta_method():
    rng = np.random.default_rng(3)
    a, b = _simulate(rng, 1, 2000, delta=0.05, tau=0.0, shared_sd=0.4, own_sd=0.0)
    _, cov = _delta_method(a, b)
    d = paired_difference(a, b, "ce")
    assert d.se == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-9)
    assert (d.high - d.low) / 2 == pytest.approx(t_quantile(0.975, _docs_df(a)) * d.se, rel=1e-9)


@pytest.mark.parametrize(
    "tau, shared_sd, own_sd",
    [(0.05, 0.3, 0.3), (0.0, 0.0, 0.5), (0.0, 0.5, 0.2)],
    ids=["seed-effect", "independent-docs", "mostly-shared-docs"],
)
def test_three_seeds_match_the_random_effects_formula_by_hand(tau, shared_sd, own_sd):
    rng = np.random.default_rng(4)
    a, b = _simulate(rng, 3, 1500, delta=0.05, tau=tau, shared_sd=shared_sd, own_sd=own_sd)
    ratio, cov = _delta_method(a, b)
    v = np.mean(np.diag(cov))
    c = (cov.sum() - np.trace(cov)) / 6
    between = np.var(ratio, ddof=1)
    t_docs = t_quantile(0.975, _docs_df(a))
    expected_se = math.sqrt(c + max(between, v - c) / 3)
    expected_half = math.sqrt(max(t_quantile(0.975, 2) ** 2 * between, t_docs**2 * (v - c)) / 3 + t_docs**2 * c)
    d = paired_difference(a, b, "ce")
    assert d.estimate == pytest.approx(ratio.mean())
    assert d.se == pytest.approx(expected_se, rel=1e-9)
    assert (d.high - d.low) / 2 == pytest.approx(expected_half, rel=1e-9)
    assert d.se_docs == pytest.approx(math.sqrt(cov.mean()), rel=1e-9)


def test_shared_documents_are_not_counted_as_independent():
    # Three seeds with identical rows carry no more information than one: same interval, not one sqrt(3) narrower
    # (resampling documents independently per seed would give that).
    rng = np.random.default_rng(5)
    a, b = _simulate(rng, 1, 500, delta=0.05, tau=0.0, shared_sd=0.5, own_sd=0.0)
    one = paired_difference(a, b, "ce")
    three = paired_difference(a * 3, b * 3, "ce")
    assert (three.estimate, three.low, three.high) == pytest.approx((one.estimate, one.low, one.high), rel=1e-9)


@pytest.mark.parametrize(
    "tau, shared_sd, own_sd", [(0.0, 0.4, 0.1), (0.1, 0.3, 0.3)], ids=["documents-only", "seed-effect"]
)
def test_95_percent_intervals_cover_the_true_difference(tau, shared_sd, own_sd):
    # 200 data sets of 3 seeds x 100 documents; binomial sd of the coverage at 95% is 1.5%, so 90-99% is > 3 sd wide.
    # (The interval is conservative, ~99%, when per-seed document noise alone varies between few seeds: it cannot
    # tell that from a seed effect. Here the document effect is mostly shared, as when seeds score the same tokens.)
    rng = np.random.default_rng(6)
    delta, covered, estimates = 0.1, 0, []
    for i in range(200):
        a, b = _simulate(rng, 3, 100, delta=delta, tau=tau, shared_sd=shared_sd, own_sd=own_sd)
        d = paired_difference(a, b, "ce", n_boot=200, seed=i)
        covered += d.low <= delta <= d.high
        estimates.append(d.estimate)
    assert 0.90 <= covered / 200 <= 0.99
    assert abs(np.mean(estimates) - delta) < 4 * np.std(estimates) / math.sqrt(200)  # unbiased


def test_deterministic_and_fast():
    rng = np.random.default_rng(7)
    a, b = _simulate(rng, 3, 2000, delta=0.01, tau=0.01, shared_sd=0.3, own_sd=0.3)
    paired_difference(a, b, "ce")  # warm up
    start = time.perf_counter()
    first = paired_difference(a, b, "ce")
    elapsed = time.perf_counter() - start
    assert first == paired_difference(a, b, "ce")
    assert paired_difference(a, b, "ce", n_boot=200, seed=1) == first  # closed form: no resampling to seed
    assert elapsed < 0.1  # about a millisecond


def test_t_quantile_matches_tables_and_closed_forms():
    for (p, df), value in T_TABLE.items():
        assert t_quantile(p, df) == pytest.approx(value, abs=2e-6)
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
        assert t_quantile(p, math.inf) == pytest.approx(NormalDist().inv_cdf(p), rel=1e-12)
    assert t_quantile(0.975, 1e6) == pytest.approx(NormalDist().inv_cdf(0.975), rel=1e-5)
    assert t_quantile(0.975, 2) > t_quantile(0.975, 2.5) > t_quantile(0.975, 3)


def _rows(n_docs=20, seeds=2):
    rng = np.random.default_rng(8)
    out = []
    for _ in range(seeds):
        n = rng.integers(1, 5, n_docs)
        out.append(DocSums(n, rng.gamma(2.0, 1.0, n_docs) * n, rng.binomial(n, 0.5)))
    return out


def _replace(row, **fields):
    return DocSums(**{"n": row.n, "ce_sum": row.ce_sum, "correct": row.correct, **fields})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: ([], []), "no rows"),
        (lambda r: (r, r[:1]), "different numbers of seeds"),
        (lambda r: (r, [r[0], _rows(n_docs=21)[1]]), "document counts differ"),
        (lambda r: ([r[0], _rows(n_docs=21)[1]],) * 2, "document counts differ"),
        (lambda r: (r, [r[0], _replace(r[1], n=r[1].n + 1)]), "not paired"),
        (lambda r: ([_replace(x, n=0 * x.n, correct=0 * x.n) for x in r],) * 2, "no scored targets"),
        (lambda r: ([DocSums([], [], [])],) * 2, "no documents"),
    ],
    ids=["empty", "seed-count", "doc-count-a-b", "doc-count-seeds", "unpaired-n", "zero-n", "zero-docs"],
)
def test_bad_pairs_raise(make, message):
    a, b = make(_rows())
    with pytest.raises(KnockoutError, match=message):
        paired_difference(a, b, "ce")


def test_bad_arguments_and_rows_raise():
    r = _rows()
    for kwargs, message in [
        ({"metric": "accuracy"}, "unknown metric"),
        ({"metric": "ce", "level": 1.0}, "level"),
        ({"metric": "ce", "n_boot": 5}, "n_boot"),
    ]:
        with pytest.raises(KnockoutError, match=message):
            paired_difference(r, r, **kwargs)
    n = np.array([2, 3])
    for fields, message in [
        ({"n": n, "ce_sum": [1.0, 2.0], "correct": [3, 0]}, "exceeds n"),
        ({"n": [-1, 3], "ce_sum": [1.0, 2.0], "correct": [0, 0]}, "negative"),
        ({"n": [1.5, 3], "ce_sum": [1.0, 2.0], "correct": [0, 0]}, "integer"),
        ({"n": n, "ce_sum": [1.0, 2.0, 3.0], "correct": [0, 0]}, "length"),
        ({"n": n, "ce_sum": [1.0, math.nan], "correct": [0, 0]}, "finite"),
        ({"n": n[None], "ce_sum": [[1.0, 2.0]], "correct": [[0, 0]]}, "one-dimensional"),
    ]:
        with pytest.raises(KnockoutError, match=message):
            DocSums(**fields)
    with pytest.raises(KnockoutError, match="at least two methods"):
        SequentialTest(Plan((3,)), ["peak"], "ce")
    with pytest.raises(KnockoutError, match="needs 2 sets of .zero."):
        SequentialTest(Plan((2,)), ["peak", "zero"], "ce").look({"peak": r, "zero": []})


def _methods(rng, ce_per_token, top1_rate, n_seeds=3, n_docs=400):
    """Rows per method on shared documents: per-token CE ``level + doc effect + noise``, top-1 ~ Binomial."""
    ns = [rng.integers(4, 12, n_docs) for _ in range(n_seeds)]
    doc_ce = rng.gamma(4.0, 0.5, n_docs)
    rows = {}
    for name in ce_per_token:
        rows[name] = [
            DocSums(
                n,
                n * (doc_ce + ce_per_token[name] + rng.normal(0, 0.05, n_docs)),
                rng.binomial(n, top1_rate[name]),
            )
            for n in ns
        ]
    return rows


def _one_look(rows, metric):
    """The answer's verdicts for fixed seeds: one look at every set, Holm over the pairs at 5%."""
    test = SequentialTest(Plan((len(next(iter(rows.values()))),)), list(rows), metric, n_boot=2000)
    test.look(rows)
    return test.verdicts


def test_one_look_decides_the_clear_winner_for_each_metric():
    rng = np.random.default_rng(9)
    rows = _methods(rng, {"zero": 0.8, "mean": 0.5, "peak": 0.0}, {"zero": 0.2, "mean": 0.5, "peak": 0.3})
    ce = _one_look(rows, "ce")
    assert all(v.decided for v in ce.values())
    assert ce[("mean", "peak")].better == "peak" and ce[("zero", "peak")].better == "peak"
    by_hand = np.mean([r.metric("ce") for r in rows["mean"]]) - np.mean([r.metric("ce") for r in rows["peak"]])
    assert ce[("mean", "peak")].estimate == pytest.approx(by_hand)
    # Holm: the smallest difference is tested last, at alpha / 1 once the others are decided
    assert ce[("zero", "mean")].level == pytest.approx(1 - 0.05 / 3) or ce[("zero", "mean")].level >= 1 - 0.05 / 2
    top1 = _one_look(rows, "top1")  # highest top-1 wins, not lowest
    assert top1[("zero", "mean")].better == "mean" and top1[("mean", "peak")].better == "mean"


def test_one_look_reports_a_tie_as_undecided():
    # "b" equals "a" except that each seed's documents trade +-1 nat in pairs: same sums, so a difference of exactly
    # 0 with a nonzero spread. "c" is clearly worse. The tie must be undecided, and the clear differences decided.
    rng = np.random.default_rng(10)
    rows = _methods(rng, {"a": 0.0, "c": 1.0}, {"a": 0.5, "c": 0.5})
    swing = np.where(np.arange(400) % 2 == 0, 1.0, -1.0)
    rows = {"c": rows["c"], "a": rows["a"], "b": [_replace(r, ce_sum=r.ce_sum + swing) for r in rows["a"]]}
    result = _one_look(rows, "ce")
    tie = result[("a", "b")]
    assert tie.estimate == pytest.approx(0, abs=1e-12) and tie.low < 0 < tie.high and not tie.decided
    assert result[("c", "a")].decided and result[("c", "a")].better == "a"
