"""Paired comparisons of ablation methods: the difference of two methods' CE or top-1, with a 95% interval.

Within one seed, every method is evaluated on the same neuron sets and the same scored targets, so the comparison of
two methods A and B is paired. The sweep stores, for each (method, fraction, seed) row, per-document sums
(:class:`DocSums`): ``n[d]`` scored targets, ``ce_sum[d]`` summed token cross-entropy (nats) and ``correct[d]``
correct top-1 predictions. A row's metric is a ratio of sums, ``sum(ce_sum) / sum(n)`` or ``sum(correct) / sum(n)``.

Estimate
--------
Since A and B score the same targets (same ``n``), the per-seed difference is one ratio estimator,
``D_s = sum_d x[s, d] / sum_d n[s, d]`` with ``x = ce_sum_A - ce_sum_B`` (or ``correct_A - correct_B``), and the
estimate is the mean over seeds ``D = mean_s D_s``.

Model
-----
The documents are one sample of texts (or images) and the *same* documents are evaluated under every seed (only the
neuron sets and, for masked LMs, the masks change with the seed). Write ``D_s = theta + u_s + e_s``: ``u_s`` is the
seed effect (which neurons were drawn; variance ``tau2``), ``e_s`` the document-sampling error of seed ``s`` (variance
``v``). Because the documents are shared, ``e_s`` and ``e_t`` are correlated (covariance ``c``): a document on which
A beats B tends to be one under every seed. Then ``Var(D) = c + (tau2 + v - c) / S`` for ``S`` seeds.

Interval (how it is computed)
-----------------------------
1. Documents, paired and shared across seeds (delta method): each document's contribution to seed ``s``'s ratio is
   ``psi[s, d] = (x[s, d] - D_s n[s, d]) / mean_d n[s, d]`` (they sum to 0 over documents). The ``[S, S]`` document
   covariance of the seeds' ratios is ``psi psi^T / (N (N - 1))``: the same documents under every seed give the
   off-diagonal terms. It gives ``v`` (mean of its diagonal) and ``c`` (mean of its off-diagonal entries). The
   divisor ``N (N - 1)`` is the unbiased one; a plug-in bootstrap's is ``N**2``, too small by ``(N - 1) / N``
   (8% of the variance at 12 documents).
2. Seeds, as a random effect (method of moments): write ``sigma2 = tau2 + v - c`` for the variance of the part of
   ``D_s`` that differs between seeds, so ``Var(D) = c + sigma2 / S``. The between-seed sample variance ``B`` of the
   observed ``D_s`` (ddof 1) is an unbiased estimate of ``sigma2`` with ``S - 1`` degrees of freedom; ``W = v - c``
   is a lower bound for it (``tau2 >= 0``). Document noise is counted once: the part of it that differs between
   seeds is inside ``B``, the part shared by all seeds is ``c``. The reported standard error is
   ``se = sqrt(c + max(B, W) / S)``.
3. Interval ``D ± h`` with ``h**2 = max(t(S - 1)**2 * B, t(f)**2 * W) / S + t(f)**2 * c``, where ``t(k)`` is
   Student's t quantile at ``(1 + level) / 2`` with ``k`` degrees of freedom: each variance estimate gets the quantile
   of its own precision, the seed part takes the wider of the seed-based and the document-based margins (continuous
   in the data), and the shared document part is added in quadrature. ``f`` is the documents' degrees of freedom:
   ``N - 1`` when the documents weigh the same, fewer when a few long documents carry the ratio (Satterthwaite for a
   weighted mean, ``f = (N - 1) (sum w**2)**2 / (N sum w**4)`` with ``w_d`` document ``d``'s length over the mean
   length: with 12 documents of lognormal lengths the document variance has far fewer than 11 degrees of freedom,
   and ``t(11)`` covered 92% instead of 95%). With one seed, ``h = t(f) * sqrt(v)``: documents only, conditional on
   that seed's neuron set.
4. Too few documents. No interval for a mean can hold its level for every distribution of the documents (Bahadur &
   Savage 1956): with 12 documents drawn from a skewed distribution, the rare large per-document differences are
   usually not among them, and a t interval then excludes the true mean too often (about 20% instead of 5% for
   lognormal effects with log-sd 1 and lognormal lengths, documents only). Where the interval rests on the documents
   (their share of ``h**2`` at least :data:`DOC_SHARE`), Cochran's rule (Sampling Techniques, 1977, sec. 2.15) asks
   for ``25 G1**2`` documents, ``G1`` the sample skewness of the documents' contributions (``mean_s psi[s, d]``);
   with fewer, :meth:`PairedComponents.too_few_docs` is True and the comparison is not called significant: the answer
   says "too few documents to decide; needs about ``docs_needed``". ``significant`` means the interval excludes 0 and
   the documents suffice.

The figures of docs/decisions.md (tests/unit/test_calibration.py): 12 documents with the shared document part
dominant, 20 sets, no true difference in the population of documents, false decisions at one look at 5% (with the
rule of step 4): 3.0% (normal, equal lengths), 2.2% (lognormal log-sd 0.5, unequal lengths), 4.4% (log-sd 1, unequal
lengths), 2.9% (log-sd 1, 60 documents). The plain 95% interval covered 95.8%, 95.4%, 91.2% and 95.0%.

Why not a bootstrap of the documents? The plug-in bootstrap variance is the delta method's with divisor ``N**2`` (too
small by ``(N - 1) / N``) plus resampling noise, and its percentile or studentized intervals do not fix what goes
wrong at 12 skewed documents (the tail not drawn); in a documents-only simulation (docs/decisions.md) a studentized
bootstrap still excluded the mean in 12% of samples at 5%, and a sign-flip test over documents in 15%. Why not a
two-stage bootstrap (resample seeds, then documents within seeds)? Resampling both levels counts the document noise
twice (the observed spread of ``D_s`` already contains it; Davison & Hinkley 1997, sec. 3.8), and with three seeds a
resample of seeds takes only 10 distinct values and shrinks their variance by ``(S - 1) / S``. The seed level, with
its few values, gets the classical random-effects variance and a t reference distribution that reflects how few seeds
there are.

Everything is numpy and closed-form (no resampling): the same inputs give the same result, and one comparison of
20 seeds x 2000 documents takes a millisecond.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from knockout.errors import KnockoutError

METRICS = ("ce", "top1")
HIGHER_IS_BETTER = {"ce": False, "top1": True, "ld": True}  # ld: the logit difference of task prompts
COCHRAN = 25.0  # Cochran's rule: the mean is near normal from 25 G1**2 observations
DOC_SHARE = 0.25  # the documents' share of the interval from which their number must suffice


def _integer_array(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise KnockoutError(f"DocSums.{name} must hold integer counts, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise KnockoutError(f"DocSums.{name} must be one-dimensional [n_docs], got shape {arr.shape}")
    if np.any(arr < 0):
        raise KnockoutError(f"DocSums.{name} must not be negative")
    return arr


@dataclass(frozen=True)
class DocSums:
    """One sweep row's (one method, fraction and seed) per-document sums."""

    n: np.ndarray
    """``[n_docs]`` int: scored targets in each document."""
    ce_sum: np.ndarray
    """``[n_docs]`` float: sum of the document's token cross-entropies, in nats."""
    correct: np.ndarray
    """``[n_docs]`` int: correct top-1 predictions in each document."""

    def __post_init__(self):
        n = _integer_array(self.n, "n")
        correct = _integer_array(self.correct, "correct")
        ce_sum = np.asarray(self.ce_sum, dtype=np.float64)
        if ce_sum.ndim != 1:
            raise KnockoutError(f"DocSums.ce_sum must be one-dimensional [n_docs], got shape {ce_sum.shape}")
        if not (len(n) == len(ce_sum) == len(correct)):
            raise KnockoutError(
                f"DocSums arrays differ in length: n {len(n)}, ce_sum {len(ce_sum)}, correct {len(correct)}"
            )
        if not np.all(np.isfinite(ce_sum)):
            raise KnockoutError("DocSums.ce_sum must be finite")
        if np.any(correct > n):
            raise KnockoutError("DocSums.correct exceeds n (more correct predictions than scored targets)")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "ce_sum", ce_sum)
        object.__setattr__(self, "correct", correct)

    @property
    def n_docs(self) -> int:
        return len(self.n)

    def values(self, metric: str) -> np.ndarray:
        """``[n_docs]`` float: the per-document numerator of ``metric`` (``ce_sum`` or ``correct``)."""
        _check_metric(metric)
        return self.ce_sum if metric == "ce" else self.correct.astype(np.float64)

    def metric(self, metric: str) -> float:
        """The row's ``metric`` as a ratio of sums: mean CE per target, or the top-1 fraction."""
        total = int(self.n.sum())
        if total == 0:
            raise KnockoutError("DocSums has no scored targets (sum of n is 0)")
        return float(self.values(metric).sum() / total)


