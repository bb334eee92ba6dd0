"""The sequential design over neuron sets (knockout.inference.sequential), checked by simulation on synthetic paired
data with known truth: no true difference -> any decision at most 5% of the time; known differences -> decided the
right way, with the power and the sets used reported; and its parts against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from knockout.errors import KnockoutError
from knockout.inference.paired import DocSums, paired_components
from knockout.inference.sequential import Plan, SequentialTest, needed, plan_for, projected_half_width, spending


def simulate(rng, deltas: dict[str, float], n_sets: int, n_docs: int, tau=0.3, shared=0.15, own=0.3, top1=False):
    """Per method, ``n_sets`` rows over the same ``n_docs`` documents. Per-token CE of method m on set s and document d
    is ``base_d + delta_m + a_md + u_ms + b_msd``: a document difficulty common to all methods (it cancels in a paired
    difference), the method's true offset, a document effect of the method shared by all sets (``shared``), a set
    effect (``tau``: which neurons were drawn) and per-set document noise (``own``). ``top1``: correct counts
    instead, with probability ``0.5 + delta_m + effects`` clipped to [0, 1]."""
    n = rng.integers(10, 40, n_docs)
    base = rng.normal(3, 0.5, n_docs)
    out = {}
    for m, delta in deltas.items():
        a, u = rng.normal(0, shared, n_docs), rng.normal(0, tau, n_sets)
        rows = []
        for s in range(n_sets):
            value = delta + a + u[s] + rng.normal(0, own, n_docs)
            if top1:
                correct = rng.binomial(n, np.clip(0.5 + value, 0, 1))
                rows.append(DocSums(n, np.zeros(n_docs), correct))
            else:
                rows.append(DocSums(n, n * (base + value), np.zeros(n_docs, dtype=int)))
        out[m] = rows
    return out


def run(rng, deltas, plan, n_docs=20, metric="ce", n_boot=300, **kw) -> SequentialTest:
    """One sequential experiment, stopping as the runner does: all decided, or futile, or the maximum reached."""
    data = simulate(rng, deltas, plan.max_sets, n_docs, top1=metric == "top1", **kw)
    test = SequentialTest(plan, list(deltas), metric, n_boot=n_boot)
    for _ in plan.looks:
        test.look(data)
        if test.done or test.futile():
            break
    return test


def test_spending_matches_its_closed_form_and_sums_to_alpha():
    for t in (0.1, 0.25, 0.5, 0.9):  # Hwang-Shih-DeCani, gamma = -2
        assert spending(t) == pytest.approx(0.05 * (math.exp(2 * t) - 1) / (math.exp(2) - 1))
    assert spending(0.5) == pytest.approx(0.05 * 0.2689, abs=1e-5)  # (e - 1) / (e^2 - 1) = 1 / (e + 1)
    assert spending(0) == 0 and spending(1) == 0.05
    plan = plan_for(20)
    assert plan.looks == (3, 5, 8, 12, 20) and plan_for(12).looks == (3, 5, 8, 12)
    spent = plan.spent()
    assert sum(spent) == pytest.approx(0.05) and spent[-1] == max(spent)
    assert plan_for(3).looks == (3,) and plan_for(4).looks == (3, 4) and plan_for(6).looks == (3, 6)
    with pytest.raises(KnockoutError, match="increasing"):
        Plan((3, 3))
    with pytest.raises(KnockoutError, match="below the first look"):
        plan_for(2)


@pytest.mark.parametrize("metric", ["ce", "top1"])
def test_no_true_difference_gives_a_decision_at_most_5_percent_of_the_time(metric):
    """Three methods with identical distributions (3 pairs), looks at 3, 5, 8, 12 sets: the rate of any decision
    stays at most the nominal 5% (Monte-Carlo error: sd 0.0069 with 1,000 experiments)."""
    rng = np.random.default_rng(11)
    plan, reps = plan_for(12), 1000
    scale = 1.0 if metric == "ce" else 0.1  # top-1 effects in probability units
    decided = sum(
        any(v.decided for v in run(rng, dict.fromkeys(("zero", "mean", "peak"), 0.0), plan, metric=metric,
                                   tau=0.3 * scale, shared=0.15 * scale, own=0.3 * scale).verdicts.values())
        for _ in range(reps)
    )  # fmt: skip
    rate = decided / reps
    print(f"\n{metric}: rate of any decision with no true difference: {rate:.3f} ({reps} experiments)")
    assert rate <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / reps)


def test_looking_after_every_set_without_the_design_would_inflate_errors():
    """The reason for the design: stopping as soon as a plain 95% interval excludes 0, looking after every set
    from 3 to 12, decides a null pair far more often than 5% (here checked to exceed 10%)."""
    rng = np.random.default_rng(5)
    reps, wrong = 400, 0
    for _ in range(reps):
        data = simulate(rng, {"a": 0.0, "b": 0.0}, 12, 20)
        for s in range(3, 13):
            d = paired_components(data["a"][:s], data["b"][:s], "ce", n_boot=200).difference(0.95)
            if d.significant:
                wrong += 1
                break
    assert wrong / reps > 0.10


def test_known_differences_are_decided_the_right_way_and_power_is_reported():
    """zero far worse, peak 0.3 nats worse than mean (set spread 0.3): zero's pairs are decided by the third look;
    mean-peak is decided the right way when decided. Power and average sets are printed for the docs."""
    rng = np.random.default_rng(7)
    plan, reps = plan_for(20), 300
    powers, sets, wrong, zero_first = [], [], 0, 0
    for _ in range(reps):
        test = run(rng, {"zero": 2.0, "mean": 0.0, "peak": 0.3}, plan)
        v = test.verdicts[("mean", "peak")]
        powers.append(v.decided)
        wrong += v.decided and v.better != "mean"
        zero_first += all(
            test.verdicts[p].decided and test.verdicts[p].look <= 2 for p in [("zero", "mean"), ("zero", "peak")]
        )
        sets.append(plan.looks[test.looks_done - 1])
    power = float(np.mean(powers))
    print(f"\nmean vs peak 0.3 nats apart (set sd 0.3), max 20 sets: power {power:.2f}, sets {np.mean(sets):.1f}")
    assert wrong == 0
    assert zero_first / reps > 0.95
    assert 0.3 < power < 1.0  # neither trivial nor impossible at this size: the number reported means something
    big = [run(rng, {"mean": 0.0, "peak": 1.0}, plan) for _ in range(50)]
    assert all(t.done and t.verdicts[("mean", "peak")].better == "mean" for t in big)
    assert np.mean([plan.looks[t.looks_done - 1] for t in big]) < 8  # a clear difference stops early


def test_top1_decides_the_higher_accuracy_as_better():
    rng = np.random.default_rng(3)
    data = simulate(rng, {"mean": 0.2, "peak": 0.0}, 8, 30, tau=0.02, shared=0.02, own=0.05, top1=True)
    test = SequentialTest(Plan((4, 8)), ["mean", "peak"], "top1", n_boot=300)
    test.look(data)
    test.look(data)
    v = test.verdicts[("mean", "peak")]
    assert v.decided and v.better == "mean" and v.worse == "peak" and v.estimate > 0


def test_holm_within_a_look_and_decided_pairs_keep_their_verdict():
    rng = np.random.default_rng(2)
    data = simulate(rng, {"zero": 3.0, "mean": 0.0, "peak": 0.0}, 12, 20)
    test = SequentialTest(plan_for(12), ["zero", "mean", "peak"], "ce", n_boot=300)
    test.look(data)
    test.look(data)
    first = dict(test.verdicts)
    assert first[("zero", "mean")].decided and first[("zero", "peak")].decided
    assert not first[("mean", "peak")].decided
    # Holm: once both zero pairs are decided at a look, the one left is tested at alpha_k / 1
    v = first[("mean", "peak")]
    if v.look == 1:
        assert v.level == pytest.approx(1 - test.plan.spent()[1] / 1)
    assert test.methods_needed() == ["mean", "peak"]
    # the decided pairs need no more data: a later look with only mean and peak works
    test.look({m: data[m] for m in ("mean", "peak")})
    assert test.verdicts[("zero", "mean")] == first[("zero", "mean")]
    with pytest.raises(KnockoutError, match="needs 12 sets of 'mean'"):
        test.look({m: data[m][:5] for m in ("mean", "peak")})


def test_the_same_data_give_the_same_decisions():
    data = simulate(np.random.default_rng(4), {"zero": 1.0, "mean": 0.0, "peak": 0.2}, 12, 20)
    results = []
    for _ in range(2):
        test = SequentialTest(plan_for(12), ["zero", "mean", "peak"], "ce", n_boot=300)
        for _ in test.plan.looks:
            test.look(data)
        results.append([(v.a, v.b, v.decided, v.low, v.high) for v in test.verdicts.values()])
    assert results[0] == results[1]


def test_projection_and_needs_agree_with_the_interval():
    rng = np.random.default_rng(8)
    data = simulate(rng, {"mean": 0.0, "peak": 0.25}, 5, 20, tau=0.3, shared=0.05, own=0.2)
    c = paired_components(data["mean"], data["peak"], "ce", n_boot=500)
    if c.between >= c.v - c.c:  # then the projection at the observed size is the interval itself
        assert projected_half_width(c, c.n_seeds, 1.0, 0.95) == pytest.approx(c.half_width(0.95))
    need = needed(c, 0.25, 0.99)
    assert need.sets is not None and need.sets > 5
    assert projected_half_width(c, need.sets, 1.0, 0.99) < 0.25 <= projected_half_width(c, need.sets - 1, 1.0, 0.99)
    assert need.cheapest_sets * need.cheapest_docs_factor <= need.sets  # no costlier than sets alone
    # a difference smaller than what the shared document noise allows needs more documents, not only sets
    docs_bound = needed(c, 1e-3 + 0.0 * c.c, 0.99)
    assert docs_bound.sets is None or docs_bound.sets > 1000


def test_design_record_is_plain_json_and_changes_are_named():
    import json

    from knockout.inference.sequential import DecideOptions, design_changes, doc_steps, plan_for

    assert doc_steps(12, 60) == (12, 24, 48, 60) and doc_steps(12, 0) == (12,) and doc_steps(12, 24) == (12, 24)
    with_docs = plan_for(20, docs=doc_steps(12, 48))
    assert with_docs.to_dict()["docs"] == [12, 24, 48] and Plan.from_dict(with_docs.to_dict()) == with_docs
    options = DecideOptions()
    record = options.design_record(n_families=4)
    assert json.loads(json.dumps(record)) == record  # plain JSON, stored as written
    assert record["looks"] == [3, 5, 8, 12, 20] and record["docs"] == [] and record["max_sets"] == 20
    assert sum(record["alpha_per_look"]) == pytest.approx(0.05) and record["families"] == 4
    assert Plan.from_dict(record) == options.plan()
    assert design_changes(record, options.design_record(4)) == []
    changed = DecideOptions(max_sets=30).design_record(4)
    lines = design_changes(record, changed)
    assert any(line.startswith("max_sets: 20 -> 30") for line in lines) and any("looks" in line for line in lines)
    assert design_changes(record, DecideOptions(alpha=0.1).design_record(4))
    assert DecideOptions().plan().docs == ()
    with pytest.raises(KnockoutError, match="version"):
        Plan.from_dict({**record, "version": 0})


def test_families_are_stated_and_joint_control_splits_alpha():
    from knockout.inference.sequential import DecideOptions, families, family_statement

    assert families((0.5, 0.9)) == 4 and families((0.5,), ("ce",)) == 1
    text = family_statement((0.5, 0.9))
    assert "per fraction and metric" in text and "4 families" in text and "20%" in text
    assert "at most 5%" in family_statement((0.5, 0.9), joint=True)
    assert DecideOptions(joint=True).family_alpha(4) == pytest.approx(0.0125)
    assert DecideOptions().family_alpha(4) == 0.05
    assert DecideOptions(joint=True).plan(n_families=4).alpha == pytest.approx(0.0125)


def _skewed_pair(rng, n_docs, n_sets, doc_sd=0.3, set_sd=0.1):
    """Two methods, the documents' part dominant and strongly right-skewed (one document far off)."""
    n = np.full(n_docs, 50)
    effect = rng.normal(0, 0.05, n_docs)
    effect[0] += doc_sd * 10
    effect -= effect.mean()
    a, b = [], []
    for _ in range(n_sets):
        u = rng.normal(0, set_sd)
        a.append(DocSums(n, n * (3 + effect + u), np.zeros(n_docs, dtype=int)))
        b.append(DocSums(n, n * 3.0 + rng.normal(0, 0.01, n_docs), np.zeros(n_docs, dtype=int)))
    return a, b


