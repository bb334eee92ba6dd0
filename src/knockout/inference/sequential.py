"""Decisions with as many neuron sets as the question needs: a group-sequential design over neuron sets.

The question at one fraction is, for every pair of constant methods A, B: which hurts the model less? Each pair is a
two-sided test of ``theta = CE(A) - CE(B) = 0`` (or top-1), on the paired statistics of :mod:`.paired` (the same
documents under every set; the interval counts the spread between neuron sets and the document sampling, shared and
per set). Neuron sets (seeds) are added in groups, and after each group the data are looked at; a pair is *decided*
when its test rejects, and sets stop being added when every pair is decided (or the maximum is reached).

Why a design is needed: looking after every new set and stopping as soon as an interval excludes 0 makes a false
decision far more likely than the nominal 5%, because each look is another chance to cross by luck. Here the error
rate is kept by construction:

- **Planned looks, alpha spent over them.** The looks are at fixed numbers of sets ``S_1 < ... < S_K`` (the last is the
  maximum), fixed before any data are seen. Look ``k`` may spend ``alpha_k`` of the total ``alpha`` (0.05), with
  ``sum alpha_k = alpha``; the split follows the Hwang-Shih-DeCani spending function with ``gamma = -2``,
  ``alpha(t) = alpha (1 - e^(-gamma t)) / (1 - e^(-gamma))`` at ``t_k = S_k / S_K``: little early, most at the end
  (between O'Brien-Fleming, which spends almost nothing early, and Pocock's even split), so that a difference as
  clear as zero's against the others is decided at the first looks while the close pairs keep most of the error
  budget for the last one. By the union bound the probability of any false decision over all looks is at most
  ``sum alpha_k = alpha`` whatever the correlation between looks; stopping early (all decided, or nothing left to
  gain) only removes looks.
- **Several pairs: Holm within each look.** At look ``k`` the undecided pairs are tested with Holm's step-down
  procedure at level ``alpha_k``: with ``r`` pairs left, every pair whose interval at confidence ``1 - alpha_k / r``
  excludes 0 is decided, and the step repeats with the pairs still left. Holm controls the family-wise error at
  ``alpha_k`` within the look; a pair decided at an earlier look (correctly, or the error has already happened) leaves
  at least as many true nulls in play, so the union over looks still bounds the family-wise error by ``alpha``.
- **Each metric is its own family.** Cross-entropy decides when to stop; top-1 pairs are tested at the same looks
  with the same ``alpha_k`` and are reported (its error rate is bounded the same way: stopping is a look removed).

The reported interval of a decided pair is the one that decided it (level ``1 - alpha_k / r``); an undecided pair
shows its interval at the last level it was tested at, and the plain 95% interval beside it.

When the maximum is reached, or when no number of sets up to it could decide the pairs left (futility: the interval
the maximum would give, with the variance components measured so far and the observed difference taken as true,
still includes 0), the design stops and says so, with an estimate of the sets (and evaluation documents) the
observed difference would need (:func:`needed`).

Simulation (tests/unit/test_sequential.py): with no true difference among three methods, the rate of any decision
stays below 5%; with known differences it reports the power and the average number of sets used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from knockout.errors import KnockoutError
from knockout.inference.paired import HIGHER_IS_BETTER, DocSums, PairedComponents, _t_quantile, paired_components
from knockout.options import OptionGroup, setting

ALPHA = 0.05
N_BOOT = 2000


GAMMA = -2.0


def spending(t: float, alpha: float = ALPHA, gamma: float = GAMMA) -> float:
    """Hwang-Shih-DeCani spending function: the part of ``alpha`` spent by information time ``t`` in [0, 1]."""
    if t <= 0:
        return 0.0
    if t >= 1:
        return alpha
    return alpha * (1 - math.exp(-gamma * t)) / (1 - math.exp(-gamma))


@dataclass(frozen=True)
class Plan:
    """The planned looks (numbers of neuron sets, increasing; the last is the maximum) and the total error rate."""

    looks: tuple[int, ...]
    alpha: float = ALPHA

    def __post_init__(self):
        looks = tuple(int(s) for s in self.looks)
        if not looks or any(b <= a for a, b in zip(looks, looks[1:])) or looks[0] < 1:
            raise KnockoutError(f"looks must be increasing positive numbers of sets, got {self.looks}")
        if not 0 < self.alpha < 1:
            raise KnockoutError(f"alpha must be between 0 and 1, got {self.alpha}")
        object.__setattr__(self, "looks", looks)

    @property
    def max_sets(self) -> int:
        return self.looks[-1]

    def spent(self) -> tuple[float, ...]:
        """``alpha_k`` for every look: the increments of :func:`spending` at ``S_k / S_max`` (they sum to
        ``alpha``)."""
        cum = [spending(s / self.max_sets, self.alpha) for s in self.looks]
        return tuple(b - a for a, b in zip([0.0, *cum[:-1]], cum))

    def look_at(self, n_sets: int) -> int:
        """The index of the look made with ``n_sets`` sets."""
        if n_sets not in self.looks:
            raise KnockoutError(f"{n_sets} sets is not a planned look ({', '.join(map(str, self.looks))})")
        return self.looks.index(n_sets)


@dataclass(frozen=True)
class DecideOptions(OptionGroup):
    """How a sweep with ``--seeds auto`` adds neuron sets, and the error rate of every run's answer."""

    prefix = "decide"
    title = "decisions (--seeds auto: add neuron sets until every pair of methods is decided)"

    fractions: tuple[float, ...] = setting(
        (0.5, 0.9), "with --seeds auto: the fractions at which sets are added (a subset of --fractions)", "decide",
        kind="floats",
    )  # fmt: skip
    max_sets: int = setting(20, "with --seeds auto: the most neuron sets per decision fraction", "decide", kind="int")
    first: int = setting(
        3, "with --seeds auto: the sets every method and fraction gets (the first look)", "decide", kind="int"
    )
    alpha: float = setting(
        ALPHA, "family-wise error rate of the answer's decisions (all pairs, all looks) per fraction", "decide",
        kind="float",
    )  # fmt: skip

    def __post_init__(self):
        self._int("first", 2)
        self._int("max_sets", 2)
        if self.max_sets < self.first:
            raise KnockoutError(f"decide.max_sets ({self.max_sets}) must be at least decide.first ({self.first})")
        self._positive("alpha")
        if self.alpha >= 0.5:
            raise KnockoutError(f"decide.alpha (--decide-alpha) must be below 0.5, got {self.alpha}")
        try:
            fractions = tuple(sorted({float(f) for f in self.fractions}))
        except (TypeError, ValueError):
            raise KnockoutError(f"decide.fractions must be numbers, got {self.fractions!r}") from None
        if not fractions or not all(0 < f <= 1 for f in fractions):
            raise KnockoutError(f"decide.fractions (--decide-fractions) must be in (0, 1], got {self.fractions!r}")
        object.__setattr__(self, "fractions", fractions)

    def plan(self) -> Plan:
        return plan_for(self.max_sets, self.first, self.alpha)


