"""Centres of a neuron's distribution read from its :class:`~knockout.stats.running.LayerStats`: median, a
bin-width-free mode, the peak at a coarser bin width, point masses, and clipping.

Why: the peak (centre of the most populated ``eps``-bin) depends on ``eps``. With a fine ``eps`` a thin point mass
(e.g. the pre-out at position 0 depends only on the first token, and many documents start with the same one) holds
more values than any bin of the bulk and becomes "the peak" although it is far from where most values are. The
functions here measure the alternatives, all from the stored histogram (no raw activations), vectorised over
neurons, on whatever device the statistics live.

Conventions. ``N = stats.count`` is the number of values per neuron, clipped ones included: ``under`` values lie below
the window's lower edge ``k_min * eps`` and ``over`` values at or above its upper edge ``(k_max + 1) * eps``. Every
function returns a float64 ``[width]`` tensor unless it says otherwise.

Summary of the estimators and their error bounds (``eps`` = stored bin width):

- :func:`quantile` / :func:`median`: interpolation in the bin holding the ``q * N``-th value of *all* values;
  within ``eps`` of the order statistic ``x_(ceil(q N))`` (a theorem, see :func:`quantile`). NaN where it falls
  outside the window.
- :func:`mode`: maximum of a Gaussian kernel density estimate with Silverman's bandwidth ``h`` (>= eps). Within
  about ``eps`` of the same KDE computed on the raw values; within ``|bias| + z * SE`` of the true density mode,
  where ``SE ~ 0.8 h`` for a Gaussian-shaped peak (see :func:`mode`).
- :func:`peak_at`: exactly the peak of the histogram on the global grid ``K * eps_new`` (``eps_new`` rounded to a
  multiple of ``eps``). At the stored ``eps`` it is *the* peak: :meth:`LayerStats.peak` is ``peak_at(stats,
  stats.eps)``.
- :func:`point_mass` / :func:`peak_without_point_masses`: a modal bin that holds more than 5 times its larger
  neighbour (an isolated spike), or whose excess over the bulk predicted from the bins around it is large,
  significant and confined to that bin (a spike on a bulk), is a point mass; no Gaussian of any width is flagged.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import torch

from knockout.errors import KnockoutError
from knockout.stats.running import (  # noqa: F401 - peak_at and snapped_eps are read-outs of this module too
    LayerStats,
    _centre,
    _check_nonempty,
    _empty_fallback,
    _rebin_factor,
    peak_at,
    snapped_eps,
)

log = logging.getLogger(__name__)

#: Silverman's rule of thumb (Silverman 1986, eq. 3.31): h = 0.9 * min(std, IQR / 1.34) * n^(-1/5).
SILVERMAN_FACTOR = 0.9
IQR_TO_STD = 1.34  # the IQR of a normal distribution is 1.34 standard deviations
#: peak_smooth's kernel: SMOOTH_FACTOR times Silverman's bandwidth, at least SMOOTH_MIN_BINS bins
SMOOTH_FACTOR = 0.5
SMOOTH_MIN_BINS = 2.0
#: point-mass test defaults, see :func:`point_mass`
POINT_MASS_RATIO = 5.0
POINT_MASS_MIN_COUNT = 50
POINT_MASS_MIN_SHARE = 1e-4
POINT_MASS_MAX_SHARE = 0.5
#: second point-mass test (a spike on a bulk), see :func:`point_mass`
BULK_WINDOW = 5
BULK_MIN_COUNT = 5
BULK_EXCESS = 0.5
BULK_Z = 5.0
BULK_CONCENTRATION = 3.0


def _bin_centres(stats: LayerStats, j: torch.Tensor) -> torch.Tensor:
    """Centre of stored column ``j`` (any shape, int64) as float64."""
    return _centre(j + stats.k_lo, stats.eps)


# -- quantiles ------------------------------------------------------------------------------------------------
def _quantile(stats: LayerStats, q: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(value, below, above): the interpolated quantile and whether it lies below / above the window."""
    _check_nonempty(stats)
    if not 0 < q < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {q!r}")
    hist, under = stats.hist, stats.under
    n_total = torch.full((stats.width,), float(stats.count), dtype=torch.float64, device=hist.device)
    t = q * n_total  # [width] rank of the wanted value among all N values (1-based, fractional)
    below = under.double() >= t
    above = (under + hist.sum(1)).double() < t
    if stats.n_bins == 0:
        return torch.full_like(t, math.nan), below, above
    cum = under[:, None].double() + hist.cumsum(1).double()  # [width, n_bins] values <= each bin's upper edge
    j = torch.searchsorted(cum, t[:, None], side="left").squeeze(1).clamp(max=stats.n_bins - 1)  # C_{j-1} < t <= C_j
    cum_prev = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)[:, None]).squeeze(1), under.double())
    in_bin = hist.gather(1, j[:, None]).squeeze(1).double()
    frac = ((t - cum_prev) / in_bin.clamp(min=1)).clamp(0, 1)
    value = ((j + stats.k_lo).double() + frac) * stats.eps
    value[below | above] = math.nan
    return value, below, above


