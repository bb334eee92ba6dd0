"""Calibration of the decisions (knockout.inference) in the regime the tool is used in: few evaluation documents whose
shared part dominates the interval, skewed per-document effects, unequal document lengths, the 20-set plan.

Every replication draws a new population-level null: each document's effect of method ``a`` against ``b`` is drawn
from a distribution with mean 0 (normal, or a centred lognormal), so a decision either way is false. The simulation
calls :class:`SequentialTest` and :func:`paired_components` as the runner does and stops as it does (decided, futile
or the maximum). The figures are in docs/decisions.md."""

from __future__ import annotations

import math

import numpy as np
import pytest

from knockout.inference.paired import DocSums, paired_components
from knockout.inference.sequential import SequentialTest, doc_steps, plan_for

SET_SD, NOISE_SD, DOC_SD = 0.1, 0.05, 0.3
ROWS = {  # name: (lognormal sigma of the per-document effects (0: normal), unequal lengths, documents)
    "normal": (0.0, False, 12),
    "moderately skewed": (0.5, True, 12),
    "strongly skewed": (1.0, True, 12),
    "strongly skewed, 60 documents": (1.0, True, 60),
}


def doc_effects(rng: np.random.Generator, sigma: float, n_docs: int) -> np.ndarray:
    """``[n_docs]`` per-document effects with mean 0 and sd :data:`DOC_SD`: normal (``sigma`` 0) or a centred,
    scaled lognormal with log-sd ``sigma`` (skewness 1.75 for 0.5, 6.2 for 1)."""
    if sigma == 0:
        return rng.normal(0, DOC_SD, n_docs)
    z = np.exp(sigma * rng.normal(size=n_docs))
    mean, sd = math.exp(sigma**2 / 2), math.sqrt((math.exp(sigma**2) - 1) * math.exp(sigma**2))
    return DOC_SD * (z - mean) / sd


def null_data(rng: np.random.Generator, sigma: float, unequal: bool, n_docs: int, n_sets: int) -> dict:
    """Two methods ``a`` and ``b`` with no difference in the population of documents. Per-token CE of ``a`` on set
    ``s`` and document ``d`` is ``base_d + effect_d + u_s + e_sd`` (``u``: the set, sd :data:`SET_SD`; ``e``: per-set
    document noise, sd :data:`NOISE_SD`), of ``b`` ``base_d + u'_s + e'_sd``. Lengths: 100 tokens, or lognormal
    (median 100, log-sd 0.8) when ``unequal``."""
    n = (np.round(np.exp(rng.normal(math.log(100), 0.8, n_docs))) + 5 if unequal else np.full(n_docs, 100)).astype(int)
    base = rng.normal(3, 0.5, n_docs)
    effect = doc_effects(rng, sigma, n_docs)
    zeros = np.zeros(n_docs, dtype=int)
    out = {}
    for m, eff in (("a", effect), ("b", 0.0)):
        u = rng.normal(0, SET_SD, n_sets)
        e = rng.normal(0, NOISE_SD, (n_sets, n_docs))
        out[m] = [DocSums(n, n * (base + eff + u[s] + e[s]), zeros) for s in range(n_sets)]
    return out


def run_design(data: dict, plan) -> SequentialTest:
    """The runner's loop: a look at each planned number of sets until decided, futile, or the maximum."""
    test = SequentialTest(plan, ["a", "b"], "ce")
    for _ in plan.looks:
        test.look(data)
        if test.done or test.futile():
            break
    return test


def simulate_row(name: str, reps: int, seed: int = 0, max_docs: int = 0) -> dict:
    """False-decision rates of one row of the table: the 20-set design, and one look at 20 sets at 5% (as a run with
    fixed seeds makes it); the coverage of the 95% interval at 20 sets; the rate of "too few documents" verdicts.
    ``max_docs``: the design may add documents up to this many (documents on demand); the one-look figures use the
    row's documents."""
    sigma, unequal, n_docs = ROWS[name]
    rng = np.random.default_rng(seed)
    plan = plan_for(20, docs=doc_steps(n_docs, max_docs) if max_docs > n_docs else ())
    seq = one = covered = blocked = flagged = covered_claims = added = 0
    for _ in range(reps):
        pool = null_data(rng, sigma, unequal, max(n_docs, max_docs), 20)
        test = run_design(pool, plan)
        seq += test.verdicts[("a", "b")].decided
        blocked += test.verdicts[("a", "b")].too_few_docs
        added += test.docs_used[-1] > n_docs
        data = {m: [DocSums(r.n[:n_docs], r.ce_sum[:n_docs], r.correct[:n_docs]) for r in rows]
                for m, rows in pool.items()}  # fmt: skip
        c = paired_components(data["a"], data["b"], "ce")
        d = c.difference(0.95)
        one += d.significant
        covered += d.low <= 0 <= d.high
        claim = not c.too_few_docs(0.95)
        flagged += not claim
        covered_claims += claim and d.low <= 0 <= d.high
    return {
        "design": seq / reps, "one look": one / reps, "covers": covered / reps, "too few docs": blocked / reps,
        "flagged": flagged / reps, "covers unflagged": covered_claims / max(reps - flagged, 1),
        "docs added": added / reps,
    }  # fmt: skip