def plan_for(max_sets: int, first: int = 3, alpha: float = ALPHA) -> Plan:
    """Looks at ``first`` sets, then after every ~50% more, ending exactly at ``max_sets`` (a last step of less than a
    quarter is merged into it): 3, 5, 8, 12 for 12; 3, 5, 8, 12, 20 for 20. Roughly geometric, as the interval
    narrows with the square root of the sets."""
    if max_sets < first:
        raise KnockoutError(f"the maximum number of sets ({max_sets}) is below the first look ({first})")
    looks, s = [first], first
    while (s := max(s + 1, math.ceil(s * 1.5))) < max_sets:
        looks.append(s)
    if len(looks) > 1 and max_sets - looks[-1] < 0.25 * looks[-1]:
        looks.pop()
    looks.append(max_sets) if looks[-1] != max_sets else None
    return Plan(tuple(looks), alpha)


@dataclass(frozen=True)
class PairVerdict:
    """One pair at one look: ``metric(a) - metric(b)`` and whether (and which way) it is decided."""

    a: str
    b: str
    metric: str
    estimate: float
    """Mean over sets of ``metric(a) - metric(b)`` (CE in nats, top-1 as a fraction)."""
    low: float
    high: float
    level: float
    """Confidence of ``low``, ``high``: the level that decided the pair, or the last it was tested at."""
    decided: bool
    n_sets: int
    n_docs: int
    look: int
    """Index of the look that decided it (or of the current look)."""
    low95: float
    high95: float
    """The plain 95% interval (not adjusted for looks and pairs), for reference."""
    components: PairedComponents | None = field(default=None, compare=False, repr=False)
    too_few_docs: bool = False
    """The interval excluded 0 but rests on too few documents to say so of documents in general
    (:meth:`PairedComponents.too_few_docs`): not decided; the answer says "too few documents to decide; needs about
    ``docs_needed``"."""
    docs_needed: int = 0
    """Documents the document part needs (:attr:`PairedComponents.docs_needed`)."""

    @property
    def better(self) -> str | None:
        """The method that hurts less (lower CE, higher top-1) when decided."""
        if not self.decided:
            return None
        a_lower = self.estimate < 0
        return self.a if a_lower != HIGHER_IS_BETTER[self.metric] else self.b

    @property
    def worse(self) -> str | None:
        if not self.decided:
            return None
        return self.b if self.better == self.a else self.a