def quantile(stats: LayerStats, q: float) -> torch.Tensor:
    """``[width]`` ``q``-quantile of *all* values of each neuron (clipped ones included), from the histogram.

    Definition: with ``N`` values, ``t = q * N`` and ``C_j`` the number of values below the upper edge of stored bin
    ``j`` (``under`` included), the bin ``j`` with ``C_{j-1} < t <= C_j`` is located and the value is interpolated
    linearly inside it: ``lo_j + eps * (t - C_{j-1}) / count_j`` (exact if values are uniform within the bin).

    Error bound (a theorem, not an asymptotic): the order statistic ``x_(ceil(t))`` (1-based) lies in the located bin,
    because ``C_{j-1} < t`` and ``C_j >= t`` are integers bracketing ``ceil(t)``; the estimate lies in the same closed
    bin, so ``|quantile - x_(ceil(q N))| <= eps``. (``numpy.percentile`` uses ``x_((N-1) q + 1)``, the same order
    statistic when ``(N - 1) q`` is an integer, e.g. odd N for the median.)

    Where the ``q * N``-th value is clipped (below or above the window) the quantile is not known: it is NaN and a
    warning names the number of such neurons.
    """
    value, below, above = _quantile(stats, q)
    if below.any() or above.any():
        log.warning(
            "%d neurons have their %g-quantile below the histogram window and %d above it (beyond ±%g); "
            "returning NaN for them: raise --hist-limit",
            int(below.sum()),
            q,
            int(above.sum()),
            stats.limit,
        )
    return value


def median(stats: LayerStats) -> torch.Tensor:
    """``[width]`` median of all values (clipped ones included): :func:`quantile` at 0.5.

    ``|median - x_(ceil(N/2))| <= eps``: within ``eps`` of ``numpy.median`` for odd ``N``; for even ``N`` within
    ``eps`` of the lower of the two middle values (numpy averages the two). NaN (with a warning) where the median is
    outside the window, i.e. at least half the values are clipped on one side.
    """
    return quantile(stats, 0.5)


def iqr(stats: LayerStats) -> torch.Tensor:
    """``[width]`` interquartile range ``Q(0.75) - Q(0.25)`` from :func:`quantile`; each quartile within ``eps`` of
    its order statistic, so the IQR is within ``2 eps``. NaN where a quartile is outside the window."""
    return quantile(stats, 0.75) - quantile(stats, 0.25)


# -- bin widths -------------------------------------------------------------------------------------------------
def fd_eps(stats: LayerStats) -> torch.Tensor:
    """``[width]`` Freedman–Diaconis bin width ``2 * IQR * N^(-1/3)`` per neuron (as ``numpy``'s ``bins="fd"``).

    The IQR comes from histogram quantiles (within ``2 eps`` of the sample IQR), so the result is within
    ``4 * eps * N^(-1/3)`` of the rule applied to the raw values. NaN where a quartile is clipped. The FD width
    minimises the integrated squared error of a histogram *density* estimate; use it with :func:`peak_at` for a peak
    whose bins are wide enough to be estimated from ``N`` values.
    """
    return 2.0 * iqr(stats) * float(stats.count) ** (-1.0 / 3.0)


