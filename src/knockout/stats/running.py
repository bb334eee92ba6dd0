"""Streaming, mergeable per-neuron statistics: count, mean, variance, min, max and an eps-histogram (-> peak).

Nothing here keeps raw activations: memory depends on the number of neurons and on the range each neuron's values
reach, never on the number of tokens.

Histogram grid
--------------
Bin ``k`` (an integer) covers ``[k * eps, (k + 1) * eps)``. The grid is the same for every neuron, every layer and
every run with the same ``eps``, so two histograms are merged by aligning their integer bin indices and adding. The
bins never extend past the window ``[-limit, limit)``; values outside it are counted per neuron in ``under`` /
``over`` and left out of the peak. Because the window is fixed up front (not taken from the first batch) the result
does not depend on the order of the data: statistics over any split of the data, merged, equal one pass over all of
it.

Histogram layout
----------------
Each neuron stores only its own bins, from the lowest to the highest of its values inside the window, in one flat
buffer per layer (``counts``: neuron ``j``'s bins one after the other from its first bin): so the memory
follows each neuron's own range, and one neuron with a wide range (a "massive activation") does not widen the
others. While collecting, a neuron whose values leave its stored bins gets them widened to cover them plus a quarter
of their width (at least :data:`SPARE_BINS` bins) on each side, so that a range that widens batch after batch is
moved rarely; :meth:`LayerStats.finish` (the end of a collection), merging and saving keep exactly the bins in use.
The statistics file stores the same (``hist`` the flat counts, ``hist_lo`` and ``hist_bins`` each neuron's first bin
and number of bins). :attr:`LayerStats.hist` gives the counts as a ``[width, n_bins]`` table over the layer's bins
in use (zero outside each neuron's own), made when read, for the read-outs of :mod:`knockout.stats.centres`.

Defaults: ``eps = 0.01`` and ``limit = "auto"``: the widest window whose histograms fit the memory caps
(:func:`auto_limit`, from the layers' widths and eps only, never from the data; ±310.68 for SmolLM2-135M). A number
gives a fixed window. The clipped counts are stored, and a warning names layers where more than 0.1% of values were
clipped and the neurons concerned. Override with ``--eps`` / ``--hist-limit``. The pair is a :class:`HistGrid`,
checked when it is made (:meth:`HistGrid.of` resolves ``auto``).

The peak of a neuron is the centre ``(k + 0.5) * eps`` of its most populated bin (the lowest such bin on ties, as
``numpy.argmax``), computed by :func:`peak_at`. Mean and variance: each batch's in float64
(two passes), merged with Chan et al.'s pairwise update.

Device and precision
--------------------
The statistics live on the device of the activations they are given (the model's; each layer on its own device
when a model is split over devices) and are kept in float64 (moments, min, max) and int64 (counts; int32 once the
CPU's compiled passes add to them, while no bin can reach 2**31: half the memory; int64 in files and in
:attr:`LayerStats.hist`), also for float16/bfloat16 models, whose activations are widened to float32 first (exactly).

On a CPU, :meth:`LayerStats.add` is two compiled passes over the batch (:mod:`knockout.stats.kernels`): the first
finds each neuron's sum, lowest and highest value and whether the batch is finite, inside the window and inside each
neuron's stored bins; only then does anything change (the stored bins grow where needed), and the second adds the
squared deviations, counts every value into its neuron's stored bins and merges the moments. A batch with values
outside the window counts those in ``under`` / ``over`` on the path of the other devices. Either way the cost follows
the batch's tokens, not the width of the histogram: no table over the layer's range is made per batch. Elsewhere
``add`` is a few vectorised torch operations: per-neuron minimum and maximum, the moments (a float64 copy, its sum,
the squared deviations and their sum), and the bins turned into flat (int32 where they fit) indices into the stored
bins, added there with ``index_add_``. On an accelerator (``sync_free``, the default off the
CPU) it reads nothing back: where a buffer over the whole window (8 bytes per bin and neuron) takes at most
:data:`BUFFER_MAX_BYTES`, it counts into it, and :meth:`LayerStats.finish`, called once at the end of a collection,
raises if any batch held NaN/inf and stores each neuron's bins in use, bit for bit what counting with reads stores. A
larger one (``auto``, usually) counts each batch one call late: its lowest and highest values, and each neuron's,
travel to the host asynchronously while the next batch runs, and are read then (:meth:`LayerStats.finish` counts the
last). :func:`knockout.stats.collect_stats` selects the non-padding positions with an index found on the host before
the batch moves to the device, so a collection on an accelerator waits for the device only at its end (and, counting
late, rarely: the values read were sent a batch ago).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from knockout.errors import KnockoutError

log = logging.getLogger(__name__)

DEFAULT_EPS = 0.01
AUTO = "auto"
DEFAULT_LIMIT = AUTO
"""The default window: ``auto``, the widest whose histograms fit the memory caps (:func:`auto_limit`)."""
FIXED_LIMIT = 20.0
"""The half-width of a :class:`HistGrid` made without one."""


NONFINITE = (
    "non-finite (NaN/inf) pre-out activations: the model overflowed or its weights are broken; "
    "try --dtype float32 and check that the model produces finite logits"
)

MAX_BINS_PER_NEURON = 1_000_000
"""Most histogram bins one neuron may need (8 MB of int64 counts): ``2 * limit / eps`` above this is refused."""
MAX_HIST_BYTES = 16 * 2**30
"""Most memory all neurons' histograms may need at their widest (every bin of the window in use), the two halves of
a collection (:func:`knockout.stats.collect_stats`) counted."""
HALVES = 2
"""How many histograms per neuron a collection holds: its two halves (the total is their merge, made at the end)."""
SPARE_BINS = 16
"""Fewest bins a neuron's stored range is widened by on a side when its values leave it (see
:meth:`LayerStats._note_bins`); the spare bins are dropped when a collection ends (:meth:`LayerStats.finish`)."""
BUFFER_MAX_BYTES = 32 * 2**20
"""Largest whole-window buffer (per layer, and per half of a collection) that sync-free counting makes; a layer whose
buffer would be larger counts each batch one batch late instead, with memory only for the bins in use."""
_NO_OFFSETS, _NO_COUNTS = np.zeros(0, np.int32), np.zeros(0, np.int64)  # kernels.add_batch without counting


def auto_limit(widths: list[int], eps: float, copies: int = HALVES) -> float:
    """The window half-width of ``--hist-limit auto``: the widest ``n * eps`` whose histograms fit both caps at their
    widest: ``2 n <= MAX_BINS_PER_NEURON`` and ``copies * 8 * 2 n * sum(widths) <= MAX_HIST_BYTES``. It depends on
    the model's widths and ``eps`` only, never on the data, so statistics collected in any order or split merge
    exactly."""
    check_hist_params(eps, AUTO)
    bins = min(MAX_BINS_PER_NEURON, MAX_HIST_BYTES // (8 * copies * max(sum(widths), 1)))
    return max(bins // 2, 1) * float(eps)


def resolve_limit(limit: float | str, widths: list[int], eps: float) -> float:
    """``limit`` as a number: itself, or :func:`auto_limit` of ``widths`` for ``"auto"``."""
    if limit == AUTO:
        return auto_limit(widths, eps)
    return limit


def check_hist_params(eps: float, limit: float | str) -> None:
    """Raise a clear error for an eps or limit that cannot define a histogram grid, or that needs more than
    :data:`MAX_BINS_PER_NEURON` bins per neuron (checked before a model is loaded). ``limit`` may be ``"auto"``."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise KnockoutError(f"eps must be a positive number (a bin width such as 0.01), got {eps!r}")
    if limit == AUTO:
        return
    if isinstance(limit, str):
        raise KnockoutError(f"hist limit must be 'auto' or a number, got {limit!r}")
    if not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit >= eps):
        raise KnockoutError(f"hist limit must be a finite number >= eps ({eps}), got {limit!r}")
    bins = 2 * limit / eps
    if bins > MAX_BINS_PER_NEURON:
        raise KnockoutError(
            f"--eps {eps:g} with --hist-limit {limit:g} needs {bins:,.0f} histogram bins per neuron "
            f"({size_text(8 * bins)} per neuron); at most {MAX_BINS_PER_NEURON:,} are allowed: raise --eps to at least "
            f"{2 * limit / MAX_BINS_PER_NEURON:g} or lower --hist-limit"
        )