def se(reps: int, p: float = 0.05) -> float:
    """Monte-Carlo standard error of a rate ``p`` estimated from ``reps`` replications."""
    return math.sqrt(p * (1 - p) / reps)


def per_look_rates(name: str, reps: int, seed: int = 0) -> list[float]:
    """For every look of the 20-set plan, how often one pair with no true difference is decided at that look's own
    level (``alpha_k``, one pair), every look made on the same data (no stopping)."""
    sigma, unequal, n_docs = ROWS[name]
    rng = np.random.default_rng(seed)
    plan = plan_for(20)
    levels = [1 - a for a in plan.spent()]
    hits = np.zeros(len(plan.looks))
    for _ in range(reps):
        data = null_data(rng, sigma, unequal, n_docs, 20)
        for k, n_sets in enumerate(plan.looks):
            c = paired_components(data["a"][:n_sets], data["b"][:n_sets], "ce")
            hits[k] += c.difference(levels[k]).significant
    return list(hits / reps)


REPS = 2000


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ROWS))
def test_false_decisions_are_at_most_5_percent_in_every_row(name):
    """The table of docs/decisions.md: the 20-set design and one look at 20 sets (a run with fixed seeds) both decide
    a pair with no true difference at most 5% of the time (+ 2 Monte-Carlo se), normal to strongly skewed
    per-document effects, 12 or 60 documents."""
    r = simulate_row(name, REPS)
    print(f"\n{name}: {r}")
    assert r["design"] <= 0.05 + 2 * se(REPS)
    assert r["one look"] <= 0.05 + 2 * se(REPS)


@pytest.mark.slow
def test_documents_on_demand_keep_the_error_rate():
    """Strongly skewed, 12 documents, the design allowed to grow to 48 (12, 24, 48 at planned looks): documents are
    added in most replications and false decisions stay at most 5% (+ 2 se)."""
    r = simulate_row("strongly skewed", REPS, max_docs=48)
    print(f"\ndocuments on demand: {r}")
    assert r["docs added"] > 0.5
    assert r["design"] <= 0.05 + 2 * se(REPS)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["normal", "strongly skewed"])
def test_each_look_holds_the_level_it_uses(name):
    """Per-look calibration: at look k the pair is tested at ``alpha_k`` (0.27% at 3 sets ... 3.2% at 20); the rate
    of decisions at that level, with no true difference, is at most ``alpha_k`` + 2 se (so the union bound's terms
    are what they claim)."""
    rates = per_look_rates(name, REPS)
    alphas = plan_for(20).spent()
    print(f"\n{name}: per look {[f'{r:.4f}' for r in rates]} at {[f'{a:.4f}' for a in alphas]}")
    for rate, alpha in zip(rates, alphas):
        assert rate <= alpha + 2 * se(REPS, alpha)


@pytest.mark.slow
def test_95_percent_interval_covers_at_12_documents_and_20_sets():
    """12 documents (normal effects, equal lengths) x 20 sets, the document part dominant: the 95% interval covers
    the true difference within the replications' own noise (two-sided, 2 se)."""
    r = simulate_row("normal", REPS)
    print(f"\ncoverage: {r['covers']:.4f}")
    assert abs(r["covers"] - 0.95) <= 2 * se(REPS)


def test_strongly_skewed_documents_quick():
    """The hardest row in the default suite (400 replications): 12 strongly skewed documents of unequal lengths."""
    reps = 400
    r = simulate_row("strongly skewed", reps, seed=3)
    assert r["design"] <= 0.05 + 2 * se(reps)
    assert r["one look"] <= 0.05 + 2 * se(reps)


if __name__ == "__main__":  # the figures of docs/decisions.md
    import sys

    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    max_docs = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    for name in ROWS:
        r = simulate_row(name, reps, seed, max_docs)
        print(name, {k: f"{v:.4f}" for k, v in r.items()}, f"se {se(reps, max(r['design'], 0.05)):.4f}", flush=True)