def relative_eps(stats: LayerStats, eps_rel: float, spread: str = "std") -> torch.Tensor:
    """``[width]`` bin width relative to each neuron's spread: ``eps_rel * std`` (``spread="std"``, exact) or
    ``eps_rel * IQR / 1.34`` (``spread="iqr"``, robust to heavy tails; 1.34 makes it equal std for a normal)."""
    if not (math.isfinite(eps_rel) and eps_rel > 0):
        raise KnockoutError(f"eps_rel must be a positive number, got {eps_rel!r}")
    if spread == "std":
        return eps_rel * stats.std
    if spread == "iqr":
        return eps_rel * iqr(stats) / IQR_TO_STD
    raise KnockoutError(f"spread must be 'std' or 'iqr', got {spread!r}")


def kde_bandwidth(stats: LayerStats) -> torch.Tensor:
    """``[width]`` Silverman's rule-of-thumb bandwidth ``h = 0.9 * min(std, IQR / 1.34) * N^(-1/5)``, at least ``eps``.

    ``std`` is exact (all values); the IQR comes from :func:`quantile` (within ``2 eps``). Where the IQR is unknown
    (a quartile clipped) ``std`` alone is used. The floor ``eps`` keeps the kernel wider than the binning, so the
    binned KDE is smooth on the bin grid. Silverman's ``h`` is near-optimal for estimating a Gaussian-like density;
    taking the smaller of std and IQR/1.34 avoids oversmoothing skewed, heavy-tailed or bimodal neurons.
    """
    return _silverman(stats).clamp(min=stats.eps)


def _silverman(stats: LayerStats, factor: float = 1.0) -> torch.Tensor:
    """``[width]`` ``factor`` times Silverman's ``0.9 * min(std, IQR / 1.34) * N^(-1/5)`` (no floor)."""
    _check_nonempty(stats)
    spread = torch.fmin(stats.std, _iqr_quiet(stats) / IQR_TO_STD)
    return factor * SILVERMAN_FACTOR * spread * float(stats.count) ** -0.2


def _iqr_quiet(stats: LayerStats) -> torch.Tensor:
    return _quantile(stats, 0.75)[0] - _quantile(stats, 0.25)[0]


#: Where :func:`kde` cuts its Gaussian kernel, in standard deviations: exp(-12^2 / 2) ~ 5e-32.
KERNEL_SIGMAS = 12.0


def _fft_length(n: int) -> int:
    """The smallest ``2^k`` or ``3 * 2^k`` at least ``n`` (both fast FFT sizes)."""
    pow2 = 1 << max(1, (n - 1).bit_length())
    return 3 * pow2 // 4 if 3 * pow2 // 4 >= n else pow2


def kde(stats: LayerStats, bandwidth: torch.Tensor | float | None = None, chunk: int = 256) -> torch.Tensor:
    """``[width, n_bins]`` Gaussian kernel density estimate of each neuron's in-window values at the stored bin
    centres (per unit of activation, integrating to ~1 over the window).

    Binned KDE (Wand 1994): each value is placed at its bin centre,
    ``f(c_i) = sum_j count_j * phi((i - j) / s) / (n_in * h)`` with ``s = h / eps`` bins and ``n_in`` the in-window
    count. Moving a value by at most ``eps / 2`` changes the estimate by ``O((eps / h)^2)`` relative when the density
    is smooth on the scale ``eps`` (first-order errors cancel within a bin). The convolution is done by FFT with a
    per-neuron kernel cut at ``KERNEL_SIGMAS`` standard deviations (where it is below ``1e-31`` of its centre: beyond
    float64 precision) over ``L >= n_bins + reach`` points, ``reach`` the cut in bins, so the circular convolution
    equals the linear one on the stored bins. Neurons are processed in chunks of ``chunk`` rows to bound memory.
    ``bandwidth`` defaults to :func:`kde_bandwidth`.
    """
    _check_nonempty(stats)
    device = stats.hist.device
    h = kde_bandwidth(stats) if bandwidth is None else torch.as_tensor(bandwidth, dtype=torch.float64, device=device)
    h = h.expand(stats.width)
    n_bins = stats.n_bins
    if n_bins == 0:
        return torch.zeros(stats.width, 0, dtype=torch.float64, device=device)
    n_in = stats.hist.sum(1).double()
    out = torch.empty(stats.width, n_bins, dtype=torch.float64, device=device)
    for lo in range(0, stats.width, chunk):
        hi = min(lo + chunk, stats.width)
        s = (h[lo:hi] / stats.eps)[:, None]
        widest = float(s.max())
        reach = min(n_bins - 1, math.ceil(KERNEL_SIGMAS * widest)) if math.isfinite(widest) else n_bins - 1
        length = _fft_length(n_bins + reach)
        d = torch.arange(length, device=device, dtype=torch.float64)
        d = torch.minimum(d, length - d)  # circular distance in bins
        kernel = torch.exp(-0.5 * (d / s) ** 2) / (math.sqrt(2 * math.pi) * h[lo:hi, None])  # [chunk, length]
        kernel = kernel.masked_fill_(d > reach, 0.0)
        spec = torch.fft.rfft(stats.hist[lo:hi].double(), n=length) * torch.fft.rfft(kernel, n=length)
        out[lo:hi] = torch.fft.irfft(spec, n=length)[:, :n_bins] / n_in[lo:hi, None]
    return out