def hist_memory_bound(widths: list[int], eps: float, limit: float | str, copies: int = HALVES) -> int:
    """Bytes the histograms of neurons of ``widths`` (one entry per layer) may need at their widest: 8 bytes per
    bin, ``2 * limit / eps`` bins per neuron, ``copies`` histograms per neuron (a collection's two halves)."""
    limit = resolve_limit(limit, widths, eps)
    return copies * 8 * sum(widths) * math.ceil(2 * limit / eps - 1e-9)


def check_hist_memory(widths: list[int], eps: float, limit: float | str, cap: int | None = None) -> None:
    """Raise if the histograms of a collection over neurons of ``widths`` could need more than ``cap`` bytes
    (default :data:`MAX_HIST_BYTES`): :func:`hist_memory_bound`, which counts the collection's two halves. The
    ``auto`` window fits by construction."""
    cap = MAX_HIST_BYTES if cap is None else cap
    need = hist_memory_bound(widths, eps, limit)
    if need > cap:
        window = _limit_text(limit, widths, eps)
        raise KnockoutError(
            f"the histograms of {sum(widths):,} neurons with --eps {eps:g} and --hist-limit {window} "
            f"may need {size_text(need)} of memory ({HALVES} halves of the collection; limit {size_text(cap)}); "
            "raise --eps" + ("" if limit == AUTO else ", lower --hist-limit or use --hist-limit auto")
        )


def _limit_text(limit: float | str, widths: list[int], eps: float) -> str:
    """``limit`` for a message: the number, or ``auto (±N)``."""
    return f"auto (±{auto_limit(widths, eps):g})" if limit == AUTO else f"{limit:g}"


def describe_window(widths: list[int], eps: float, limit: float | str) -> str:
    """The histogram window of a collection and its memory, in words (for the log)."""
    grid = HistGrid.of(eps, limit, widths)
    bound = size_text(hist_memory_bound(widths, eps, grid.limit))
    how = "auto, the widest that fits the memory caps" if grid.auto else "--hist-limit"
    return (
        f"histogram window ±{grid.limit:g} ({how}), bins of {eps:g}: 4 bytes per bin on a CPU (8 on accelerators) "
        f"over the range each neuron's values reach, for each half of the collection, at most {bound} (at 8 "
        f"bytes per bin) for {sum(widths):,} neurons"
    )


def clip_remedy(grid: HistGrid) -> str:
    """What to do about values outside the window of ``grid``."""
    if grid.auto:
        return (
            f"they lie beyond ±{grid.limit:g}, the widest window the memory caps allow at this eps "
            "(--hist-limit auto); a larger --eps widens it"
        )
    return "raise --hist-limit, or use --hist-limit auto"


def hist_bytes(stats) -> int:
    """Bytes the histograms of ``stats`` (a :class:`~knockout.stats.Statistics` or a list of
    :class:`LayerStats`) take."""
    layers = getattr(stats, "layers", stats)
    return sum(layer.hist_nbytes for layer in layers)


def size_text(n_bytes: float) -> str:
    """``n_bytes`` in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{n_bytes:.0f} B"
        n_bytes /= 1024
    return ""  # pragma: no cover


def merge_moments(
    n_a: int, mean_a: torch.Tensor, m2_a: torch.Tensor, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, mean and sum of squared deviations of two parts together (Chan et al.'s pairwise update, float64):
    the update of :meth:`LayerStats.add` and :meth:`LayerStats.merge` (and so of the all-reduce of
    :mod:`knockout.distributed`, which merges); on a CPU ``add`` does the same operations in
    :mod:`knockout.stats.kernels` (``_merge``). ``n_b`` must be positive."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta**2 * (n_a * n_b / n)
    return n, mean, m2


@dataclass(frozen=True)
class HistGrid:
    """The histogram grid of a collection, the same for every neuron and layer: bin ``k`` covers
    ``[k * eps, (k + 1) * eps)``, and bins ``k_min .. k_max`` cover the window ``[-limit, limit)``. Checked
    (:func:`check_hist_params`) once, when it is made; :class:`~knockout.stats.Statistics` makes one and shares it
    with its layers."""

    eps: float = DEFAULT_EPS
    """Bin width."""
    limit: float = FIXED_LIMIT
    """Half-width of the window; values outside it are counted in ``under`` / ``over``, not binned."""
    auto: bool = field(default=False, compare=False)
    """Whether ``limit`` was chosen by ``--hist-limit auto`` (:func:`auto_limit`); not part of the grid's identity."""

    def __post_init__(self):
        if self.limit == AUTO:
            raise KnockoutError(
                "a HistGrid needs a numeric limit; make an auto one with HistGrid.of(eps, 'auto', widths)"
            )
        check_hist_params(self.eps, self.limit)
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "limit", float(self.limit))

    @classmethod
    def of(cls, eps: float, limit: float | str, widths: list[int]) -> HistGrid:
        """The grid of ``eps`` and ``limit`` for neurons of ``widths`` (one entry per layer): ``limit="auto"`` is
        :func:`auto_limit` of them."""
        if limit != AUTO:
            return cls(eps, limit)
        return cls(eps, auto_limit(widths, eps), auto=True)

    @property
    def n_window(self) -> int:
        """Bins per neuron in the window."""
        return self.k_max - self.k_min + 1

    @cached_property
    def k_min(self) -> int:
        """Lowest bin index of the window: bin ``k_min`` starts at ``-limit``."""
        return math.floor(-self.limit / self.eps + 1e-9)

    @cached_property
    def k_max(self) -> int:
        """Highest bin index of the window (its upper edge is ``limit``)."""
        return math.ceil(self.limit / self.eps - 1e-9) - 1


