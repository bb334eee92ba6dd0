"""Faithfulness of circuits, with paired intervals over prompts, and faithfulness curves with their areas.

A circuit is checked by keeping it and ablating everything else. Three rows of per-prompt sums on the *same* prompts
(same ``n`` per prompt) give its faithfulness for a metric ``m`` (as the field normalises it: Wang et al. 2022,
Miller et al. 2024, MIB 2025):

    f = (m(circuit) - m(empty)) / (m(full) - m(empty))

- ``full``: the unablated model (the seed's baseline row);
- ``circuit``: the circuit kept, every other neuron of the site ablated with the method;
- ``empty``: nothing kept, every neuron ablated with the same method.

``f`` is 1 when the circuit scores as the full model and 0 when it scores as the empty one, exactly (the same sums give
the same floats). ``m`` is a ratio of sums over prompts, as everywhere in knockout: ``"ld"`` the logit difference,
``sum(ld_sum) / sum(n)`` (task prompts with a correct and an incorrect answer), or ``"ce"`` the cross-entropy on the
answer tokens, ``sum(ce_sum) / sum(n)``; the formula is the same for both (for CE, lower is better, and ``f`` is still
1 at the full model and 0 at the empty one).

Rows are what :attr:`knockout.runfolder.RunFolder.stored_sums` holds (a mapping with ``n``,
``ce_sum`` and, for contrast prompts, ``ld_sum``, each ``[n_prompts]``), or :class:`~knockout.inference.paired.DocSums`
(CE only). One row per state: one seed.

Intervals. The prompts are one sample; the rows are paired through them. A bootstrap over prompts draws ``n_boot``
resamples of the prompt indices with replacement and applies *the same* indices to every row involved (all three of a
faithfulness, all five of a comparison of two methods, every row of two curves), recomputes each row's ratio of sums
and from them the faithfulness (or the difference, or the area); the interval is the percentile interval at
``level`` of those values. Percentiles suit a ratio whose denominator ``m(full) - m(empty)`` may be small: they follow
the skew that a symmetric t interval would hide. Resamples in which a denominator is 0 (or a row has no scored target)
are dropped and the count kept is reported. A comparison is **decided** when its interval excludes 0. Everything is
numpy, deterministic for a given ``seed``, and vectorised (one matrix product per chunk of resamples, through
:func:`_bootstrap_ratios`); identical rows share one column, so their resampled metrics are
identical and the exact 1 and 0 hold in every resample too.

Curves. For a planned set of circuit sizes ``k_1 < ... < k_m`` (heads kept, say) out of ``total``, the faithfulness
at each size gives a curve over the normalised size ``x = k / total``. Its areas, by the trapezoid rule over the planned
points as MIB computes them: **CPR** = area under ``f`` (higher: more faithful), **CMD** = area under ``|1 - f|``
(lower: closer to the full model). Both cover ``[x_1, x_m]`` only (plan ``k = 0`` and ``k = total`` to cover
``[0, 1]``; at ``k = 0`` the circuit row is the empty row and ``f = 0``, at ``k = total`` it is the full model's and
``f = 1``). The smallest planned ``k`` whose faithfulness reaches ``threshold`` (0.8) is reported, or ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from knockout.errors import KnockoutError

METRICS = ("ld", "ce")
_FIELDS = {"ld": "ld_sum", "ce": "ce_sum"}
_NAMES = {"ld": "logit difference", "ce": "cross-entropy on the answer tokens"}


_CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once (n_resamples_in_chunk * n_docs)


def _bootstrap_ratios(x: np.ndarray, n: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_resamples, n_rows]``: each row's ratio ``sum(x) / sum(n)`` over the same resampled prompts.

    ``x``, ``n``: ``[n_rows, n_docs]``. Resample ``b`` draws ``n_docs`` prompt indices with replacement, shared by all
    rows; its counts ``[n_docs]`` times ``[x; n].T`` give the resampled sums. Resamples with no scored target in some
    row are dropped."""
    n_rows, n_docs = x.shape
    weights = np.concatenate([x, n]).T  # [n_docs, 2 * n_rows]
    chunk = max(1, _CHUNK_ELEMENTS // n_docs)
    out = []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        idx = rng.integers(0, n_docs, size=(rows, n_docs))  # [rows, n_docs]
        flat = (idx + (np.arange(rows) * n_docs)[:, None]).ravel()
        counts = np.bincount(flat, minlength=rows * n_docs).reshape(rows, n_docs).astype(np.float64)
        sums = counts @ weights  # [rows, 2 * n_rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append(sums[:, :n_rows] / sums[:, n_rows:])
    ratios = np.concatenate(out)
    ratios = ratios[np.all(np.isfinite(ratios), axis=1)]
    if len(ratios) < 2:
        raise KnockoutError("too few prompts with scored targets to bootstrap")
    return ratios


# -- rows -------------------------------------------------------------------------------------------------------------
def _field(row, name: str):
    if isinstance(row, Mapping):
        return row.get(name)
    return getattr(row, name, None)


def _row(row, metric: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(numerator, n)``, both ``[n_docs]`` float64, of ``row`` for ``metric``."""
    if metric not in METRICS:
        raise KnockoutError(f"unknown faithfulness metric {metric!r}; choose one of {', '.join(METRICS)}")
    num, n = _field(row, _FIELDS[metric]), _field(row, "n")
    if n is None or num is None:
        need = "task prompts with a correct and an incorrect answer" if metric == "ld" else "per-prompt sums"
        raise KnockoutError(f"the {what} row has no {_FIELDS[metric]!r} (the {_NAMES[metric]} needs {need})")
    num, n = np.asarray(num, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if num.ndim != 1 or num.shape != n.shape:
        raise KnockoutError(f"the {what} row's {_FIELDS[metric]} and n must be [n_prompts] arrays of one length")
    if not np.all(np.isfinite(num)):
        raise KnockoutError(f"the {what} row's {_FIELDS[metric]} is not finite")
    return num, n


class _Rows:
    """Named rows on the same prompts: their point metrics and their metrics on shared bootstrap resamples."""

    def __init__(self, rows: dict[str, object], metric: str, n_boot: int, seed: int):
        if n_boot < 10:
            raise KnockoutError(f"n_boot must be at least 10, got {n_boot}")
        arrays = {name: _row(r, metric, name) for name, r in rows.items()}
        first_name, (first, n) = next(iter(arrays.items()))
        if len(n) == 0 or n.sum() == 0:
            raise KnockoutError(f"the {first_name} row has no scored targets")
        columns: dict[bytes, int] = {}
        self.column: dict[str, int] = {}
        nums = []
        for name, (num, n_row) in arrays.items():
            if n_row.shape != n.shape or not np.array_equal(n_row, n):
                raise KnockoutError(
                    f"the {name} row scored other targets than the {first_name} row (their n differ); faithfulness "
                    "pairs rows of the same prompts"
                )
            key = num.tobytes()
            if key not in columns:  # identical rows share one column: identical resampled metrics
                columns[key] = len(nums)
                nums.append(num)
            self.column[name] = columns[key]
        x = np.stack(nums)  # [n_unique, n_docs]
        self.metric, self.n_docs = metric, len(n)
        self.point = x.sum(axis=1) / n.sum()  # [n_unique]
        ns = np.broadcast_to(n, x.shape)
        self.boot = _bootstrap_ratios(x, ns, n_boot, np.random.default_rng(seed))  # [n_resamples, n_unique]

    def __getitem__(self, name: str) -> tuple[float, np.ndarray]:
        """A row's metric and its resampled metrics ``[n_resamples]``."""
        c = self.column[name]
        return float(self.point[c]), self.boot[:, c]


def _ratio(circuit, empty, full):
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(circuit) - empty) / (np.asarray(full) - empty)


def _faith(rows: _Rows, circuit: str, empty: str) -> tuple[float, np.ndarray]:
    (mc, bc), (me, be), (mf, bf) = rows[circuit], rows[empty], rows["full"]
    if mf == me:
        raise KnockoutError(
            f"the full model and the {empty} row have the same {_NAMES[rows.metric]} ({mf:.6g}): faithfulness "
            "(m(circuit) - m(empty)) / (m(full) - m(empty)) is undefined"
        )
    return float(_ratio(mc, me, mf)), _ratio(bc, be, bf)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise KnockoutError(f"level must be between 0 and 1, got {level}")


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval at ``level`` of the finite ``values``."""
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _finite(*arrays: np.ndarray) -> np.ndarray:
    """``[n_resamples]`` bool: resamples where every array (``[n_resamples]`` or ``[n_resamples, k]``) is finite."""
    keep = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        keep &= np.isfinite(a).reshape(len(a), -1).all(axis=1)
    if keep.sum() < 2:
        raise KnockoutError(
            "too few bootstrap resamples with a defined faithfulness (m(full) = m(empty) in nearly all)"
        )
    return keep


def _how(n: int, rows: int) -> str:
    return f"paired bootstrap over prompts ({n} resamples, the same prompts for all {rows} rows), percentile interval"


# -- results ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A quantity with its percentile interval."""

    estimate: float
    low: float
    high: float
    level: float

    @property
    def decided(self) -> bool:
        """The interval excludes 0 (for a difference: the two differ at ``level``)."""
        return bool(self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class Faithfulness:
    """One circuit's faithfulness under one method, with its interval over prompts."""

    metric: str
    """``"ld"`` or ``"ce"``."""
    estimate: float
    """``(m(circuit) - m(empty)) / (m(full) - m(empty))``."""
    low: float
    high: float
    """Percentile interval at ``level`` (bootstrap over prompts, shared by the three rows)."""
    level: float
    full: float
    circuit: float
    empty: float
    """The three rows' metrics ``m``."""
    n_docs: int
    n_resamples: int
    """Bootstrap resamples kept (those with a defined faithfulness)."""
    method: str
    """How the interval was computed, in words."""


@dataclass(frozen=True)
class FaithfulnessDifference:
    """``f_A - f_B`` for one circuit under two methods, paired over prompts."""

    metric: str
    a: float
    b: float
    """Each method's faithfulness."""
    difference: Estimate
    """``a - b`` with its interval; ``difference.decided``: the methods' faithfulness differs at its level."""
    n_docs: int
    n_resamples: int
    method: str

    @property
    def decided(self) -> bool:
        return self.difference.decided


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness at planned circuit sizes under one method, and the curve's areas."""

    metric: str
    sizes: tuple[float, ...]
    """The planned sizes ``k`` (increasing)."""
    x: tuple[float, ...]
    """``k / total``: the normalised sizes."""
    faithfulness: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    """Per size, the faithfulness and its percentile interval (pointwise)."""
    cpr: Estimate
    """Area under the curve over ``x`` (trapezoid over the planned points; MIB's CPR)."""
    cmd: Estimate
    """Area under ``|1 - f|`` over ``x`` (trapezoid; MIB's CMD)."""
    threshold: float
    k_reached: float | None
    """The smallest planned ``k`` whose faithfulness is at least ``threshold``; ``None``: none reaches it."""
    level: float
    n_docs: int
    n_resamples: int
    method: str


@dataclass(frozen=True)
class CurveDifference:
    """Two methods' faithfulness curves on the same sizes and prompts: paired differences of their areas."""

    metric: str
    a: FaithfulnessCurve
    b: FaithfulnessCurve
    cpr: Estimate
    """``CPR_A - CPR_B`` with its interval (``cpr.decided``: the areas differ)."""
    cmd: Estimate
    """``CMD_A - CMD_B`` with its interval."""
    n_resamples: int
    method: str

    @property
    def decided(self) -> bool:
        """Whether either area's difference is decided."""
        return self.cpr.decided or self.cmd.decided


# -- one circuit ------------------------------------------------------------------------------------------------------
def faithfulness(
    full, circuit, empty, metric: str = "ld", level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> Faithfulness:
    """The faithfulness of a circuit under one method: rows ``full`` (unablated), ``circuit`` (circuit kept) and
    ``empty`` (nothing kept), per-prompt sums on the same prompts (see the module docstring)."""
    _check_level(level)
    rows = _Rows({"full": full, "circuit": circuit, "empty": empty}, metric, n_boot, seed)
    est, boot = _faith(rows, "circuit", "empty")
    boot = boot[_finite(boot)]
    low, high = _interval(boot, level)
    return Faithfulness(
        metric, est, low, high, level, rows["full"][0], rows["circuit"][0], rows["empty"][0], rows.n_docs, len(boot),
        _how(len(boot), 3),
    )  # fmt: skip


def faithfulness_difference(
    full,
    circuit_a,
    empty_a,
    circuit_b,
    empty_b,
    metric: str = "ld",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> FaithfulnessDifference:
    """``f_A - f_B``: one circuit's faithfulness under methods A and B (each with its own circuit and empty rows, the
    same ``full`` row), with a paired interval over prompts and whether it is decided at ``level``."""
    _check_level(level)
    rows = _Rows({"full": full, "circuit A": circuit_a, "empty A": empty_a, "circuit B": circuit_b,
                  "empty B": empty_b}, metric, n_boot, seed)  # fmt: skip
    (fa, ba), (fb, bb) = _faith(rows, "circuit A", "empty A"), _faith(rows, "circuit B", "empty B")
    d = (ba - bb)[_finite(ba, bb)]
    low, high = _interval(d, level)
    return FaithfulnessDifference(
        metric, fa, fb, Estimate(fa - fb, low, high, level), rows.n_docs, len(d), _how(len(d), 5)
    )


# -- curves -----------------------------------------------------------------------------------------------------------
def curve_areas(x, f) -> tuple[np.ndarray, np.ndarray]:
    """``(cpr, cmd)``: the trapezoid areas under ``f`` and under ``|1 - f|`` over ``x`` (``[m]`` increasing), for
    ``f`` of shape ``[..., m]`` (one curve per leading index). With one point both areas are 0."""
    x, f = np.asarray(x, dtype=np.float64), np.asarray(f, dtype=np.float64)
    dx = np.diff(x)  # [m - 1]
    mid = lambda g: (g[..., 1:] + g[..., :-1]) / 2  # noqa: E731
    return (mid(f) * dx).sum(axis=-1), (mid(np.abs(1 - f)) * dx).sum(axis=-1)


def smallest_reaching(sizes: Sequence[float], f: Sequence[float], threshold: float = 0.8) -> float | None:
    """The first of ``sizes`` (increasing) whose faithfulness ``f`` is at least ``threshold``, or ``None``."""
    for k, v in zip(sizes, f):
        if v >= threshold:
            return k
    return None


def _check_sizes(sizes: Sequence[float], total: float, n_rows: int) -> np.ndarray:
    k = np.asarray(sizes, dtype=np.float64)
    if k.ndim != 1 or len(k) == 0:
        raise KnockoutError("a faithfulness curve needs at least one planned circuit size")
    if len(k) != n_rows:
        raise KnockoutError(f"{len(k)} circuit sizes but {n_rows} circuit rows; give one row per size")
    if np.any(np.diff(k) <= 0):
        raise KnockoutError(f"circuit sizes must be strictly increasing, got {list(sizes)}")
    if not total > 0 or k[0] < 0 or k[-1] > total:
        raise KnockoutError(f"circuit sizes must lie in [0, total = {total}], got {list(sizes)}")
    return k / total


def _curve(rows: _Rows, prefix: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Point ``[m]`` and resampled ``[n_resamples, m]`` faithfulness of the curve whose rows are named
    ``{prefix}circuit {i}`` and ``{prefix}empty``."""
    points, boots = zip(*(_faith(rows, f"{prefix}circuit {i}", f"{prefix}empty") for i in range(n)))
    return np.array(points), np.stack(boots, axis=1)


def _make_curve(metric, sizes, x, point, boot, threshold, level, n_docs, how) -> FaithfulnessCurve:
    cpr, cmd = curve_areas(x, point)
    bcpr, bcmd = curve_areas(x, boot)
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return FaithfulnessCurve(
        metric, tuple(float(k) for k in sizes), tuple(float(v) for v in x), tuple(float(v) for v in point),
        tuple(float(v) for v in low), tuple(float(v) for v in high),
        Estimate(float(cpr), *_interval(bcpr, level), level), Estimate(float(cmd), *_interval(bcmd, level), level),
        threshold, smallest_reaching(sizes, point, threshold), level, n_docs, len(boot), how,
    )  # fmt: skip


def _curve_rows(circuits: Sequence, empty, tag: str) -> dict[str, object]:
    return {**{f"{tag}circuit {i}": r for i, r in enumerate(circuits)}, f"{tag}empty": empty}


def faithfulness_curve(
    full,
    circuits: Sequence,
    empty,
    sizes: Sequence[float],
    total: float,
    metric: str = "ld",
    threshold: float = 0.8,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> FaithfulnessCurve:
    """One method's faithfulness curve: ``circuits[i]`` is the row keeping the circuit of size ``sizes[i]`` (e.g. the
    scan's top ``k`` heads) out of ``total``; ``empty`` the method's nothing-kept row, ``full`` the unablated row.
    Pointwise intervals, CPR and CMD with intervals, and the smallest size reaching ``threshold``."""
    _check_level(level)
    x = _check_sizes(sizes, total, len(circuits))
    rows = _Rows({"full": full, **_curve_rows(circuits, empty, "")}, metric, n_boot, seed)
    point, boot = _curve(rows, "", len(circuits))
    boot = boot[_finite(boot)]
    return _make_curve(metric, sizes, x, point, boot, threshold, level, rows.n_docs, _how(len(boot), len(circuits) + 2))


def curve_difference(
    full,
    circuits_a: Sequence,
    empty_a,
    circuits_b: Sequence,
    empty_b,
    sizes: Sequence[float],
    total: float,
    metric: str = "ld",
    threshold: float = 0.8,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> CurveDifference:
    """Methods A and B's faithfulness curves on the same sizes and prompts, and the paired differences of their
    areas (``CPR_A - CPR_B``, ``CMD_A - CMD_B``), every row resampled with the same prompts."""
    _check_level(level)
    x = _check_sizes(sizes, total, len(circuits_a))
    _check_sizes(sizes, total, len(circuits_b))
    named = {"full": full, **_curve_rows(circuits_a, empty_a, "A "), **_curve_rows(circuits_b, empty_b, "B ")}
    rows = _Rows(named, metric, n_boot, seed)
    (pa, ba), (pb, bb) = _curve(rows, "A ", len(sizes)), _curve(rows, "B ", len(sizes))
    keep = _finite(ba, bb)
    ba, bb = ba[keep], bb[keep]
    how = _how(len(ba), len(named))
    a = _make_curve(metric, sizes, x, pa, ba, threshold, level, rows.n_docs, how)
    b = _make_curve(metric, sizes, x, pb, bb, threshold, level, rows.n_docs, how)
    (cpr_a, cmd_a), (cpr_b, cmd_b) = curve_areas(x, ba), curve_areas(x, bb)
    cpr = Estimate(a.cpr.estimate - b.cpr.estimate, *_interval(cpr_a - cpr_b, level), level)
    cmd = Estimate(a.cmd.estimate - b.cmd.estimate, *_interval(cmd_a - cmd_b, level), level)
    return CurveDifference(metric, a, b, cpr, cmd, len(ba), how)