def test_too_few_documents_blocks_a_decision_and_says_how_many():
    """One document carries the difference: the documents' skewness is near its maximum for 12 documents, so
    Cochran's rule asks for far more than 12; an interval that excludes 0 there is not a decision."""
    rng = np.random.default_rng(0)
    a, b = _skewed_pair(rng, 12, 8)
    c = paired_components(a, b, "ce")
    assert c.skewness > 2.5 and c.docs_needed > 150 and c.doc_share(0.95) > 0.5 and c.too_few_docs(0.95)
    d = c.difference(0.95)
    assert d.too_few_docs and d.docs_needed == c.docs_needed and not d.significant
    # shift both rows so that the interval excludes 0: still not decided, the verdict says why
    a = [DocSums(r.n, r.ce_sum + 2.0 * r.n, r.correct) for r in a]
    test = SequentialTest(Plan((8,)), ["a", "b"], "ce")
    test.look({"a": a, "b": b})
    v = test.verdicts[("a", "b")]
    assert (v.low > 0 or v.high < 0) and not v.decided and v.too_few_docs and v.docs_needed > 150
    # symmetric, well-spread documents: no flag
    ok = simulate(rng, {"a": 0.5, "b": 0.0}, 8, 40, tau=0.05, shared=0.2, own=0.05)
    c = paired_components(ok["a"], ok["b"], "ce")
    if abs(c.skewness) < 1:
        assert not c.too_few_docs(0.95) and c.difference(0.95).significant