def _pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]]


class SequentialTest:
    """The decisions of one family (one metric at one fraction) across the looks of ``plan``.

    Call :meth:`look` with the data of ``plan.looks[k]`` sets, in order ``k = 0, 1, ...`` (decided pairs keep their
    verdict; their methods need no data at later looks). Deterministic: the same data give the same decisions, so a
    resumed run replays the looks it made before.
    """

    def __init__(self, plan: Plan, methods: Sequence[str], metric: str = "ce", n_boot: int = N_BOOT, seed: int = 0):
        if len(methods) < 2:
            raise KnockoutError(f"a decision needs at least two methods, got {list(methods)}")
        self.plan, self.methods, self.metric = plan, list(methods), metric
        self.n_boot, self.seed = n_boot, seed
        self.verdicts: dict[tuple[str, str], PairVerdict] = {}
        self.looks_done = 0

    @property
    def finished(self) -> bool:
        """No further look: every pair decided, futile, or every planned look made."""
        return self.done or self.futile() or self.looks_done >= len(self.plan.looks)

    @property
    def next_sets(self) -> int | None:
        """The number of sets the next look needs (``None`` when finished)."""
        return None if self.finished else self.plan.looks[self.looks_done]

    def replay(self, data: Mapping[str, Sequence[DocSums]]) -> None:
        """Make every look that ``data`` (sets in order) allows, until finished: what a run that stopped or was
        interrupted did, made again from its stored sums."""
        while (n_sets := self.next_sets) is not None:
            if any(len(data.get(m, ())) < n_sets for m in self.methods_needed()):
                return
            self.look(data)

    @property
    def undecided(self) -> list[tuple[str, str]]:
        return [p for p in _pairs(self.methods) if not (p in self.verdicts and self.verdicts[p].decided)]

    @property
    def done(self) -> bool:
        return not self.undecided

    def methods_needed(self) -> list[str]:
        """The methods of the pairs not yet decided: the only ones later sets must be evaluated with."""
        return [m for m in self.methods if any(m in p for p in self.undecided)]

    def look(self, data: Mapping[str, Sequence[DocSums]]) -> list[PairVerdict]:
        """Make the next look: ``data[method][s]`` for sets ``s < plan.looks[k]`` (at least the methods of the
        undecided pairs). Returns every pair's verdict after the look."""
        k = self.looks_done
        if k >= len(self.plan.looks):
            raise KnockoutError("every planned look has been made")
        n_sets = self.plan.looks[k]
        alpha_k = self.plan.spent()[k]
        comps: dict[tuple[str, str], PairedComponents] = {}
        for a, b in self.undecided:
            for m in (a, b):
                if len(data.get(m, ())) < n_sets:
                    raise KnockoutError(f"look {k + 1} needs {n_sets} sets of {m!r}, got {len(data.get(m, ()))}")
            comps[(a, b)] = paired_components(
                data[a][:n_sets], data[b][:n_sets], self.metric, n_boot=self.n_boot, seed=self.seed
            )
        left = list(comps)
        while left:  # Holm's step-down at level alpha_k
            level = 1 - alpha_k / len(left)
            passed = []
            for pair in left:
                c = comps[pair]
                half = c.half_width(level)
                self.verdicts[pair] = self._verdict(pair, c, half, level, k)
                if self.verdicts[pair].decided:
                    passed.append(pair)
            if not passed:
                break
            left = [p for p in left if p not in passed]
        self.looks_done += 1
        return [self.verdicts[p] for p in _pairs(self.methods) if p in self.verdicts]

    def _verdict(self, pair, c: PairedComponents, half: float, level: float, k: int) -> PairVerdict:
        est = c.estimate
        half95 = c.half_width(0.95)
        excludes = bool(est - half > 0 or est + half < 0)
        blocked = excludes and c.too_few_docs(level)
        return PairVerdict(
            a=pair[0], b=pair[1], metric=self.metric, estimate=est, low=est - half, high=est + half, level=level,
            decided=excludes and not blocked, n_sets=c.n_seeds, n_docs=c.n_docs, look=k,
            low95=est - half95, high95=est + half95, components=c, too_few_docs=blocked, docs_needed=c.docs_needed,
        )  # fmt: skip

    def futile(self) -> bool:
        """Whether no number of sets up to the maximum could decide the pairs left, at the current number of
        documents, were the observed differences true (see :func:`needed`). False before the second look (the spread
        between few sets is too uncertain to give up on)."""
        if self.done or self.looks_done < 2 or self.looks_done >= len(self.plan.looks):
            return False
        level = self.final_level(len(self.undecided))
        for pair in self.undecided:
            v = self.verdicts[pair]
            if v.components is None or projected_half_width(v.components, self.plan.max_sets, 1.0, level) < abs(
                v.estimate
            ):
                return False
        return True

    def final_level(self, n_pairs: int) -> float:
        """The confidence at which the last look tests ``n_pairs`` pairs (Holm's first step)."""
        return 1 - self.plan.spent()[-1] / max(n_pairs, 1)