def _refined_argmax(stats: LayerStats, dens: torch.Tensor) -> torch.Tensor:
    """``[width]`` location of the maximum of ``dens: [width, n_bins]`` (a smooth curve at the stored bin centres):
    the best centre (the lowest on exact ties, as ``argmax``), moved by the vertex of the parabola through ``log dens``
    at it and its two neighbours (exact for a Gaussian-shaped peak; at most half a bin). Continuous in the curve:
    where the maximum passes from one bin to the next, both give the midpoint between them."""
    j = dens.argmax(1)
    logd = torch.nn.functional.pad(dens.clamp(min=1e-300).log(), (1, 1))  # [width, n_bins + 2]
    l_left, l_mid, l_right = (logd.gather(1, (j + o)[:, None]).squeeze(1) for o in (0, 1, 2))
    curv = l_left - 2 * l_mid + l_right
    inner = (j > 0) & (j < stats.n_bins - 1) & (curv < 0)
    shift = torch.where(inner, 0.5 * (l_left - l_right) / torch.where(inner, curv, -1.0), 0.0).clamp(-0.5, 0.5)
    return _bin_centres(stats, j) + shift * stats.eps


def mode(stats: LayerStats, bandwidth: torch.Tensor | float | None = None) -> torch.Tensor:
    """``[width]`` bin-width-free mode: the maximum of the Gaussian KDE (:func:`kde`, Silverman's bandwidth ``h``).

    The KDE is evaluated at the bin centres; the location is refined by fitting a parabola to ``log f`` at the best
    centre and its two neighbours (exact for a Gaussian-shaped peak; the shift is clamped to half a bin).

    Why a KDE and not the half-sample mode: the half-sample mode keeps halving to ever shorter intervals and ends at
    the densest point at the finest scale, so a thin point mass captures it just as it captures the fine peak. A
    kernel of width ``h`` spreads a point mass of share ``p`` to a bump of height ``p / (2.5 h)``, so the mass has to
    exceed about ``h`` times the bulk's density to win, instead of ``eps`` times it for the fine peak.

    Error bounds, for a smooth density ``f`` with mode ``m`` (Parzen 1962; Romano 1988):

    - against the true mode: bias ``-h^2 f'''(m) / (2 f''(m))`` (zero for a symmetric peak; towards the long tail
      of a skewed one) and standard error ``SE = sqrt(f(m) R(K') / (N h^3 f''(m)^2))`` with
      ``R(K') = 1 / (4 sqrt(pi))``.
      For a Gaussian of std ``sigma`` and Silverman's ``h`` this is ``SE ~ 0.77 h`` (``~ 0.7 sigma N^(-1/5)``): a mode
      is intrinsically much noisier than a mean. The tests allow ``|bias| + 4 SE + eps``.
    - against the maximum of the same-bandwidth KDE computed on the raw values: within ``eps`` when ``h >= eps``
      (binning moves each value by at most ``eps / 2``, grid and parabolic refinement add well under ``eps / 2``).
      Not a theorem: the maximum of a nearly flat-topped KDE (e.g. a uniform distribution) is ill-conditioned.

    Neurons with no value inside the window get NaN (with a warning).
    """
    dens = kde(stats, bandwidth)
    if stats.n_bins == 0:
        log.warning("no value fell inside ±%g; the mode is NaN", stats.limit)
        return torch.full((stats.width,), math.nan, dtype=torch.float64, device=stats.hist.device)
    result = _refined_argmax(stats, dens)
    empty = stats.hist.sum(1) == 0
    if empty.any():
        log.warning("%d neurons have every value outside ±%g; their mode is NaN", int(empty.sum()), stats.limit)
        result[empty] = math.nan
    return result


