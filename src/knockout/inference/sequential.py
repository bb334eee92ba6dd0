"""Decisions with as many neuron sets as the question needs: a group-sequential design over neuron sets.

The question at one fraction is, for every pair of constant methods A, B: which hurts the model less? Each pair is a
two-sided test of ``theta = CE(A) - CE(B) = 0`` (or top-1), on the paired statistics of :mod:`.paired` (the same
documents under every set; the interval counts the spread between neuron sets and the document sampling, shared and
per set). Neuron sets (seeds) are added in groups, and after each group the data are looked at; a pair is *decided*
when its test rejects, and sets stop being added when every pair is decided (or the maximum is reached).

Why a design is needed: looking after every new set and stopping as soon as an interval excludes 0 makes a false
decision far more likely than the nominal 5%, because each look is another chance to cross by luck. Here the error
rate is kept by construction:

- **Planned looks, alpha split over them.** The looks are at fixed numbers of sets ``S_1 < ... < S_K`` (the last is
  the maximum), fixed before any data are seen. Look ``k`` tests at ``alpha_k``, with ``sum alpha_k = alpha``; the
  split is shaped like the Hwang-Shih-DeCani spending function with ``gamma = -2``,
  ``alpha(t) = alpha (1 - e^(-gamma t)) / (1 - e^(-gamma))`` at ``t_k = S_k / S_K``: little early, most at the end,
  so that a difference as clear as zero's against the others is decided at the first looks while the close pairs keep
  most of the error budget for the last one. This is **not** a group-sequential boundary: those use the correlation
  between looks (each look's statistic contains the previous one's data) to spend exactly ``alpha``; here each look is
  an independent-looking test at ``alpha_k`` and the **union bound** gives P(any false decision) ``<= sum alpha_k =
  alpha`` whatever the correlation. The price is conservatism (with normal data about half of ``alpha`` is used, see
  the simulations); the gain is that the bound needs no model of how the looks' statistics are correlated, which a
  design with added documents and a skew rule would not have. Stopping early (all decided, or nothing left to gain)
  only removes looks.
- **Several pairs: Holm within each look.** At look ``k`` the undecided pairs are tested with Holm's step-down
  procedure at level ``alpha_k``: with ``r`` pairs left, every pair whose interval at confidence ``1 - alpha_k / r``
  excludes 0 is decided, and the step repeats with the pairs still left. Holm controls the family-wise error at
  ``alpha_k`` within the look; a pair decided at an earlier look (correctly, or the error has already happened) leaves
  at least as many true nulls in play, so the union over looks still bounds the family-wise error by ``alpha``.
- **Families.** One family is one metric at one fraction: the error rate ``alpha`` holds for each. Cross-entropy
  decides when to stop; top-1 pairs are tested at the same looks with the same ``alpha_k`` and reported (stopping is
  a look removed). An answer over 2 fractions x (CE, top-1) holds 4 families, so a false decision *somewhere* in it
  is bounded by 4 alpha, not alpha; :func:`family_statement` says so in one sentence, and ``--decide-joint``
  (:attr:`DecideOptions.joint`) tests each family at ``alpha / n_families`` (Bonferroni) so that ``alpha`` holds for
  the whole answer.
- **Too few documents.** A pair whose interval excludes 0 but rests on fewer documents than their skewness needs
  (:meth:`PairedComponents.too_few_docs`, see :mod:`.paired`) is not decided: its verdict has ``too_few_docs`` and
  ``docs_needed``.
- **Documents on demand.** A plan may list document counts (``Plan.docs``: the first look's documents, doubling up to
  ``--decide-max-docs``). After a look, :func:`docs_demand` asks, for each pair left, whether the documents limit its
  interval (their share of it at the next look at least :data:`DOCS_LIMIT`, or fewer documents than Cochran's rule
  asks) and goes to the smallest planned count that would make the document part no wider than the seed part at the
  maximum sets. The next look uses that many documents (the same documents for every set: the sets used so far are
  evaluated on the added ones). The rule is fixed before the first look, reads variance components only (never the
  estimate), and moves only to planned counts, so each look remains one test at its ``alpha_k`` and the union bound
  holds with one error budget; replaying the looks on the stored sums takes the same path.

The reported interval of a decided pair is the one that decided it (level ``1 - alpha_k / r``); an undecided pair
shows its interval at the last level it was tested at, and the plain 95% interval beside it.

When the maximum is reached, or when no number of sets up to it (with the most documents the plan allows) could decide
the pairs left (futility: the interval the maximum would give, with the variance components measured so far and the
observed difference taken as true, still includes 0), the design stops and says so, with an estimate of the sets
(and evaluation documents) the observed difference would need (:func:`needed`).

The design is stored with the run (:meth:`Plan.to_dict`, :meth:`DecideOptions.design_record`) at its first look; a
resume whose design differs (:func:`design_changes`) must be refused, since the error rate is that of the design fixed
before any data were seen.

Simulations: tests/unit/test_sequential.py (three methods, set spread dominant) and tests/unit/test_calibration.py
(12 documents, document part dominant, skewed documents, unequal lengths, 20 sets); figures in docs/decisions.md.
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


DESIGN_VERSION = 1  # bump when the meaning of a stored design record changes


def doc_steps(first: int, max_docs: int) -> tuple[int, ...]:
    """The planned document counts: ``first``, then doubling, ending exactly at ``max_docs`` (``(first,)`` when
    ``max_docs <= first``): 12, 24, 48, 60 for 12 up to 60."""
    if first < 1:
        raise KnockoutError(f"the first document count must be positive, got {first}")
    steps, n = [first], first
    while max_docs > n:
        n = min(2 * n, max_docs)
        steps.append(n)
    return tuple(steps)


@dataclass(frozen=True)
class Plan:
    """The planned looks (numbers of neuron sets, increasing; the last is the maximum), the error rate of each family,
    and the document counts the design may grow to (:func:`doc_steps`; empty: the documents are fixed, every look
    uses all it is given)."""

    looks: tuple[int, ...]
    alpha: float = ALPHA
    docs: tuple[int, ...] = ()
    """Planned document counts, increasing; the first is the documents of the first look. Documents are added only at
    a planned look and only to one of these counts, by the rule of :func:`docs_demand` (fixed before any data)."""

    def __post_init__(self):
        looks = tuple(int(s) for s in self.looks)
        if not looks or any(b <= a for a, b in zip(looks, looks[1:])) or looks[0] < 1:
            raise KnockoutError(f"looks must be increasing positive numbers of sets, got {self.looks}")
        if not 0 < self.alpha < 1:
            raise KnockoutError(f"alpha must be between 0 and 1, got {self.alpha}")
        docs = tuple(int(d) for d in self.docs)
        if any(b <= a for a, b in zip(docs, docs[1:])) or (docs and docs[0] < 2):
            raise KnockoutError(f"planned document counts must be increasing, at least 2, got {self.docs}")
        object.__setattr__(self, "looks", looks)
        object.__setattr__(self, "docs", docs)

    @property
    def max_sets(self) -> int:
        return self.looks[-1]

    @property
    def max_docs(self) -> int | None:
        """The most documents the design may use (None: the documents are fixed)."""
        return self.docs[-1] if self.docs else None

    def spent(self) -> tuple[float, ...]:
        """``alpha_k`` for every look: the increments of :func:`spending` at ``S_k / S_max`` (they sum to
        ``alpha``). A split of ``alpha`` for the union bound, not a group-sequential boundary: it ignores the
        correlation between looks, which makes it conservative."""
        cum = [spending(s / self.max_sets, self.alpha) for s in self.looks]
        return tuple(b - a for a, b in zip([0.0, *cum[:-1]], cum))

    def look_at(self, n_sets: int) -> int:
        """The index of the look made with ``n_sets`` sets."""
        if n_sets not in self.looks:
            raise KnockoutError(f"{n_sets} sets is not a planned look ({', '.join(map(str, self.looks))})")
        return self.looks.index(n_sets)

    def to_dict(self) -> dict:
        """The design as plain JSON: what a run folder stores at its first look and compares on resume
        (:func:`design_changes`)."""
        return {
            "version": DESIGN_VERSION,
            "looks": list(self.looks),
            "alpha": self.alpha,
            "spending": f"Hwang-Shih-DeCani shape, gamma {GAMMA:g}, split over the looks by the union bound",
            "alpha_per_look": list(self.spent()),
            "pairs": "Holm within each look",
            "docs": list(self.docs),
            "docs_rule": "added only at a planned look, to a planned count, when the documents limit the interval "
            f"(share >= {DOCS_LIMIT:g} at the next look, or fewer than Cochran's 25 G1^2); never from the estimate",
        }

    @classmethod
    def from_dict(cls, record: dict) -> Plan:
        if record.get("version") != DESIGN_VERSION:
            raise KnockoutError(f"design record version {record.get('version')!r}, expected {DESIGN_VERSION}")
        return cls(tuple(record["looks"]), float(record["alpha"]), tuple(record.get("docs", ())))


def design_changes(stored: dict, current: dict) -> list[str]:
    """What differs between two design records (``Plan.to_dict`` / ``DecideOptions.design_record``), as
    ``"key: stored -> current"`` lines; empty when they are the same design. A resume must refuse any difference:
    the error rate holds for the design fixed before the first look, not for one changed after seeing data."""
    keys = sorted(set(stored) | set(current))
    return [f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in keys if stored.get(k) != current.get(k)]


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
        ALPHA, "family-wise error rate of the answer's decisions (all pairs, all looks) per fraction and metric, or "
        "over all of them with --decide-joint", "decide", kind="float",
    )  # fmt: skip
    joint: bool = setting(
        False, "hold --decide-alpha over all decision families together (every fraction, CE and top-1: Bonferroni) "
        "instead of per fraction and metric", "decide", kind="bool",
    )  # fmt: skip
    max_docs: int | None = setting(
        None, "with --seeds auto and --eval-docs N: add evaluation documents (N, 2N, ... up to this many) when they, "
        "not the sets, limit the interval: the same run evaluates its sets on the added documents, within one design "
        "(docs/decisions.md); default: the documents are fixed", "decide", kind="int",
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
        self._bool("joint")
        self._int("max_docs", 2, optional=True)

    def check_docs(self, sequential: bool, eval_docs: int | None) -> None:
        """Refuse :attr:`max_docs` where documents cannot be added: without ``--seeds auto``, without
        ``--eval-docs`` (documents are added whole, the first ``eval_docs`` first), or not above ``eval_docs``."""
        if self.max_docs is None:
            return
        flag = f"--decide-max-docs {self.max_docs}"
        if not sequential:
            raise KnockoutError(f"{flag} adds documents to the sets of --seeds auto; give --seeds auto or drop it")
        if eval_docs is None:
            raise KnockoutError(f"{flag} adds whole documents: give the first look's with --eval-docs N (causal text)")
        if self.max_docs <= eval_docs:
            raise KnockoutError(f"{flag} must be above --eval-docs ({eval_docs}), the documents of the first look")

    def family_alpha(self, n_families: int) -> float:
        """The error rate each family is tested at: ``alpha``, or ``alpha / n_families`` with :attr:`joint`."""
        return self.alpha / max(n_families, 1) if self.joint else self.alpha

    def plan(self, n_families: int = 1, eval_docs: int | None = None) -> Plan:
        """The design of one family; ``n_families``: the families the answer holds (:func:`families`), which share
        ``alpha`` when :attr:`joint`. With :attr:`max_docs` and the first look's documents ``eval_docs``, the plan's
        document counts are :func:`doc_steps` from one to the other; else the documents are fixed."""
        docs = doc_steps(eval_docs, self.max_docs) if self.max_docs is not None and eval_docs is not None else ()
        return plan_for(self.max_sets, self.first, self.family_alpha(n_families), docs)

    def design_record(self, n_families: int = 1, eval_docs: int | None = None) -> dict:
        """Everything the error rate depends on, as plain JSON, to store in the run folder at the first look and
        compare on resume (:func:`design_changes`): the plan's looks, alpha per family and per look, its document
        counts, the fractions decided, first and maximum sets, and how the families are counted."""
        record = self.plan(n_families, eval_docs).to_dict()
        record.update(
            fractions=list(self.fractions), first=self.first, max_sets=self.max_sets, alpha_total=self.alpha,
            joint=self.joint, families=n_families,
        )  # fmt: skip
        return record


def plan_for(max_sets: int, first: int = 3, alpha: float = ALPHA, docs: tuple[int, ...] = ()) -> Plan:
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
    return Plan(tuple(looks), alpha, docs)


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
        self.docs_used: list[int] = []
        """The documents each look made used (all it was given when the plan's documents are fixed)."""
        self.next_docs: int | None = plan.docs[0] if plan.docs else None
        """The documents the next look uses: the first planned count, then what :func:`docs_demand` asked for
        (None: the plan's documents are fixed, every look uses all it is given)."""

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
            rows = [data.get(m, ()) for m in self.methods_needed()]
            if any(len(r) < n_sets for r in rows):
                return
            if self.next_docs is not None and any(r[s].n_docs < self.next_docs for r in rows for s in range(n_sets)):
                return  # the documents this look needs are not all evaluated yet
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
        n_docs = self.next_docs
        for a, b in self.undecided:
            for m in (a, b):
                if len(data.get(m, ())) < n_sets:
                    raise KnockoutError(f"look {k + 1} needs {n_sets} sets of {m!r}, got {len(data.get(m, ()))}")
            comps[(a, b)] = paired_components(
                first_docs(data[a][:n_sets], n_docs), first_docs(data[b][:n_sets], n_docs), self.metric,
                n_boot=self.n_boot, seed=self.seed,
            )  # fmt: skip
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
        self.docs_used.append(next(iter(comps.values())).n_docs if comps else (n_docs or 0))
        if self.plan.docs and not self.finished:
            wanted = [docs_demand(self.verdicts[p].components, self.plan, k + 1) for p in self.undecided]
            more = [d.docs for d in wanted if d.docs is not None]
            if more:
                self.next_docs = max(self.next_docs or 0, *more)
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
            c = v.components
            factor = self.plan.max_docs / c.n_docs if c is not None and self.plan.max_docs else 1.0
            if c is None or projected_half_width(c, self.plan.max_sets, max(factor, 1.0), level) < abs(v.estimate):
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


def first_docs(rows: Sequence[DocSums], n_docs: int | None) -> list[DocSums]:
    """The rows restricted to their first ``n_docs`` documents (all of them when ``None``): a look uses the documents
    its plan had at that look, even when later sets were evaluated on more."""
    if n_docs is None:
        return list(rows)
    out = []
    for r in rows:
        if r.n_docs < n_docs:
            raise KnockoutError(f"this look needs {n_docs} documents, a row has {r.n_docs}")
        out.append(r if r.n_docs == n_docs else DocSums(r.n[:n_docs], r.ce_sum[:n_docs], r.correct[:n_docs]))
    return out


def common_docs(a: Sequence[DocSums], b: Sequence[DocSums]) -> tuple[list[DocSums], list[DocSums]]:
    """Two methods' rows cut to the documents every one of them has (the first ones): rows that documents on demand
    grew are compared with rows that did not grow on the documents both have."""
    n_docs = min(r.n_docs for r in (*a, *b))
    return first_docs(a, n_docs), first_docs(b, n_docs)


DOCS_LIMIT = 0.5  # the documents limit the interval when their share of its square is at least this


@dataclass(frozen=True)
class DocsDemand:
    """Whether the documents limit a pair's interval, and how many the design should go to (:func:`docs_demand`)."""

    limited: bool
    """The documents' share of the squared half-width at the next look is at least :data:`DOCS_LIMIT`, or there are
    fewer documents than their skewness needs (:attr:`PairedComponents.docs_needed`)."""
    share: float
    """The documents' share of the squared half-width, projected to the next look's sets."""
    factor: float
    """Documents needed over documents used: for the document part to be no wider than the seed part at the
    maximum sets, and for Cochran's rule (at least 1)."""
    docs: int | None
    """The planned document count to evaluate before the next look (the smallest one covering ``factor``, else the
    largest); None when the documents do not limit the interval or the plan allows no more."""


def docs_demand(c: PairedComponents, plan: Plan, next_look: int, level: float = 0.95) -> DocsDemand:
    """Documents on demand: whether the document part limits the interval of a pair left undecided, and the planned
    document count to go to before look ``next_look`` (an index into ``plan.looks``).

    The rule reads only the variance components and the documents' skewness, never the estimate, and moves only to
    the counts planned before the first look (``plan.docs``): the documents a look uses are fixed by the design and
    the data's noise, not by how close the difference came to a decision, so each look's test keeps its level
    ``alpha_k`` and the union bound over looks holds with the documents added (as for a sample size re-estimated
    from a nuisance variance; docs/decisions.md has the simulation). The cost of more documents is sets x
    documents: every set used so far is evaluated on the added documents."""
    sets = plan.looks[min(next_look, len(plan.looks) - 1)]
    n_docs = c.n_docs
    share = _projected_share(c, sets, level)
    w = max(c.v - c.c, 0.0)
    tau2 = max(c.between - w, 0.0)
    docs_at_max = max(c.c, 0.0) + w / plan.max_sets  # the document variance at the maximum sets, these documents
    seeds_at_max = tau2 / plan.max_sets
    factor = docs_at_max / seeds_at_max if seeds_at_max > 0 else math.inf
    factor = max(1.0, factor, c.docs_needed / n_docs)
    limited = share >= DOCS_LIMIT or n_docs < c.docs_needed
    docs = None
    if limited and plan.docs and n_docs < plan.docs[-1]:
        target = n_docs * factor
        docs = next((d for d in plan.docs if d >= target and d > n_docs), plan.docs[-1])
    return DocsDemand(limited, share, factor, docs)


def _projected_share(c: PairedComponents, n_sets: int, level: float) -> float:
    """The documents' share of the squared half-width at ``n_sets`` sets, the components as measured."""
    q = (1 + level) / 2
    t_docs = c.docs_quantile(level)
    w = max(c.v - c.c, 0.0)
    tau2 = max(c.between - w, 0.0)
    t_sets = _t_quantile(q, max(n_sets - 1, 1))
    docs = t_docs**2 * (max(c.c, 0.0) + w / n_sets)
    seeds = t_sets**2 * tau2 / n_sets
    return docs / (docs + seeds) if docs + seeds > 0 else 0.0


def families(fractions: Sequence[float], metrics: Sequence[str] = ("ce", "top1")) -> int:
    """The number of decision families an answer holds: one per decision fraction and metric."""
    return max(len(fractions), 1) * max(len(metrics), 1)


def family_statement(fractions: Sequence[float], metrics: Sequence[str] = ("ce", "top1"), alpha: float = ALPHA,
                     joint: bool = False) -> str:  # fmt: skip
    """One sentence for the answer: over what the stated error rate holds."""
    k = families(fractions, metrics)
    where = ", ".join(f"{f:g}" for f in fractions)
    names = " and ".join({"ce": "CE", "top1": "top-1"}.get(m, m) for m in metrics)
    if joint or k == 1:
        return (
            f"A false decision among all pairs, looks, fractions ({where}) and metrics ({names}) happens at most "
            f"{alpha:.0%} of the time" + (f" (alpha split evenly over the {k} families)." if k > 1 else ".")
        )
    return (
        f"The {alpha:.0%} error rate holds per fraction and metric ({k} families: fractions {where} x {names}): a "
        f"false decision somewhere in the answer can happen up to {min(k * alpha, 1):.0%} of the time "
        "(--decide-joint holds it over all of them)."
    )
