"""The CPU work of :meth:`knockout.stats.LayerStats.add`: two passes over a batch, compiled by numba (on first use,
then cached on disk beside this file or in numba's cache directory).

A batch is ``[n, width]`` activations (float32 or float64, a C-contiguous numpy array), read one token's row at a
time, twice, in one call (:func:`update`) for every batch that can be counted as it is:

1. the first pass: each neuron's sum in float64, lowest and highest value and their bins, and the batch's verdict:
   finite? inside the window? inside each neuron's stored bins? Nothing is changed unless the batch can be counted
   as it is; otherwise :func:`update` returns after it, and the caller grows the stored bins, raises, or counts the
   values outside the window on the path of the other devices, then calls :func:`add_batch` for the second pass.
2. the second pass: each neuron's sum of squared deviations from its mean (float64), one count per value at
   ``offset[j] + floor(x / eps)`` in the flat histogram (the bin in x's dtype, as on every device), and the
   batch merged into the running moments, minimum and maximum with Chan et al.'s update (the same operations as
   :func:`~knockout.stats.running.merge_moments`).

The sums are torch's CPU summation, per neuron: rows are added in runs of ``2**p`` rows
(``p = max(4, ceil(log2 n) // 4)``), whose sums go into three further levels flushed in cascade (``multi_row_sum``
in ATen's ``SumKernel.cpp``), so that only numbers of a similar size are added. On a layer whose neurons torch's
vectorised loop adds that way (a width that is a multiple of 32 per thread with AVX-512, 16 with AVX2: 576 neurons
with one or two threads), mean and variance are bit for bit those of ``x.double().sum(0)`` and
``(x.double() - mean).square().sum(0)``, as earlier versions of knockout computed them on a CPU; torch adds a few
neurons at the end of other layers in another order, so their last bit may differ from those versions. Unlike
torch's, these sums do not depend on the number of threads.

One pass costs about what reading the batch costs plus, in the second, one memory update per value: no table over
the layer's range is made, and the cost follows the tokens, not the histogram's width.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(inline="always")
def _level_power(n):
    """``max(4, ceil(log2 n) // 4)``, with torch's ``CeilLog2`` (1 for ``n <= 2``)."""
    c = 1
    if n > 2:
        c = 0
        v = n - 1
        while v:
            c += 1
            v >>= 1
    return max(4, c // 4)


@numba.njit(inline="always")
def _flush(i, lp, a0, a1, a2, a3):
    """After row ``i`` (a multiple of ``2**lp``): move level 0 into level 1, and so on up while ``i`` is a multiple
    of the next level's size."""
    mask = (1 << lp) - 1
    for j in range(a0.size):
        a1[j] += a0[j]
        a0[j] = 0.0
    if i & (mask << lp):
        return
    for j in range(a0.size):
        a2[j] += a1[j]
        a1[j] = 0.0
    if i & (mask << (2 * lp)):
        return
    for j in range(a0.size):
        a3[j] += a2[j]
        a2[j] = 0.0


@numba.njit(inline="always")
def _total(j, a0, a1, a2, a3):
    """Neuron ``j``'s sum at the end of a pass: its levels added from the lowest up, as torch adds them."""
    return ((a0[j] + a1[j]) + a2[j]) + a3[j]


#: The first pass's verdict on a batch (:func:`update`): every value inside its neuron's stored bins (the batch is
#: then added at once); inside the window but some neurons' stored bins must grow first; some values outside the
#: window; a value that is NaN or infinite.
INSIDE, GROW, OUTSIDE, NONFINITE = 0, 1, 2, 3


@numba.njit(inline="always")
def _clamped_bin(v, eps, k_min, k_max):
    """``floor(v / eps)`` (in v's dtype) clamped to ``k_min - 1 .. k_max + 1``: also for ``v / eps`` beyond int64."""
    q = np.floor(v / eps)
    if q < k_min:
        return k_min - 1
    if q > k_max:
        return k_max + 1
    return np.int64(q)


@numba.njit(inline="always")
def _has_nan(x, j):
    """Whether column ``j`` of ``x`` holds a NaN."""
    for i in range(x.shape[0]):
        if np.isnan(x[i, j]):
            return True
    return False


@numba.njit(inline="always")
def _first_pass(x, eps, k_min, k_max, alo, ahi):
    """``(total, low, high, bin_lo, bin_hi, verdict)`` of ``x: [n, width]`` (``n >= 1``): each neuron's sum
    (float64), lowest and highest value (x's dtype), their bins (clamped to ``k_min - 1 .. k_max + 1``) and the
    batch's verdict (:data:`INSIDE` ...) against each neuron's stored bins ``alo`` / ``ahi``."""
    n, w = x.shape
    lp = _level_power(n)
    step = 1 << lp
    a0, a1, a2, a3 = np.zeros(w), np.zeros(w), np.zeros(w), np.zeros(w)
    low = x[0].copy()
    high = x[0].copy()
    for i in range(n):
        row = x[i]
        for j in range(w):
            v = row[j]
            a0[j] += v
            low[j] = v if v < low[j] else low[j]
            high[j] = v if v > high[j] else high[j]
        if (i + 1) % step == 0:
            _flush(i + 1, lp, a0, a1, a2, a3)
    total = np.empty(w)
    bin_lo = np.empty(w, np.int64)
    bin_hi = np.empty(w, np.int64)
    verdict = INSIDE
    for j in range(w):
        total[j] = _total(j, a0, a1, a2, a3)
        # an inf is a lowest or highest value; a NaN makes its neuron's sum NaN (so may float64 values near the
        # largest, whose sums overflow: those are looked for value by value)
        if not (np.isfinite(low[j]) and np.isfinite(high[j])) or (np.isnan(total[j]) and _has_nan(x, j)):
            return total, low, high, bin_lo, bin_hi, NONFINITE
        bin_lo[j] = _clamped_bin(low[j], eps, k_min, k_max)
        bin_hi[j] = _clamped_bin(high[j], eps, k_min, k_max)
        if bin_lo[j] < k_min or bin_hi[j] > k_max:
            verdict = OUTSIDE
        elif verdict == INSIDE and (bin_lo[j] < alo[j] or bin_hi[j] > ahi[j]):
            verdict = GROW
    return total, low, high, bin_lo, bin_hi, verdict


@numba.njit(inline="always")
def _second_pass(x, total, eps, offsets, counts):
    """Each neuron's sum of squared deviations from its mean ``total / n`` (float64, summed as
    :func:`_first_pass` sums), and, unless ``counts`` is empty, one added to ``counts[offsets[j] + floor(x[i, j] /
    eps)]`` for every value: the bins of a run of rows at once, then their counts (no test per row: a test in the
    loop keeps it from being vectorised)."""
    n, w = x.shape
    lp = _level_power(n)
    step = 1 << lp
    mean_b = total / n
    a0, a1, a2, a3 = np.zeros(w), np.zeros(w), np.zeros(w), np.zeros(w)
    if counts.size == 0:
        for i in range(n):
            row = x[i]
            for j in range(w):
                d = np.float64(row[j]) - mean_b[j]
                a0[j] += d * d
            if (i + 1) % step == 0:
                _flush(i + 1, lp, a0, a1, a2, a3)
    else:
        index = np.empty(step * w, offsets.dtype)
        i = 0
        while i < n:
            end = min(i + step, n)
            t = 0
            for r in range(i, end):
                row = x[r]
                for j in range(w):
                    d = np.float64(row[j]) - mean_b[j]
                    a0[j] += d * d
                for j in range(w):
                    index[t + j] = np.int32(np.floor(row[j] / eps)) + offsets[j]
                t += w
            for u in range(t):
                counts[index[u]] += 1
            if end - i == step:
                _flush(end, lp, a0, a1, a2, a3)
            i = end
    m2_b = np.empty(w)
    for j in range(w):
        m2_b[j] = _total(j, a0, a1, a2, a3)
    return mean_b, m2_b


@numba.njit(inline="always")
def _merge(mean_b, m2_b, low, high, mean, m2, low_all, high_all, share_b, weight):
    """Chan et al.'s update of the running ``mean``, ``m2``, ``low_all``, ``high_all`` (in place), as
    :func:`~knockout.stats.running.merge_moments` does it."""
    for j in range(mean_b.size):
        delta = mean_b[j] - mean[j]
        mean[j] = mean[j] + delta * share_b
        m2[j] = (m2[j] + m2_b[j]) + (delta * delta) * weight
        low_all[j] = min(low_all[j], np.float64(low[j]))
        high_all[j] = max(high_all[j], np.float64(high[j]))


@numba.njit(nogil=True, cache=True)
def update(
    x, eps, k_min, k_max, alo, ahi, occ_lo, occ_hi, offsets, counts, mean, m2, low_all, high_all, share_b, weight
):
    """One batch ``x: [n, width]`` (``n >= 1``) into the statistics, in one call where it can be counted as it is.

    The first pass gives ``(total, low, high, bin_lo, bin_hi, verdict)``, returned: each neuron's sum (float64),
    lowest and highest value (x's dtype), their bins (clamped to ``k_min - 1 .. k_max + 1``) and the batch's verdict
    (:data:`INSIDE` ...) against each neuron's stored bins ``alo`` / ``ahi``. Only when it is ``INSIDE`` is anything
    changed: the bins in use ``occ_lo`` / ``occ_hi`` are widened to this batch's, the second pass counts every value
    (see :func:`add_batch`) and the batch is merged into ``mean``, ``m2``, ``low_all``, ``high_all`` (all in place).
    Otherwise the caller grows the stored bins, raises, or counts the values outside the window on the path of the
    other devices, and then calls :func:`add_batch` with the first pass's results."""
    total, low, high, bin_lo, bin_hi, verdict = _first_pass(x, eps, k_min, k_max, alo, ahi)
    if verdict == INSIDE:
        for j in range(total.size):
            occ_lo[j] = min(occ_lo[j], bin_lo[j])
            occ_hi[j] = max(occ_hi[j], bin_hi[j])
        mean_b, m2_b = _second_pass(x, total, eps, offsets, counts)
        _merge(mean_b, m2_b, low, high, mean, m2, low_all, high_all, share_b, weight)
    return total, low, high, bin_lo, bin_hi, verdict


@numba.njit(nogil=True, cache=True)
def add_batch(x, total, eps, offsets, counts, mean, m2, low_all, high_all, low, high, share_b, weight):
    """The second pass over ``x: [n, width]`` after :func:`update`'s first (its ``total``, ``low``, ``high``): each
    neuron's mean ``total / n`` and sum of squared deviations from it (float64, summed as the first pass sums), and,
    unless ``counts`` is empty, one added to ``counts[offsets[j] + floor(x[i, j] / eps)]`` for every value (``eps``
    in x's dtype; ``offsets`` int32 or int64, as every position fits; every position inside ``counts``). Then the
    batch is merged into the running ``mean``, ``m2``, ``low_all``, ``high_all`` (float64, in place) by Chan et
    al.'s update, as :func:`~knockout.stats.running.merge_moments` does it: ``share_b = n_b / n`` and
    ``weight = n_a * n_b / n`` of the counts before (``n_a``) and of the batch (``n_b``), computed by the caller."""
    mean_b, m2_b = _second_pass(x, total, eps, offsets, counts)
    _merge(mean_b, m2_b, low, high, mean, m2, low_all, high_all, share_b, weight)