def smooth_bandwidth(stats: LayerStats) -> torch.Tensor:
    """``[width]`` the kernel width of :func:`peak_smooth`: half of Silverman's ``0.9 * min(std, IQR / 1.34) *
    N^(-1/5)``, at least ``SMOOTH_MIN_BINS * eps`` (2 eps)."""
    return _silverman(stats, SMOOTH_FACTOR).clamp(min=SMOOTH_MIN_BINS * stats.eps)


def peak_smooth(stats: LayerStats) -> torch.Tensor:
    """``[width]`` a peak that rounding cannot move: the maximum of the histogram lightly smoothed with a Gaussian
    kernel of width :func:`smooth_bandwidth`, refined to sub-bin precision by the parabola through the log of the
    three smoothed values around it (:func:`mode` with that kernel).

    Why: the peak (:meth:`LayerStats.peak`) is the argmax of raw counts, so two bins far apart that hold nearly the
    same count (within counting noise) decide it by a single value, and moving one value across a bin edge (a
    rounding difference of 1e-7 in the activations) can move the peak by a tenth of a std or more. Here moving one
    value by a bin changes the smoothed curve by a term of order ``1 / (N h)`` and its maximum continuously, except
    at exact ties between separated maxima of the smoothed curve.

    The bandwidth: Silverman's ``h`` (the :func:`mode`'s) is tuned to estimate the whole density; half of it keeps
    the smoothed curve close to the histogram, so the result stays a peak (near the modal bin where that bin clearly
    leads) rather than the centre of a broad mode, while still averaging over the bins within counting noise of the
    modal one. The floor of 2 bins keeps the kernel wide against the binning (each value sits at its bin's centre,
    up to ``eps / 2`` away: a variance of ``eps^2 / 12`` against ``h^2 >= 4 eps^2``) and the curve smooth over the
    three points of the parabola. Neurons with no value inside the window get NaN (with a warning), as :func:`mode`.
    """
    return mode(stats, smooth_bandwidth(stats))