class LayerStats:
    """Statistics of one layer's ``width`` neurons. Feed ``[n_tokens, width]`` batches to :meth:`add`.

    The grid is ``grid`` (shared, already checked) or, without it, a new :class:`HistGrid` of ``eps`` and ``limit``;
    ``limit="auto"`` (the default) is then resolved for this layer's width alone, so a bare ``LayerStats`` can have
    another window than a layer of :class:`~knockout.stats.Statistics`, whose ``auto`` counts all layers: to merge
    into one, make it with that one's grid (``LayerStats(width, grid=stats.grid)``).

    The histogram is stored per neuron (see "Histogram layout" above): ``counts`` holds each neuron's bins
    ``alo[j] .. ahi[j]`` one after the other. :attr:`hist` is the same counts as a ``[width, n_bins]`` table over the
    layer's bins in use (column ``j`` bin ``k_lo + j``), made when read.
    """

    #: The tensors that, with ``count`` and the histogram (``hist``, ``hist_lo``, ``hist_bins``), are the whole state
    #: (``width`` and the grid are settings).
    TENSORS = ("mean", "m2", "min", "max", "under", "over")
    #: The keys of :meth:`state_dict`.
    STATE = (*TENSORS, "count", "hist", "hist_lo", "hist_bins")

    def __init__(
        self,
        width: int,
        eps: float | None = None,
        limit: float | None = None,
        *,
        grid: HistGrid | None = None,
        sync_free: bool | None = None,
    ):
        if grid is None:
            grid = HistGrid.of(DEFAULT_EPS if eps is None else eps, DEFAULT_LIMIT if limit is None else limit, [width])
        elif eps is not None or limit is not None:
            raise TypeError("give either eps and limit or a grid, not both")
        self.width = width
        self.grid = grid
        self.sync_free = sync_free
        """Count without reading back from the device (see "Device and precision" above). ``None``: on
        accelerators; on the CPU (where a read costs nothing) the compiled passes. ``False``: torch operations with
        one host read per batch, on any device. Not part of the state."""
        self.count = 0
        self.mean = torch.zeros(width, dtype=torch.float64)
        self.m2 = torch.zeros(width, dtype=torch.float64)  # sum of squared deviations from the mean
        self.min = torch.full((width,), math.inf, dtype=torch.float64)
        self.max = torch.full((width,), -math.inf, dtype=torch.float64)
        self.under = torch.zeros(width, dtype=torch.int64)  # values < -limit
        self.over = torch.zeros(width, dtype=torch.int64)  # values >= limit
        # The histogram: neuron j's bins alo[j] .. ahi[j] at counts[start[j] ...] (on the statistics' device); the
        # bins in use (lowest and highest bin of a value inside the window) are occ_lo[j] .. occ_hi[j]. The ranges
        # are host tensors ([width] int64); a neuron without bins has lo = k_max + 1, hi = k_min - 1.
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.alo, self.ahi = self._no_bins(), self._no_bins(high=True)
        self.occ_lo, self.occ_hi = self._no_bins(), self._no_bins(high=True)
        self._start = torch.zeros(width, dtype=torch.int64)
        self._dense: tuple[torch.Tensor, int] | None = None  # hist and k_lo, made when read, until the next change
        self._buf: torch.Tensor | None = None  # sync-free counting: [width, window + 2], under | hist | over
        self._nonfinite: torch.Tensor | None = None  # sync-free: number of batches with a NaN/inf, on the device
        self._pending: tuple | None = None  # counting a batch late: (its bins, its ends on the way to the host)
        self._eps: dict = {}  # eps as a 0-dim tensor per (dtype, device), see _bins
        self._offsets: dict = {}  # flat-index offsets start - alo and their bound, see _offsets_of

    def __repr__(self) -> str:
        return f"LayerStats(width={self.width}, eps={self.eps}, limit={self.limit}, count={self.count})"

    # -- grid -------------------------------------------------------------------------------------------------
    @property
    def eps(self) -> float:
        return self.grid.eps

    @property
    def limit(self) -> float:
        return self.grid.limit

    @property
    def k_min(self) -> int:
        """Lowest bin index the grid may hold: bin ``k_min`` starts at ``-limit``."""
        return self.grid.k_min

    @property
    def k_max(self) -> int:
        """Highest bin index the grid may hold (its upper edge is ``limit``)."""
        return self.grid.k_max

    def _no_bins(self, high: bool = False) -> torch.Tensor:
        """``[width]`` int64 the lower (or, ``high``, upper) end of a range holding no bin."""
        return torch.full((self.width,), self.k_min - 1 if high else self.k_max + 1, dtype=torch.int64)

    # -- the histogram as a table -----------------------------------------------------------------------------
    @property
    def hist(self) -> torch.Tensor:
        """``[width, n_bins]`` int64 counts over the layer's bins in use: column ``j`` is bin ``k_lo + j`` (zero
        outside a neuron's own bins). Made from the per-neuron storage when read and kept until the statistics
        change; :meth:`release` drops it. Between sync-free counting into a buffer and :meth:`finish`, the buffer's
        whole window."""
        if self._buf is not None:
            return self._buf[:, 1:-1]
        return self._table()[0]

    @property
    def k_lo(self) -> int:
        """The bin of :attr:`hist`'s first column (0 when no bin is in use)."""
        if self._buf is not None:
            return self.k_min
        return self._table()[1]

    @property
    def n_bins(self) -> int:
        """Columns of :attr:`hist`: the layer's bins in use, from the lowest to the highest."""
        if self._buf is not None:
            return self.grid.n_window
        used = self.occ_lo <= self.occ_hi
        if not bool(used.any()):
            return 0
        return int(self.occ_hi[used].max()) - int(self.occ_lo[used].min()) + 1

    def bin_edges(self) -> torch.Tensor:
        """``[n_bins + 1]`` edges of the columns of :attr:`hist`."""
        return (torch.arange(self.n_bins + 1, dtype=torch.float64) + self.k_lo) * self.eps

    @property
    def hist_nbytes(self) -> int:
        """Bytes the histogram takes: its counts (per stored bin 4 bytes in int32, where the CPU's compiled passes add
        to them, else 8) and each neuron's range."""
        return self.counts.numel() * self.counts.element_size() + 8 * 4 * self.width

    def release(self) -> None:
        """Drop the table :attr:`hist` made (read-outs call it when done)."""
        self._dense = None

    def _table(self) -> tuple[torch.Tensor, int]:
        if self._dense is None:
            used = self.occ_lo <= self.occ_hi
            if not bool(used.any()):
                self._dense = (torch.zeros(self.width, 0, dtype=torch.int64, device=self.counts.device), 0)
            else:
                k_lo = int(self.occ_lo[used].min())
                n_bins = int(self.occ_hi[used].max()) - k_lo + 1
                table = torch.zeros(self.width * n_bins, dtype=torch.int64, device=self.counts.device)
                self._copy_bins(self.occ_lo, self.occ_hi, table, n_bins, k_lo)
                self._dense = (table.view(self.width, n_bins), k_lo)
        return self._dense

    def _copy_bins(
        self, lo: torch.Tensor, hi: torch.Tensor, table: torch.Tensor, stride: int, base: int, first_row: int = 0
    ) -> None:
        """Copy the stored bins ``lo[i] .. hi[i]`` (inside its stored range) of neuron ``first_row + i``, for every
        ``i`` of ``lo``, into the flat ``table`` at ``i * stride + k - base``."""
        size = (hi - lo + 1).clamp(min=0)
        total = int(size.sum())
        if total == 0:
            return
        rows = slice(first_row, first_row + len(lo))
        first = torch.cumsum(size, 0) - size  # each neuron's first position in 0 .. total
        src = self._start[rows] + lo - self.alo[rows] - first  # + position
        dst = torch.arange(len(lo), dtype=torch.int64) * stride + lo - base - first
        pos = torch.arange(total, dtype=torch.int64)
        src, dst = (torch.repeat_interleave(v, size) + pos for v in (src, dst))
        device = self.counts.device
        table[dst.to(device)] = self.counts[src.to(device)].to(table.dtype)

    def modal_bins(self, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """``([width] int64, [width] bool)``: each neuron's most populated bin (the lowest on ties, as
        ``numpy.argmax``) and whether it has no bin in use. Read ``chunk`` neurons at a time from a table over
        their own bins, so that it never makes the table over the whole layer (:attr:`hist`)."""
        self.finish()
        best = torch.zeros(self.width, dtype=torch.int64, device=self.counts.device)
        for r0 in range(0, self.width, chunk):
            lo, hi = self.occ_lo[r0 : r0 + chunk], self.occ_hi[r0 : r0 + chunk]
            used = lo <= hi
            if not bool(used.any()):
                continue
            base = int(lo[used].min())
            n = int(hi[used].max()) - base + 1
            table = self.counts.new_zeros(len(lo) * n)
            self._copy_bins(lo, hi, table, n, base, first_row=r0)
            best[r0 : r0 + len(lo)] = base + table.view(len(lo), n).argmax(1)
        return best, (self.occ_lo > self.occ_hi).to(best.device)

    # -- the per-neuron layout --------------------------------------------------------------------------------
    def _relayout(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Store neuron ``j``'s bins ``lo[j] .. hi[j]`` (host int64 ``[width]``; covering its bins in use),
        keeping the counts."""
        size = (hi - lo + 1).clamp(min=0)
        start = torch.cumsum(size, 0) - size
        counts = self.counts.new_zeros(int(size.sum()))
        keep_lo, keep_hi = torch.maximum(self.alo, lo), torch.minimum(self.ahi, hi)  # stored before and after
        keep = (keep_hi - keep_lo + 1).clamp(min=0)
        total = int(keep.sum())
        if total:
            first = torch.cumsum(keep, 0) - keep
            pos = torch.arange(total, dtype=torch.int64)
            src = torch.repeat_interleave(self._start + keep_lo - self.alo - first, keep) + pos
            dst = torch.repeat_interleave(start + keep_lo - lo - first, keep) + pos
            device = self.counts.device
            counts[dst.to(device)] = self.counts[src.to(device)]
        self.alo, self.ahi, self._start, self.counts = lo.clone(), hi.clone(), start, counts
        self._offsets.clear()

    def _note_bins(self, lo: torch.Tensor, hi: torch.Tensor, spare: bool = True) -> None:
        """Record that neuron ``j`` now has values in bins ``lo[j] .. hi[j]`` (host int64 ``[width]``, inside the
        window; ``lo > hi``: none), and widen its stored range where they leave it: to the union, plus a quarter of
        it (at least :data:`SPARE_BINS` bins) on each side when ``spare``, so that a range widening batch after
        batch is moved rarely."""
        torch.minimum(self.occ_lo, lo, out=self.occ_lo)
        torch.maximum(self.occ_hi, hi, out=self.occ_hi)
        grow = (lo < self.alo) | (hi > self.ahi)
        grow &= lo <= hi
        if not bool(grow.any()):
            return
        new_lo = torch.where(grow, torch.minimum(self.alo, lo), self.alo)
        new_hi = torch.where(grow, torch.maximum(self.ahi, hi), self.ahi)
        if spare:
            pad = torch.where(grow, ((new_hi - new_lo + 1) // 4).clamp(min=SPARE_BINS), 0)
            new_lo = (new_lo - pad).clamp(min=self.k_min)
            new_hi = (new_hi + pad).clamp(max=self.k_max)
        self._relayout(new_lo, new_hi)

    def _compact(self) -> None:
        """Store exactly the bins in use (the spare bins of :meth:`_note_bins` dropped)."""
        if not (torch.equal(self.alo, self.occ_lo) and torch.equal(self.ahi, self.occ_hi)):
            self._relayout(self.occ_lo, self.occ_hi)

    def _set_table(self, table: torch.Tensor, k_lo: int) -> None:
        """Replace the histogram by ``table: [width, n]`` (column ``j`` bin ``k_lo + j``), storing each neuron's
        bins from its first to its last non-zero one."""
        n = table.shape[1]
        if n == 0:
            table = table.new_zeros(self.width, 1)
        nz = table != 0
        used = nz.any(1).cpu()
        first = nz.to(torch.int8).argmax(1).cpu()
        last = n - 1 - nz.flip(1).to(torch.int8).argmax(1).cpu()
        lo = torch.where(used, k_lo + first, self.k_max + 1)
        hi = torch.where(used, k_lo + last, self.k_min - 1)
        self.counts = table.new_zeros(0)
        self.alo, self.ahi, self.occ_lo, self.occ_hi = lo, hi, lo.clone(), hi.clone()
        size = (hi - lo + 1).clamp(min=0)
        self._start = torch.cumsum(size, 0) - size
        total = int(size.sum())
        if total:
            rows = torch.arange(self.width, dtype=torch.int64)
            src = torch.repeat_interleave(rows * n + lo - k_lo - self._start, size) + torch.arange(total)
            self.counts = table.reshape(-1)[src.to(table.device)]
        self._offsets.clear()
        self._dense = None

    # -- updates ----------------------------------------------------------------------------------------------
    def add(self, x: torch.Tensor) -> None:
        """Add ``[n_tokens, width]`` activations (padding already removed)."""
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"expected [n_tokens, {self.width}] activations, got {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0:
            return
        if not x.is_floating_point():
            raise KnockoutError(f"expected floating-point activations, got {x.dtype}")
        x = x.detach()
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        sync_free = x.device.type != "cpu" if self.sync_free is None else self.sync_free
        if not sync_free:
            self._settle()
        self._to(x.device)
        compiled = self.sync_free is None and x.device.type == "cpu"  # the CPU's compiled passes
        self._fit_counts(n, narrow=compiled)
        if compiled:
            self._add_on_cpu(x.contiguous())
            return
        self._dense = None
        late = False  # count this batch at the next call, when its ends have reached the host
        if sync_free and self._buf is None:
            if 8 * self.width * (self.grid.n_window + 2) > BUFFER_MAX_BYTES:
                sync_free, late = False, True
                self._count_pending()
            else:
                sync_free = self._start_buffer()
        x_min, x_max = x.amin(0), x.amax(0)  # [width] in x's dtype
        ends = torch.stack([x_min.min(), x_max.max()])
        if late:
            pending = (self._bins(x), self._send_ends(ends, x_min, x_max))
        elif sync_free:
            # NaN/inf propagate into min/max; counted on the device, raised by finish()
            bad = (~torch.isfinite(ends)).any()
            self._nonfinite = bad.long() if self._nonfinite is None else self._nonfinite + bad
        else:
            # One host read per batch and layer: whether every value is finite, and the batch's lowest and highest
            # bin, which decide whether values fall outside the window. floor(x / eps) is monotonic in x, so the
            # extreme bins are those of the extreme values (the same float operations as for every value).
            finite, lo, hi = self._read_ends(ends)
            if not finite:
                raise KnockoutError(NONFINITE)
        # Moments of the batch in float64, two passes (mean, then the squared deviations from it), merged into the
        # running ones with Chan et al.'s update. Not torch.var_mean: on a CPU that is a sequential Welford pass per
        # neuron, ten times slower than these three vectorised reductions; both are exact to float64 rounding.
        d = x.to(torch.float64, copy=True)  # a copy also when x is float64: it is changed in place below
        mean = d.sum(0).div_(n)
        self._merge(n, mean, d.sub_(mean).square_().sum(0), x_min, x_max)
        if late:
            self._pending = pending
        elif sync_free:
            self._count_into_buffer(x)
        else:
            self._add_bins(self._bins(x), lo, hi, self._bins(x_min), self._bins(x_max))

    def _fit_counts(self, more: int, narrow: bool = False) -> None:
        """Keep the counts in int32 while no bin can reach 2**31 (a bin counts at most every value of its neuron:
        ``count + more`` of them) where ``narrow`` (the CPU's passes: half the memory, and faster to update); in
        int64 otherwise."""
        fits = self.count + more < 2**31
        if not fits and self.counts.dtype != torch.int64:
            self.counts = self.counts.to(torch.int64)
        elif narrow and fits and self.counts.dtype != torch.int32:
            self.counts = self.counts.to(torch.int32)

    def _add_on_cpu(self, x: torch.Tensor) -> None:
        """:meth:`add` on a CPU, ``x`` contiguous float32/float64: the two passes of :mod:`knockout.stats.kernels`,
        in one call unless the first finds that the stored bins must grow, a value outside the window or a NaN/inf
        (nothing is changed before the checks of the other devices pass)."""
        from knockout.stats import kernels  # numba: compiled on first use, then cached on disk

        values = x.numpy()
        eps = values.dtype.type(self.eps)
        n_a, n_b = self.count, len(values)
        n = n_a + n_b
        running = self.mean.numpy(), self.m2.numpy(), self.min.numpy(), self.max.numpy()  # updated in place
        shares = n_b / n, n_a * n_b / n  # Chan et al.'s share_b and weight
        offsets = self._offsets_of("kernels", narrow=True)[0].numpy()
        total, low, high, bin_lo, bin_hi, verdict = kernels.update(
            values, eps, self.k_min, self.k_max, self.alo.numpy(), self.ahi.numpy(), self.occ_lo.numpy(),
            self.occ_hi.numpy(), offsets, self.counts.numpy(), *running, *shares,
        )  # fmt: skip
        if verdict == kernels.NONFINITE:
            raise KnockoutError(NONFINITE)
        self._dense = None
        if verdict != kernels.INSIDE:  # nothing changed yet
            counts, offsets = _NO_COUNTS, _NO_OFFSETS  # values outside the window: counted as on the other devices
            if verdict == kernels.GROW:  # the stored bins grown first
                self._note_bins(torch.from_numpy(bin_lo), torch.from_numpy(bin_hi))
                counts, offsets = self.counts.numpy(), self._offsets_of("kernels", narrow=True)[0].numpy()
            kernels.add_batch(values, total, eps, offsets, counts, *running, low, high, *shares)
        self.count = n
        if verdict == kernels.OUTSIDE:  # (each neuron's bins, the first pass's, are not read on that path)
            bin_lo, bin_hi = torch.from_numpy(bin_lo), torch.from_numpy(bin_hi)
            self._add_bins(self._bins(x), int(bin_lo.min()), int(bin_hi.max()), bin_lo, bin_hi)

    def finish(self) -> None:
        """Settle what sync-free counting left on the device: raise if a batch held NaN/inf, and store the
        histogram, as counting with host reads stores it (bit for bit), and keep only the bins in use. One host
        read; after counting with host reads it only drops the spare bins. :func:`~knockout.stats.collect_stats`
        calls it. Before it, after counting into a buffer, ``hist`` holds the same counts over the whole window but
        the check for NaN/inf is not done; after counting a batch late (a buffer above :data:`BUFFER_MAX_BYTES`),
        the histogram lacks the last batch, which ``finish`` counts: call it before reading ``hist`` directly."""
        self._settle()
        self._compact()

    def _settle(self) -> None:
        """:meth:`finish` without dropping the spare bins."""
        self._count_pending()
        if self._nonfinite is not None:
            bad, self._nonfinite = self._nonfinite, None
            if int(bad):
                self._drop_buffer()
                raise KnockoutError(NONFINITE)
        if self._buf is None:
            return
        buf = self._buf
        self._drop_buffer()
        self.under, self.over = buf[:, 0].clone(), buf[:, -1].clone()
        self._set_table(buf[:, 1:-1], self.k_min)

    def _drop_buffer(self) -> None:
        """Leave buffer mode with the stored fields as they were when it started (a failed batch is dropped)."""
        if self._buf is not None:
            self._buf = None
            self.under, self.over = self._buf_saved

    def _start_buffer(self) -> bool:
        """Start sync-free counting: a buffer over the whole window plus a column below and above it, holding the
        counts so far. False (and counting with host reads from then on) if the device has no room for it."""
        n_window = self.grid.n_window
        try:
            buf = torch.zeros(self.width, n_window + 2, dtype=torch.int64, device=self.mean.device)
        except torch.OutOfMemoryError:
            log.warning(
                "no room on %s for a %s histogram buffer; counting with a host read per batch instead",
                self.mean.device, size_text(8 * self.width * (n_window + 2)),
            )  # fmt: skip
            self.sync_free = False
            return False
        buf[:, 0], buf[:, -1] = self.under, self.over
        if self.counts.numel():  # (the ranges are host tensors: reading them waits for no device)
            self._copy_bins(self.occ_lo, self.occ_hi, buf.view(-1), n_window + 2, self.k_min - 1)
        self._buf, self._buf_saved = buf, (self.under, self.over)
        # under and over are views of the buffer until finish(): reading them in between is right
        self.under, self.over = buf[:, 0], buf[:, -1]
        return True

    def _count_into_buffer(self, x: torch.Tensor) -> None:
        """Sync-free counting of ``x`` into the buffer (see :meth:`_start_buffer`)."""
        k = self._bins(x).nan_to_num_(nan=float(self.k_max + 1)).clamp_(self.k_min - 1, self.k_max + 1)
        n_cols = self._buf.shape[1]
        flat = self._row_index(k, n_cols, self.k_min - 1, self.width * n_cols)
        self._buf.view(-1).index_add_(0, flat.view(-1), self._buf.new_ones(1).expand(flat.numel()))

    def _send_ends(self, ends: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor):
        """Start the transfer to the host of what :meth:`_read_ends` reads and of each neuron's lowest and highest
        bin, without waiting for it: ``(values, event)``, the event marking when they are there (``None`` on the
        CPU)."""
        values = torch.cat([ends, ends / self._eps_as(ends), self._bins(x_min), self._bins(x_max)])
        if values.device.type == "cpu":
            return values, None
        host = values.to("cpu", non_blocking=True)  # into pinned memory, asynchronously
        event = torch.Event(values.device)
        event.record()
        return host, event

    def _count_pending(self) -> None:
        """Count the batch left by counting a batch late: wait for its ends (sent one batch ago, so the device is
        rarely still busy with them), raise if it held NaN/inf, and count its bins as counting with reads does."""
        if self._pending is None:
            return
        (k, (values, event)), self._pending = self._pending, None
        if event is not None:
            event.synchronize()
        finite, lo, hi = self._ends_of(values[:4].tolist())
        if not finite:
            raise KnockoutError(NONFINITE)
        self._dense = None
        self._add_bins(k, lo, hi, values[4 : 4 + self.width], values[4 + self.width :])

    def _read_ends(self, ends: torch.Tensor) -> tuple[bool, int, int]:
        """``(all finite, lowest bin, highest bin)`` of a batch whose lowest and highest values are ``ends``: one
        transfer to the host (the values and their ``x / eps``, floored here: the same bins as :meth:`_bins`). A bin
        beyond the window (or an ``x / eps`` beyond the dtype's range) is reported as ``k_min - 1`` / ``k_max + 1``."""
        return self._ends_of(torch.cat([ends, ends / self._eps_as(ends)]).tolist())

    def _ends_of(self, values: list[float]) -> tuple[bool, int, int]:
        """:meth:`_read_ends` from the values read: ``[lowest, highest, lowest / eps, highest / eps]``."""
        lo, hi, q_lo, q_hi = values
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return False, 0, 0
        return True, self._clamped_bin(q_lo), self._clamped_bin(q_hi)

    def _clamped_bin(self, q: float) -> int:
        """``floor(q)`` clamped to ``k_min - 1 .. k_max + 1`` (``q`` may be infinite)."""
        if q < self.k_min:
            return self.k_min - 1
        if q >= self.k_max + 1:
            return self.k_max + 1
        return math.floor(q)

    def _eps_as(self, x: torch.Tensor) -> torch.Tensor:
        """``eps`` as a 0-dim tensor of x's dtype on x's device (made once per dtype and device)."""
        key = (x.dtype, x.device)
        eps = self._eps.get(key)
        if eps is None:
            eps = self._eps[key] = torch.tensor(self.eps, dtype=x.dtype, device=x.device)
        return eps

    def _bins(self, x: torch.Tensor) -> torch.Tensor:
        """Bin index ``floor(x / eps)`` of every value of ``x``, computed in x's float dtype: a new tensor of whole
        numbers, still in that dtype. It becomes an integer only after values outside the window are clamped to
        ``k_min - 1`` / ``k_max + 1``, so that a value whose ``x / eps`` lies beyond int64 (or is inf) still counts as
        below / above the window."""
        # Divided by eps as a tensor on x's device: CUDA multiplies by the reciprocal of a Python-number divisor,
        # which can move a value on a bin edge into the next bin; this keeps the bins of every device the same.
        return (x / self._eps_as(x)).floor_()

    def _add_bins(self, k: torch.Tensor, lo: int, hi: int, k_min_j: torch.Tensor, k_max_j: torch.Tensor) -> None:
        """Count the bins ``k: [n, width]`` (:meth:`_bins` of finite values; modified in place) into the histogram;
        ``lo``/``hi``: the lowest/highest of them; ``k_min_j``/``k_max_j``: ``[width]`` each neuron's (floats)."""
        if lo >= self.k_min and hi <= self.k_max:  # common case: nothing outside the window
            self._note_bins(k_min_j.cpu().to(torch.int64), k_max_j.cpu().to(torch.int64))
            flat = self._flat_index(k).view(-1)
            self.counts.index_add_(0, flat, self.counts.new_ones(1).expand(flat.numel()))
            return
        # Some values outside the window: counted per neuron in under / over, the others in the histogram.
        k = k.clamp_(self.k_min - 1, self.k_max + 1)
        below, above = k < self.k_min, k > self.k_max
        self.under += below.sum(0)
        self.over += above.sum(0)
        outside = below | above
        in_lo = torch.where(outside, self.k_max + 1, k).amin(0).cpu().to(torch.int64)  # k_max + 1: none inside
        in_hi = torch.where(outside, self.k_min - 1, k).amax(0).cpu().to(torch.int64)
        self._note_bins(in_lo, in_hi)
        flat = self._flat_index(k)[~outside]
        self.counts.index_add_(0, flat, self.counts.new_ones(1).expand(flat.numel()))

    def _offsets_of(self, key, narrow: bool = False) -> tuple[torch.Tensor, int]:
        """``start - alo`` on the histogram's device (int64, or int32 if ``narrow`` and it fits) and a bound on every
        flat index and number involved in forming one, kept per ``key`` until the layout changes."""
        cached = self._offsets.get(key)
        if cached is None:
            bound = self.counts.numel() + int(self.alo.abs().max()) + 2 * (abs(self.k_min) + abs(self.k_max) + 2)
            offsets = self._start - self.alo
            offsets = offsets.to(torch.int32) if narrow and bound < 2**31 else offsets
            cached = self._offsets[key] = (offsets.to(self.counts.device), bound)
        return cached

    def _flat_index(self, k: torch.Tensor) -> torch.Tensor:
        """Positions ``start[j] + k - alo[j]`` in ``counts`` of the bins ``k`` (``[n, width]`` whole numbers in a
        float dtype, modified in place), each inside its neuron's stored range except where the caller drops it."""
        offsets, bound = self._offsets_of(k.dtype)
        return self._indices(k, offsets, bound)

    def _row_index(self, k: torch.Tensor, n_cols: int, base: int, size: int) -> torch.Tensor:
        """``[n, width]`` flat indices ``j * n_cols + k - base`` of the bins ``k`` into a ``[width, n_cols]``
        table of ``size`` elements (whole numbers in a float dtype, modified in place)."""
        key = ("rows", n_cols, base, k.device)
        offsets = self._offsets.get(key)
        if offsets is None:
            offsets = self._offsets[key] = torch.arange(self.width, device=k.device) * n_cols - base
        return self._indices(k, offsets, size + abs(base) + n_cols)

    @staticmethod
    def _indices(k: torch.Tensor, offsets: torch.Tensor, bound: int) -> torch.Tensor:
        """``k + offsets`` as an integer tensor, every number involved below ``bound``: formed in k's float dtype
        when ``bound`` is below its exact-integer limit (2**24 in float32), else in an integer type; int32 where it
        fits."""
        index = torch.int32 if bound < 2**31 else torch.int64
        if k.is_floating_point() and bound <= 2 / torch.finfo(k.dtype).eps:
            return k.add_(offsets.to(k.dtype)).to(index)
        return k.to(index).add_(offsets.to(index))

    def _merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor, min_b: torch.Tensor, max_b: torch.Tensor):
        """Fold in the summary of ``n_b`` more values: their mean and sum of squared deviations (float64; Chan et
        al.'s pairwise update), minimum and maximum (any float dtype)."""
        torch.minimum(self.min, min_b, out=self.min)
        torch.maximum(self.max, max_b, out=self.max)
        self.count, self.mean, self.m2 = merge_moments(self.count, self.mean, self.m2, n_b, mean_b, m2_b)

    def merge(self, other: LayerStats) -> None:
        """Add the data of ``other`` (same width, eps and limit) to this one."""
        if (other.width, other.grid) != (self.width, self.grid):
            raise KnockoutError(
                f"cannot merge statistics with width/eps/limit {(other.width, other.eps, other.limit)} into "
                f"{(self.width, self.eps, self.limit)}: collect both with the same --eps and --hist-limit"
                + (
                    " (the auto window depends on the widths of all layers collected together: make both with one "
                    "grid, e.g. LayerStats(width, grid=stats.grid))"
                    if self.grid.auto or other.grid.auto
                    else ""
                )
            )
        if other.count == 0:
            return
        self.finish()
        other.finish()
        self._to(other.mean.device)
        self._dense = None
        self._fit_counts(other.count)
        self._merge(other.count, other.mean, other.m2, other.min, other.max)
        self.under += other.under
        self.over += other.over
        self._note_bins(other.occ_lo, other.occ_hi, spare=False)
        size = (other.occ_hi - other.occ_lo + 1).clamp(min=0)
        total = int(size.sum())
        if total:  # other's bins (other stores exactly those in use) into ours
            shift = self._start + other.occ_lo - self.alo - other._start
            dst = torch.repeat_interleave(shift, size) + torch.arange(total)
            self.counts.index_add_(0, dst.to(self.counts.device), other.counts.to(self.counts.dtype))

    def _to(self, device) -> None:
        if self.mean.device != device:
            self.finish()
            for name in (*self.TENSORS, "counts"):
                setattr(self, name, getattr(self, name).to(device))
            self._offsets.clear()
            self._dense = None

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every field needed to rebuild these statistics (as baukit's runningstats), on the statistics' device:
        ``hist`` the counts (int64) of each neuron's bins in use one after the other, from bin ``hist_lo[j]``,
        ``hist_bins[j]`` of them. The per-neuron tensors are copies; ``hist`` may share memory with the counts."""
        self.finish()
        state = {name: getattr(self, name).detach().clone() for name in self.TENSORS}  # updated in place by add
        size = (self.occ_hi - self.occ_lo + 1).clamp(min=0)
        state["count"] = torch.tensor([self.count], dtype=torch.int64)
        state["hist"] = self.counts.detach().to(torch.int64)
        state["hist_lo"] = torch.where(size > 0, self.occ_lo, 0)
        state["hist_bins"] = size
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the state by ``state`` (from :meth:`state_dict`; or a ``[width, n_bins]`` table ``hist`` with its
        first bin ``k_lo``, as statistics files of ``knockout.stats/1`` hold). The tensors are cloned, so statistics
        built under ``torch.inference_mode`` can still be merged and extended afterwards."""
        self._buf, self._nonfinite, self._pending, self._dense = None, None, None, None
        for name in self.TENSORS:
            setattr(self, name, state[name].clone())
        self.count = int(state["count"][0])
        if "hist_lo" not in state:  # a table over the layer's bins in use
            self._set_table(state["hist"], int(state["k_lo"][0]))
            return
        size = state["hist_bins"].cpu().to(torch.int64)
        lo = state["hist_lo"].cpu().to(torch.int64)
        if int(size.sum()) != state["hist"].numel() or bool((size < 0).any()):
            raise KnockoutError("damaged statistics: the histogram's size does not match its neurons' bins")
        self.alo = torch.where(size > 0, lo, self.k_max + 1)
        self.ahi = torch.where(size > 0, lo + size - 1, self.k_min - 1)
        self.occ_lo, self.occ_hi = self.alo.clone(), self.ahi.clone()
        self._start = torch.cumsum(size, 0) - size
        self.counts = state["hist"].clone()
        self._offsets.clear()

    # -- read-outs --------------------------------------------------------------------------------------------
    @property
    def var(self) -> torch.Tensor:
        """Population variance (ddof=0, as ``numpy.var``), ``[width]``."""
        return self.m2 / max(self.count, 1)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def clipped_fraction(self) -> float:
        """Fraction of values outside ``[-limit, limit)``, which the histogram (and the peak) leave out."""
        return float((self.under + self.over).sum()) / max(self.count * self.width, 1)

    def peak(self) -> torch.Tensor:
        """``[width]`` centre of each neuron's most populated bin (float64; the lowest such bin on ties, as
        ``numpy.argmax``): :func:`peak_at` at the stored ``eps``.

        A neuron with no value inside the window (all clipped) has no peak; its mean is used and a warning given.
        """
        self.finish()
        return peak_at(self, self.eps)


# -- the peak: the read-out every run uses (the other centres are in knockout.stats.centres) --------------------------
def _check_nonempty(stats: LayerStats) -> None:
    if stats.count == 0:
        raise KnockoutError("statistics are empty: no tokens were collected")


def _centre(k: torch.Tensor, width: torch.Tensor | float) -> torch.Tensor:
    """Centre ``(k + 0.5) * width`` (float64) of bin ``k`` (int64) of the grid of bins ``width`` wide."""
    return (k.to(torch.float64) + 0.5) * width


def snapped_eps(stats: LayerStats, eps_new: torch.Tensor | float) -> torch.Tensor:
    """``[width]`` the bin width :func:`peak_at` really uses for ``eps_new``: ``m * eps`` with
    ``m = max(1, floor(eps_new / eps + 0.5))``, the nearest multiple of the stored ``eps`` (NaN stays NaN)."""
    return _rebin_factor(stats, eps_new, warn=False).double() * stats.eps


def _rebin_factor(stats: LayerStats, eps_new: torch.Tensor | float, warn: bool = True) -> torch.Tensor:
    """``[width]`` int64 ``m >= 1``; NaN ``eps_new`` gives ``m = 0`` (a marker for "no peak")."""
    device = stats.hist.device
    e = torch.as_tensor(eps_new, dtype=torch.float64, device=device).expand(stats.width)
    nan = torch.isnan(e)
    if (e[~nan] <= 0).any() or torch.isinf(e).any():
        raise KnockoutError(f"bin widths must be positive and finite (or NaN), got {eps_new!r}")
    m = torch.floor(e / stats.eps + 0.5).nan_to_num(0).to(torch.int64)
    finer = (m == 0) & ~nan
    if warn and finer.any():
        log.warning(
            "%d neurons asked for bins narrower than half the stored eps = %g; using eps for them",
            int(finer.sum()),
            stats.eps,
        )
    m = m.clamp(min=1)
    m[nan] = 0
    return m


def _empty_fallback(stats: LayerStats, peak: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Neurons with no value inside the window get their mean, with a warning (the peaks' fallback)."""
    if empty.any():
        log.warning(
            "%d neurons have every value outside ±%g; using their mean as the peak", int(empty.sum()), stats.limit
        )
        peak[empty] = stats.mean[empty]
    return peak


def peak_at(stats: LayerStats, eps_new: torch.Tensor | float) -> torch.Tensor:
    """``[width]`` peak (centre of the most populated bin, lowest on ties, as ``numpy.argmax``) for bin width
    ``eps_new`` (a float or a ``[width]`` tensor, e.g. from :func:`fd_eps` or :func:`relative_eps`), re-binned from
    the stored histogram. At the stored ``eps`` it is the stored histogram's peak, :meth:`LayerStats.peak`.

    A coarse bin ``K`` covers ``[K * w, (K + 1) * w)`` with ``w = m * eps`` (see :func:`snapped_eps`): the union of
    stored bins ``K * m .. K * m + m - 1``, because ``floor(floor(x / eps) / m) = floor(x / (m eps))``. So the result
    equals the argmax of a histogram of the raw values on the global grid ``K * w``: independent of the order of the
    data. A width that is not a multiple of ``eps`` is rounded to the nearest multiple (at least ``eps``, with a
    warning for widths under ``eps / 2``). Clipped values are not counted: a coarse bin straddling the window edge
    holds only its in-window part. Neurons with no value in the window get their mean, with a warning; a NaN width
    gives a NaN peak.
    """
    _check_nonempty(stats)
    m = _rebin_factor(stats, eps_new)
    nan = m == 0
    if stats.n_bins == 0:
        log.warning("no value fell inside ±%g; using the mean as the peak", stats.limit)
        return stats.mean.clone()
    m = m.clamp(min=1)
    if bool((m == 1).all()):  # the stored bins themselves, a few neurons at a time
        best, empty = stats.modal_bins()
        peak = _centre(best, stats.eps)
        peak = _empty_fallback(stats, peak, empty)
        peak[nan] = math.nan
        return peak
    n_bins, k_lo = stats.n_bins, stats.k_lo
    big_lo = torch.div(torch.full_like(m, k_lo), m, rounding_mode="floor")  # [width] first coarse bin
    big_hi = torch.div(torch.full_like(m, k_lo + n_bins - 1), m, rounding_mode="floor")
    n_coarse = int((big_hi - big_lo).max()) + 1
    big = big_lo[:, None] + torch.arange(n_coarse, device=m.device)  # [width, n_coarse] coarse bin index
    start = (big * m[:, None] - k_lo).clamp(0, n_bins)
    end = ((big + 1) * m[:, None] - k_lo).clamp(0, n_bins)
    cum = torch.nn.functional.pad(stats.hist.cumsum(1), (1, 0))  # [width, n_bins + 1]
    counts = cum.gather(1, end) - cum.gather(1, start)  # [width, n_coarse]; 0 past a neuron's last coarse bin
    best = big_lo + counts.argmax(1)
    peak = _centre(best, m.to(torch.float64) * stats.eps)
    peak = _empty_fallback(stats, peak, stats.hist.sum(1) == 0)
    peak[nan] = math.nan
    return peak


# -- kernel density mode ----------------------------------------------------------------------------------------