def test_documents_on_demand_follow_the_plan_and_replay():
    """The document part dominates: after the first look the design asks for a planned count of documents, the next
    look uses exactly that many (the first ones of each row), and a replay takes the same path."""
    from knockout.inference.sequential import doc_steps, docs_demand

    rng = np.random.default_rng(1)
    data = simulate(rng, {"a": 0.0, "b": 0.0}, 12, 48, tau=0.01, shared=0.4, own=0.02)
    plan = plan_for(12, docs=doc_steps(12, 48))
    test = SequentialTest(plan, ["a", "b"], "ce")
    assert test.next_docs == 12
    test.look(data)
    assert test.docs_used == [12]
    c = test.verdicts[("a", "b")].components
    demand = docs_demand(c, plan, 1)
    assert demand.limited and demand.share > 0.5 and demand.docs in (24, 48) and demand.factor > 1
    assert test.next_docs == demand.docs
    # a run that has evaluated only the first 12 documents cannot make the next look: replay stops there
    short = {m: [DocSums(r.n[:12], r.ce_sum[:12], r.correct[:12]) for r in rows] for m, rows in data.items()}
    again = SequentialTest(plan, ["a", "b"], "ce")
    again.replay(short)
    assert again.looks_done == 1 and again.next_docs == test.next_docs
    test.look(data)
    assert test.docs_used[1] == test.next_docs or test.docs_used[1] == demand.docs
    full = SequentialTest(plan, ["a", "b"], "ce")
    full.replay(data)
    assert full.docs_used[: len(test.docs_used)] == test.docs_used
    # with the seed part dominant, documents do not limit the interval
    seeds = simulate(rng, {"a": 0.0, "b": 0.0}, 12, 12, tau=0.5, shared=0.01, own=0.01)
    c = paired_components(seeds["a"][:3], seeds["b"][:3], "ce")
    assert not docs_demand(c, plan, 1).limited and docs_demand(c, plan, 1).docs is None