# -- point masses -----------------------------------------------------------------------------------------------
def _bulk_design(window: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Offsets ``d`` (2..window on both sides of the modal bin), the ``[3, len(d)]`` least-squares weights that
    predict a parabola's value at offsets -1, 0, +1 from its values at ``d``, and the sum of squared weights of the
    centre prediction (its variance factor for independent noise of equal variance)."""
    d = torch.tensor([*range(-window, -1), *range(2, window + 1)], dtype=torch.float64)
    design = torch.stack([torch.ones_like(d), d, d * d], 1)
    at = torch.tensor([[1.0, -1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    weights = at @ torch.linalg.pinv(design)
    return d.long().to(device), weights.to(dtype=dtype, device=device), float((weights[1] ** 2).sum())


def _point_mass_test(
    hist: torch.Tensor, n: int, ratio: float, min_count: float, min_share: float, max_share: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(modal column, is-point-mass, count the bulk alone would put in the modal bin), each ``[width]``, for a
    float ``[width, n_bins]`` histogram. See :func:`point_mass` for the two tests."""
    j = hist.argmax(1)
    padded = torch.nn.functional.pad(hist, (1, 1))  # bins beyond the stored ones are empty
    left, centre, right = (padded.gather(1, (j + o)[:, None]).squeeze(1) for o in (0, 1, 2))
    share = (centre >= min_share * n) & (centre < max_share * n)
    isolated = (centre > ratio * torch.maximum(left, right)) & (centre >= min_count)
    # spike on a bulk: the bulk under bins -1, 0, +1 predicted from bins 2..W away (log-parabola: exact for a Gaussian)
    w = BULK_WINDOW
    d, weights, var_factor = _bulk_design(w, hist.dtype, hist.device)
    wide = torch.nn.functional.pad(hist, (w, w))
    around = wide.gather(1, j[:, None] + w + d[None, :])  # [width, 2 (W - 1)]
    near = wide.gather(1, j[:, None] + w + torch.arange(-1, 2, device=hist.device)[None, :])  # [width, 3]
    in_bulk = (around >= BULK_MIN_COUNT).all(1)
    bulk = torch.exp(around.clamp(min=1).log() @ weights.T)  # [width, 3] predicted counts at -1, 0, +1
    excess = near - bulk
    on_bulk = (
        in_bulk
        & (excess[:, 1] > BULK_EXCESS * bulk[:, 1])
        & (excess[:, 1] > BULK_Z * torch.sqrt(bulk[:, 1] * (1 + var_factor)))
        & (excess[:, 1] > BULK_CONCENTRATION * excess[:, [0, 2]].clamp(min=0).amax(1))
    )
    flagged = share & (isolated | on_bulk)
    fill = torch.where(isolated, 0.5 * (left + right), torch.minimum(bulk[:, 1], centre))
    return j, flagged, fill


def point_mass(
    stats: LayerStats,
    ratio: float = POINT_MASS_RATIO,
    min_count: int = POINT_MASS_MIN_COUNT,
    min_share: float = POINT_MASS_MIN_SHARE,
    max_share: float = POINT_MASS_MAX_SHARE,
) -> torch.Tensor:
    """``[width]`` bool: whether the neuron's modal bin (the one ``peak()`` picks) is a point mass rather than the
    top of a bulk.

    Definition: with ``c`` the modal bin's count and ``N`` all values, a point mass holds ``min_share * N <= c <
    max_share * N`` and passes one of two tests:

    1. **Isolated spike**: ``c > ratio * max(a, b)`` (``a, b`` its two neighbours' counts, 0 beyond the stored
       bins) and ``c >= min_count``.
    2. **Spike on a bulk** (e.g. the first token's value on top of the neuron's distribution: a spike whose bins
       either side hold the bulk, so test 1 cannot see it): the bulk's counts at offsets -1, 0, +1 from the modal
       bin are predicted by a least-squares parabola in log-count through the bins 2..``BULK_WINDOW`` away on both
       sides (all of which must hold at least ``BULK_MIN_COUNT`` values). With ``e0, e-1, e+1`` the observed minus
       predicted counts, the bin is a point mass when ``e0 > BULK_EXCESS * predicted`` (the spike adds at least
       half the bulk there), ``e0 > BULK_Z * sqrt(predicted * (1 + sum of squared weights))`` (5 Poisson standard
       deviations of the observed count and the prediction: not noise, over many neurons), and ``e0 >
       BULK_CONCENTRATION * max(e-1, e+1, 0)`` (the excess sits in one bin: a narrow core spread over neighbouring
       bins, such as a sharp Laplace or a std-0.01 component on a wide one, is a peak, not a point mass).

    Why each condition:

    - ``ratio`` (5): a smooth bulk changes little from one bin to the next. For a Gaussian of any std and offset
      whose top bin holds under half the values, that bin holds at most 2.18 times its larger neighbour (the worst
      case is std = 0.74 eps, centred in a bin); so no Gaussian is flagged by test 1, however narrow. Test 2's
      parabola is exact for a Gaussian's log-density, and its excess must be concentrated in the one bin.
    - ``min_count`` (50): the statistical guard of test 1. Where bins hold few values the modal bin is the luckiest
      of many noisy counts; 50 values against a neighbour of at most 10 is not a Poisson fluctuation.
    - ``min_share`` (1e-4): ignore masses too small to matter (the share is of all values).
    - ``max_share`` (0.5): a bin holding at least half the values holds the median; it *is* the bulk at this
      resolution (e.g. a near-constant neuron), and removing it would leave only tails.

    Measured on SmolLM2-135M (Wikipedia, eps 0.01, 17,280 neurons): test 1 alone flags 0-7 neurons; with test 2,
    2.8% (4,096 tokens) and 4.4% (8,192 tokens) when position 0 is counted, 0.49% (8,192) and 0.47% (16,384) with
    ``--stats-skip-first 1``: most point masses are first-token values. Limitation: a spike split across a bin edge
    (values jittered by float noise) counts as two bins and is not flagged.
    """
    _check_nonempty(stats)
    if stats.n_bins == 0:
        return torch.zeros(stats.width, dtype=torch.bool, device=stats.hist.device)
    return _point_mass_test(stats.hist.double(), stats.count, ratio, min_count, min_share, max_share)[1]


def peak_without_point_masses(
    stats: LayerStats,
    ratio: float = POINT_MASS_RATIO,
    min_count: int = POINT_MASS_MIN_COUNT,
    min_share: float = POINT_MASS_MIN_SHARE,
    max_share: float = POINT_MASS_MAX_SHARE,
    max_iter: int = 100,
) -> torch.Tensor:
    """``[width]`` peak after removing point masses: the centre of the modal bin once no modal bin is a point mass.

    Definition: start from the stored counts. While the modal bin (lowest on ties) passes the :func:`point_mass`
    test, replace its count by the bulk's estimate under the spike (the mean of its two neighbours for an isolated
    spike, the parabola's prediction for a spike on a bulk) and take the modal bin again. A replaced bin is at most
    its larger neighbour, or has no excess over the bulk, so it is never flagged twice and the loop ends; each
    round is vectorised over neurons and at most ``max_iter`` rounds are run (a warning if neurons still have a
    point mass then). Without point masses this equals ``stats.peak()``; neurons with no value
    in the window get their mean.
    """
    _check_nonempty(stats)
    if stats.n_bins == 0:
        log.warning("no value fell inside ±%g; using the mean as the peak", stats.limit)
        return stats.mean.clone()
    hist = stats.hist.double()
    rows = torch.arange(stats.width, device=hist.device)
    for _ in range(max_iter):
        j, flagged, fill = _point_mass_test(hist, stats.count, ratio, min_count, min_share, max_share)
        if not flagged.any():
            break
        hist[rows[flagged], j[flagged]] = fill[flagged]
    else:
        j, flagged, _ = _point_mass_test(hist, stats.count, ratio, min_count, min_share, max_share)
        if flagged.any():
            log.warning("%d neurons still have a point mass after %d removals", int(flagged.sum()), max_iter)
    return _empty_fallback(stats, _bin_centres(stats, j), stats.hist.sum(1) == 0)


# -- clipping -------------------------------------------------------------------------------------------------
def clipped(stats: LayerStats) -> torch.Tensor:
    """``[width]`` fraction of each neuron's values outside the window (``under + over``) / N; the histogram, the
    peak, the mode and :func:`peak_at` leave them out; :func:`quantile` counts them."""
    return (stats.under + stats.over).double() / max(stats.count, 1)


def clipped_neurons(stats: LayerStats, threshold: float = 1e-3) -> list[int]:
    """Indices of neurons with more than ``threshold`` of their values clipped (default 0.1%, the level at which
    collection warns for a layer)."""
    return torch.nonzero(clipped(stats) > threshold).flatten().tolist()


# -- how well the centres are determined ------------------------------------------------------------------------
#: The centres a collection computes on each of its two halves (:func:`knockout.stats.collect_stats`).
HALF_CENTRES = ("mean", "median", "peak", "mode", "peak-smooth")


@contextmanager
def _quiet():
    """Silence this module's warnings (the centres of a half warn about what the whole will warn about once)."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def centre_values(stats: LayerStats, names: tuple[str, ...] = HALF_CENTRES) -> dict[str, torch.Tensor]:
    """``{name: [width] float64}`` the centres ``names`` (of :data:`HALF_CENTRES`) of every neuron, computed as the
    methods of those names compute them, without warnings; all NaN for empty statistics."""
    if stats.count == 0:
        nan = torch.full((stats.width,), math.nan, dtype=torch.float64, device=stats.hist.device)
        return {name: nan.clone() for name in names}
    stats.finish()
    funcs = {
        "mean": lambda s: s.mean.clone(),
        "median": lambda s: _quantile(s, 0.5)[0],
        "peak": lambda s: peak_at(s, s.eps),
        "mode": mode,
        "peak-smooth": peak_smooth,
    }
    unknown = [n for n in names if n not in funcs]
    if unknown:
        raise KnockoutError(f"unknown centre(s) {unknown}; known: {', '.join(funcs)}")
    try:
        with _quiet():
            return {name: funcs[name](stats).double() for name in names}
    finally:
        release = getattr(stats, "release", None)
        if release is not None:
            release()  # the table the read-outs made


def half_se(half_a: torch.Tensor, half_b: torch.Tensor, n_a: int, n_b: int) -> torch.Tensor:
    """``[width]`` the standard error of a centre over all ``n_a + n_b`` values, estimated from its values on two
    disjoint halves: ``|A - B| * sqrt(n_a n_b) / (n_a + n_b)`` (``|A - B| / 2`` for equal halves).

    An approximation: it assumes the centre's error falls as ``1 / sqrt(N)`` (as a mean's or a median's; a mode
    converges more slowly, so this understates its error) and that the two halves are independent samples; and it is
    one draw per neuron (``|A - B|`` is the absolute value of a difference of mean 0), right on average over neurons
    (its mean square is the variance), not neuron by neuron. NaN where a half has no value."""
    n = n_a + n_b
    if n_a == 0 or n_b == 0:
        return torch.full_like(half_a, math.nan)
    return (half_a - half_b).abs() * (math.sqrt(n_a * n_b) / n)


#: How well a centre must be determined: its standard error at most this many of the neuron's standard deviations.
DETERMINED_STD = 0.1
#: A method's centres are noise-limited when the median over neurons of SE(centre) / |centre - mean| exceeds this.
NOISE_RATIO = 0.5


def determination(
    halves: list[torch.Tensor],
    n_a: int,
    n_b: int,
    means: list[torch.Tensor],
    stds: list[torch.Tensor],
    tol: float = DETERMINED_STD,
    name: str = "",
) -> dict:
    """How well one centre is determined over all neurons, from its values on the two halves of the collection
    (``halves``: per layer ``[2, width]``) and each neuron's mean and std over the whole (per layer ``[width]``).

    Returns ``neurons``; ``undefined`` (neurons without a value on a half); ``undetermined`` (neurons whose standard
    error, :func:`half_se`, exceeds ``tol`` times their std) and ``share`` (of the defined neurons); ``ratio``, the
    median over neurons of ``SE / |centre - mean|`` with the centre taken as the token-weighted mean of the two
    halves' values (neurons whose centre equals their mean left out; ``None`` when none is left, and for ``name``
    ``"mean"``, whose distance from itself is rounding); and ``tokens``, the collection's ``n_a + n_b`` tokens."""
    se = torch.cat([half_se(h[0].double(), h[1].double(), n_a, n_b) for h in halves])
    w_a = n_a / max(n_a + n_b, 1)
    centre = torch.cat([w_a * h[0].double() + (1 - w_a) * h[1].double() for h in halves])
    mean = torch.cat([m.double().to(se.device) for m in means])
    std = torch.cat([s.double().to(se.device) for s in stds])
    defined = torch.isfinite(se)
    undetermined = defined & (se > tol * std)
    gap = (centre - mean).abs()
    away = defined & (gap > 0)
    # the median as numpy takes it (the mean of the two middle values of an even count)
    ratio = float(torch.quantile(se[away] / gap[away], 0.5)) if bool(away.any()) and name != "mean" else None
    n_defined = int(defined.sum())
    return {
        "neurons": se.numel(),
        "undefined": se.numel() - n_defined,
        "undetermined": int(undetermined.sum()),
        "share": int(undetermined.sum()) / n_defined if n_defined else math.nan,
        "ratio": ratio,
        "tokens": n_a + n_b,
    }


def tokens_needed(tokens: int, ratio: float | None, target: float = NOISE_RATIO) -> int | None:
    """Collection tokens at which a centre's ``ratio`` (:func:`determination`) would fall to ``target``, by the
    ``1 / sqrt(N)`` scaling of its standard error: ``N * (ratio / target)^2``; ``None`` when it is there already.
    An estimate: modes converge more slowly than ``1 / sqrt(N)``, and the distances themselves shrink as noise
    leaves them."""
    if ratio is None or not ratio > target:
        return None
    return math.ceil(tokens * (ratio / target) ** 2)