def projected_half_width(c: PairedComponents, n_sets: int, docs_factor: float, level: float) -> float:
    """The half-width of the interval at ``level`` with ``n_sets`` sets and ``docs_factor`` times the evaluation
    documents, were the variance components those measured in ``c``: the seed effect ``tau^2 = max(B - (v - c), 0)``
    stays, the document terms shrink with the documents."""
    q = (1 + level) / 2
    w = max(c.v - c.c, 0.0)
    tau2 = max(c.between - w, 0.0)
    n_docs = max(round(c.n_docs * docs_factor), 2)
    ratio = c.docs_df / max(c.n_docs - 1, 1)  # the documents' degrees of freedom per document (lengths' spread)
    t_docs = _t_quantile(q, max((n_docs - 1) * ratio, 1.0))
    t_sets = _t_quantile(q, max(n_sets - 1, 1))
    w_new, c_new = w / docs_factor, max(c.c, 0.0) / docs_factor
    half_sq = max(t_sets**2 * (tau2 + w_new), t_docs**2 * w_new) / n_sets + t_docs**2 * c_new
    return math.sqrt(half_sq)


@dataclass(frozen=True)
class Need:
    """What deciding an observed difference would take (estimates, from the variance components measured so far)."""

    sets: int | None
    """Sets needed at the current number of evaluation documents (None: more sets alone cannot do it)."""
    cheapest_sets: int | None
    cheapest_docs_factor: float | None
    """The cheapest combination (sets x documents) found: ``cheapest_docs_factor`` times the documents."""
    more_sets_help_most: bool
    """Whether, from where the run is, one more set narrows the interval more per second of evaluation than more
    documents for every set do (False when more sets alone cannot decide it)."""


def needed(
    c: PairedComponents, estimate: float, level: float, max_sets: int = 10_000, factors=(1, 2, 4, 8, 16, 32)
) -> Need:
    """Sets (and documents) the observed ``estimate`` would need to be decided at ``level`` (see
    :func:`projected_half_width`); the cost of a combination is sets x documents (evaluation time)."""
    target = abs(estimate)

    def sets_for(factor: float) -> int | None:
        if target == 0 or projected_half_width(c, max_sets, factor, level) >= target:
            return None
        lo, hi = 2, max_sets
        while lo < hi:
            mid = (lo + hi) // 2
            if projected_half_width(c, mid, factor, level) < target:
                hi = mid
            else:
                lo = mid + 1
        return lo

    at_current = sets_for(1.0)
    options = [(s * f, s, f) for f in factors if (s := sets_for(f)) is not None]
    best = min(options) if options else None
    # Per unit of evaluation cost (sets x documents), from the current (S, 1): one more set costs 1/S of the run so
    # far, doubling the documents costs all of it.
    s = max(c.n_seeds, 2)
    now = projected_half_width(c, s, 1.0, level) ** 2
    gain_sets = (now - projected_half_width(c, s + 1, 1.0, level) ** 2) / (1 / s)
    gain_docs = (now - projected_half_width(c, s, 2.0, level) ** 2) / 1.0
    sets_help = at_current is not None and gain_sets >= gain_docs
    return Need(at_current, best[1] if best else None, float(best[2]) if best else None, sets_help)