@dataclass(frozen=True)
class PairedDifference:
    """``metric(A) - metric(B)``, averaged over seeds, with its interval (see the module docstring)."""

    metric: str
    """``"ce"`` (nats) or ``"top1"`` (a fraction, not %)."""
    estimate: float
    """Mean over seeds of ``metric_A - metric_B``, each seed's metric a ratio of sums."""
    low: float
    high: float
    """Interval bounds at ``level``."""
    se: float
    """Standard error of ``estimate``: document sampling and seed variation together."""
    se_docs: float
    """The document-sampling part of ``se`` alone (seeds held fixed): when ``se`` is much larger, more seeds would
    narrow the interval more than more documents."""
    level: float
    n_seeds: int
    n_docs: int
    significant: bool
    """The interval excludes 0 and the documents suffice (not :attr:`too_few_docs`)."""
    method: str
    """How the interval was computed, in words."""
    too_few_docs: bool = False
    """The interval rests on the documents and there are too few of them to trust it (see
    :meth:`PairedComponents.too_few_docs`): ``significant`` is then False whatever the interval, and the answer should
    say "too few documents to decide; needs about ``docs_needed``"."""
    docs_needed: int = 0
    """Documents the document part needs (:attr:`PairedComponents.docs_needed`)."""


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise KnockoutError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def _paired_arrays(a: Sequence[DocSums], b: Sequence[DocSums], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate the pairing and return ``x = values_A - values_B`` and ``n``, both ``[n_seeds, n_docs]``."""
    _check_metric(metric)
    if len(a) == 0 or len(b) == 0:
        raise KnockoutError("no rows to compare: give at least one seed's DocSums for each method")
    if len(a) != len(b):
        raise KnockoutError(f"methods have different numbers of seeds ({len(a)} vs {len(b)}); pair them by seed")
    n_docs = a[0].n_docs
    if n_docs == 0:
        raise KnockoutError("no documents to compare (n_docs is 0)")
    xs, ns = [], []
    for s, (ra, rb) in enumerate(zip(a, b)):
        if not isinstance(ra, DocSums) or not isinstance(rb, DocSums):
            raise KnockoutError(f"seed {s}: expected DocSums, got {type(ra).__name__} and {type(rb).__name__}")
        if ra.n_docs != n_docs or rb.n_docs != n_docs:
            raise KnockoutError(
                f"seed {s}: document counts differ (A {ra.n_docs}, B {rb.n_docs}, first seed {n_docs}); "
                "every row must cover the same evaluation documents"
            )
        if not np.array_equal(ra.n, rb.n):
            raise KnockoutError(
                f"seed {s}: A and B scored different targets (their n differ), so they are not paired; "
                "compare rows of the same seed"
            )
        if ra.n.sum() == 0:
            raise KnockoutError(f"seed {s}: no scored targets (sum of n is 0)")
        xs.append(ra.values(metric) - rb.values(metric))
        ns.append(ra.n)
    return np.stack(xs), np.stack(ns).astype(np.float64)


def _linearized(x: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each seed's ratio and each document's linearized contribution to it.

    ``x``, ``n``: ``[n_seeds, n_docs]``. Returns ``D`` ``[n_seeds]`` (``sum_d x / sum_d n``) and ``psi``
    ``[n_seeds, n_docs]``, ``psi[s, d] = (x[s, d] - D[s] n[s, d]) / mean_d n[s, d]``: the ratio's influence values
    (delta method), which sum to 0 over documents. ``D[s] - theta ~ mean_d psi[s, d]`` for documents drawn at random.
    """
    totals = n.sum(axis=1)  # [n_seeds]
    ratios = x.sum(axis=1) / totals
    psi = (x - ratios[:, None] * n) / (totals / x.shape[1])[:, None]
    return ratios, psi


def _skewness(psi: np.ndarray) -> float:
    """Adjusted Fisher-Pearson sample skewness ``G1`` of ``psi`` ``[n_docs]`` (0 with fewer than 3 values)."""
    n_docs = len(psi)
    centred = psi - psi.mean()
    m2 = float(np.mean(centred**2))
    if n_docs < 3 or m2 <= 0:
        return 0.0
    g1 = float(np.mean(centred**3)) / m2**1.5
    return g1 * math.sqrt(n_docs * (n_docs - 1)) / (n_docs - 2)


@dataclass(frozen=True)
class PairedComponents:
    """The variance components of one paired comparison (see the module docstring), from which its interval at any
    level follows without recomputation (:meth:`difference`)."""

    metric: str
    per_seed: np.ndarray
    """``[n_seeds]`` each seed's ``D_s`` (ratio of sums)."""
    n_docs: int
    v: float
    """Per-seed document variance (delta method, ``N / (N - 1)``-corrected)."""
    c: float
    """Document variance shared by all seeds (0 with one seed)."""
    n_resamples: int
    """0: the components are computed in closed form (kept for callers that printed a bootstrap's resamples)."""
    docs_variance: float = 0.0
    """Variance of the seed mean from document sampling alone (seeds held fixed): the mean of the document
    covariance matrix, ``c + (v - c) / S``."""
    influence: np.ndarray | None = field(default=None, compare=False, repr=False)
    """``[n_docs]`` each document's linearized contribution to the seed mean (averaged over seeds; sums to 0)."""
    skewness: float = 0.0
    """Sample skewness ``G1`` of :attr:`influence`."""
    docs_df: float = 1.0
    """Degrees of freedom of the document variance: ``N - 1`` for equal lengths, fewer when a few long documents
    carry the mean (Satterthwaite on the documents' weights, see the module docstring)."""

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    @property
    def estimate(self) -> float:
        return float(self.per_seed.mean())

    @property
    def between(self) -> float:
        """Sample variance of the seeds' ``D_s`` (ddof 1); 0 with one seed."""
        return float(np.var(self.per_seed, ddof=1)) if self.n_seeds > 1 else 0.0

    @property
    def variance(self) -> float:
        """``Var(D)``: ``c + max(B, v - c) / S`` (one seed: ``v``)."""
        if self.n_seeds == 1:
            return self.v
        return self.c + max(self.between, self.v - self.c) / self.n_seeds

    @property
    def docs_needed(self) -> int:
        """Documents the document part needs before its interval is trusted: Cochran's rule, ``25 G1**2`` for the
        skewness ``G1`` of the documents' contributions (at least 3)."""
        return max(3, math.ceil(COCHRAN * self.skewness**2))

    def docs_quantile(self, level: float) -> float:
        """The quantile the document terms get at ``level``: Student's t with :attr:`docs_df` degrees of freedom."""
        return _t_quantile((1 + level) / 2, self.docs_df)

    def _parts(self, level: float) -> tuple[float, float]:
        """``(seed part, document part)`` of the squared half-width at ``level``."""
        q = (1 + level) / 2
        q_docs = self.docs_quantile(level)
        if self.n_seeds == 1:
            return 0.0, q_docs**2 * self.v
        t_seeds = _t_quantile(q, self.n_seeds - 1)
        w = self.v - self.c
        seed_part = max(t_seeds**2 * self.between, q_docs**2 * w) / self.n_seeds
        docs_in_seed = q_docs**2 * w / self.n_seeds if q_docs**2 * w >= t_seeds**2 * self.between else 0.0
        return seed_part - docs_in_seed, docs_in_seed + q_docs**2 * self.c

    def half_width(self, level: float) -> float:
        """Half-width of the interval at ``level`` (step 3 of the module docstring)."""
        seeds, docs = self._parts(level)
        return math.sqrt(max(seeds + docs, 0.0))

    def doc_share(self, level: float) -> float:
        """The documents' share of the squared half-width at ``level`` (0 to 1): near 1, only more documents narrow
        the interval."""
        seeds, docs = self._parts(level)
        total = seeds + docs
        return float(docs / total) if total > 0 else 0.0

    def too_few_docs(self, level: float) -> bool:
        """Whether the interval at ``level`` rests on the documents (their share at least :data:`DOC_SHARE`) while
        there are fewer of them than :attr:`docs_needed`: then no verdict about documents in general is made."""
        return self.n_docs < self.docs_needed and self.doc_share(level) >= DOC_SHARE

    def difference(self, level: float = 0.95) -> PairedDifference:
        """The estimate with its interval at ``level``."""
        if not 0 < level < 1:
            raise KnockoutError(f"level must be between 0 and 1, got {level}")
        estimate, half = self.estimate, self.half_width(level)
        if self.n_seeds == 1:
            how = (
                f"paired documents (delta method, N/(N-1)), one seed: document sampling only; t({self.docs_df:.1f}) "
                "quantile"
            )
        else:
            how = (
                f"paired documents shared across {self.n_seeds} seeds (delta method, N/(N-1)) + random-effects seed "
                f"variance; t(S-1) for the seeds, t({self.docs_df:.1f}) for the documents"
            )
        low, high = estimate - half, estimate + half
        blocked = self.too_few_docs(level)
        return PairedDifference(
            metric=self.metric,
            estimate=estimate,
            low=low,
            high=high,
            se=math.sqrt(max(self.variance, 0.0)),
            se_docs=math.sqrt(max(self.docs_variance, 0.0)),
            level=level,
            n_seeds=self.n_seeds,
            n_docs=self.n_docs,
            significant=bool((low > 0 or high < 0) and not blocked),
            method=how,
            too_few_docs=blocked,
            docs_needed=self.docs_needed,
        )


def paired_components(
    a: Sequence[DocSums], b: Sequence[DocSums], metric: str, n_boot: int = 2000, seed: int = 0
) -> PairedComponents:
    """The variance components of ``metric(A) - metric(B)`` (arguments as :func:`paired_difference`)."""
    if n_boot < 10:
        raise KnockoutError(f"n_boot must be at least 10, got {n_boot}")
    x, n = _paired_arrays(a, b, metric)  # [n_seeds, n_docs]
    n_seeds, n_docs = x.shape
    per_seed, psi = _linearized(x, n)  # [n_seeds], [n_seeds, n_docs]
    if n_docs < 2:
        raise KnockoutError("too few documents with scored targets to compare (at least 2 are needed)")
    cov = psi @ psi.T / (n_docs * (n_docs - 1))  # [n_seeds, n_seeds]: document covariance of the seeds' ratios
    if n_seeds == 1:
        v, c = float(cov[0, 0]), 0.0
    else:
        v = float(np.mean(np.diag(cov)))  # per-seed document variance
        c = float((cov.sum() - np.trace(cov)) / (n_seeds * (n_seeds - 1)))  # shared by all seeds
    influence = psi.mean(axis=0)  # [n_docs]
    weights = (n / n.mean(axis=1, keepdims=True)).mean(axis=0)  # [n_docs] each document's weight in the seed mean
    df = (n_docs - 1) * float(np.sum(weights**2)) ** 2 / (n_docs * float(np.sum(weights**4)))
    return PairedComponents(
        metric, per_seed, n_docs, v, c, 0, docs_variance=float(cov.mean()), influence=influence,
        skewness=_skewness(influence), docs_df=max(df, 1.0),
    )  # fmt: skip


def paired_difference(
    a: Sequence[DocSums],
    b: Sequence[DocSums],
    metric: str,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """``metric(A) - metric(B)`` over seeds, with a paired interval (method: see the module docstring).

    ``a[s]`` and ``b[s]`` are the rows of methods A and B for the same seed ``s`` (same fraction): the same documents
    in the same order, with the same ``n``. All seeds cover the same documents, in the same order. ``metric`` is
    ``"ce"`` or ``"top1"``. The result is a closed form: ``n_boot`` and ``seed`` are accepted for callers written for
    the document bootstrap this replaced, and ignored.
    """
    if not 0 < level < 1:
        raise KnockoutError(f"level must be between 0 and 1, got {level}")
    return paired_components(a, b, metric, n_boot, seed).difference(level)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


@lru_cache(maxsize=4096)
def _t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` (real, > 0) degrees of freedom, for ``0.5 <= p < 1`` (scipy-free)."""
    if not 0.5 <= p < 1:
        raise ValueError(f"p must be in [0.5, 1), got {p}")
    if p == 0.5:
        return 0.0
    if math.isinf(df) or df > 1e7:
        return NormalDist().inv_cdf(p)
    tail = 1.0 - p
    upper = lambda t: 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))  # P(T > t), t >= 0
    lo, hi = 0.0, 2.0
    while upper(hi) > tail:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if upper(mid) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)
