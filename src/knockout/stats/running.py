"""Streaming, mergeable per-neuron statistics: count, mean, variance, min, max and an eps-histogram (-> peak).

Nothing here keeps raw activations: memory depends on the number of neurons and on the histogram's range, never on
the number of tokens.

Histogram grid
--------------
Bin ``k`` (an integer) covers ``[k * eps, (k + 1) * eps)``. The grid is the same for every neuron, every layer and
every run with the same ``eps``, so two histograms are merged by aligning their integer bin indices and adding. A
layer's histogram stores only the bins between the lowest and highest value seen so far, and grows when a batch
falls outside them; it never extends past ``[-limit, limit)``. Values outside that window are counted per neuron in
``under`` / ``over`` and left out of the peak. Because the window is fixed up front (not taken from the first
batch) the result does not depend on the order of the data: statistics over any split of the data, merged, equal
one pass over all of it.

Defaults: ``eps = 0.01`` and ``limit = "auto"``: the widest window whose histograms fit the memory caps
(:func:`auto_limit`, from the layers' widths and eps only, never from the data; ±310.68 for SmolLM2-135M). A number
gives a fixed window. The clipped counts are stored, and a warning names layers where more than 0.1% of values were
clipped and the neurons concerned. Override with ``--eps`` / ``--hist-limit``. The pair is a :class:`HistGrid`,
checked when it is made (:meth:`HistGrid.of` resolves ``auto``).

The peak of a neuron is the centre ``(k + 0.5) * eps`` of its most populated bin (the lowest such bin on ties, as
``numpy.argmax``), computed by :func:`knockout.stats.centres.peak_at`. Mean and variance: each batch's in float64
(two passes), merged with Chan et al.'s pairwise update.

Device and precision
--------------------
The statistics live on the device of the activations they are given (the model's; each layer on its own device
when a model is split over devices) and are kept in float64 (moments, min, max) and int64 (counts), also for
float16/bfloat16 models, whose activations are widened to float32 first (exactly).

:meth:`LayerStats.add` is a few vectorised passes over the batch: per-neuron minimum and maximum; the moments (a
float64 copy, its sum, the squared deviations and their sum); the bins ``floor(x / eps)`` turned into flat (int32)
indices of a ``[width, n_bins]`` table and counted. On the CPU one ``bincount`` counts them and the counts are added
to the histogram; ``add`` reads the batch's lowest and highest value and their ``x / eps`` once per call (all
finite? which bins?), which decide whether the stored bins must grow, and a batch with values outside the window
reads once more. On an accelerator (``sync_free``, the default off the CPU) it reads nothing back: where a buffer over
the whole window (8 bytes per bin and neuron) takes at most :data:`BUFFER_MAX_BYTES`, it counts into it, and
:meth:`LayerStats.finish`, called once at the end of a collection, raises if any batch held NaN/inf and trims the
histogram to the bins in use, bit for bit what counting with reads stores. A larger one (``auto``, usually) counts
each batch one call late: its lowest and highest values travel to the host asynchronously while the next batch
runs, and are read then (:meth:`LayerStats.finish` counts the last). :func:`knockout.stats.collect_stats` selects
the non-padding positions with an index found on the host before the batch moves to the device, so a collection on
an accelerator waits for the device only at its end (and, counting late, rarely: the values read were sent a batch
ago).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

from knockout.errors import KnockoutError
from knockout.stats import centres

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
BUFFER_MAX_BYTES = 32 * 2**20
"""Largest whole-window buffer (per layer, and per half of a collection) that sync-free counting makes; a layer whose
buffer would be larger counts each batch one batch late instead, with memory only for the bins in use."""


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
        f"histogram window ±{grid.limit:g} ({how}), bins of {eps:g}: 8 bytes per bin over the range the values reach, "
        f"per layer and for each half of the collection, at most {bound} for {sum(widths):,} neurons"
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
    return sum(layer.hist.numel() * layer.hist.element_size() for layer in layers)


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
    the one update of :meth:`LayerStats.add` and :meth:`LayerStats.merge` (and so of the all-reduce of
    :mod:`knockout.distributed`, which merges). ``n_b`` must be positive."""
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
    """

    #: The tensors that, with ``count`` and ``k_lo``, are the whole state (``width`` and the grid are settings).
    TENSORS = ("mean", "m2", "min", "max", "hist", "under", "over")

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
        accelerators, not on the CPU (where a read costs nothing). Not part of the state."""
        self.count = 0
        self.mean = torch.zeros(width, dtype=torch.float64)
        self.m2 = torch.zeros(width, dtype=torch.float64)  # sum of squared deviations from the mean
        self.min = torch.full((width,), math.inf, dtype=torch.float64)
        self.max = torch.full((width,), -math.inf, dtype=torch.float64)
        self.hist = torch.zeros(width, 0, dtype=torch.int64)  # [width, n_bins], bin k_lo + j in column j
        self.k_lo = 0
        self.under = torch.zeros(width, dtype=torch.int64)  # values < -limit
        self.over = torch.zeros(width, dtype=torch.int64)  # values >= limit
        self._buf: torch.Tensor | None = None  # sync-free counting: [width, window + 2], under | hist | over
        self._buf_k_lo = 0  # k_lo before the buffer was made (kept if the buffer ends up empty)
        self._nonfinite: torch.Tensor | None = None  # sync-free: number of batches with a NaN/inf, on the device
        self._pending: tuple | None = None  # counting a batch late: (its bins, its ends on the way to the host)
        self._eps: dict = {}  # eps as a 0-dim tensor per (dtype, device), see _bins
        self._offsets: dict = {}  # flat-index offsets per (base, n_cols, dtype, device), see _flat_index

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

    @property
    def n_bins(self) -> int:
        return self.hist.shape[1]

    def bin_edges(self) -> torch.Tensor:
        """``[n_bins + 1]`` edges of the stored bins."""
        return (torch.arange(self.n_bins + 1, dtype=torch.float64) + self.k_lo) * self.eps

    def _grow(self, lo: int, hi: int) -> None:
        """Make the stored bins cover ``[lo, hi]`` (clamped to the fixed window)."""
        lo, hi = max(lo, self.k_min), min(hi, self.k_max)
        if self.n_bins == 0:
            self.k_lo, self.hist = lo, torch.zeros(self.width, hi - lo + 1, dtype=torch.int64, device=self.hist.device)
            return
        cur_hi = self.k_lo + self.n_bins - 1
        new_lo, new_hi = min(lo, self.k_lo), max(hi, cur_hi)
        if (new_lo, new_hi) != (self.k_lo, cur_hi):
            self.hist = torch.nn.functional.pad(self.hist, (self.k_lo - new_lo, new_hi - cur_hi))
            self.k_lo = new_lo

    # -- updates ----------------------------------------------------------------------------------------------
    def add(self, x: torch.Tensor) -> None:
        """Add ``[n_tokens, width]`` activations (padding already removed)."""
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"expected [n_tokens, {self.width}] activations, got {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0:
            return
        x = x.detach()
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        sync_free = x.device.type != "cpu" if self.sync_free is None else self.sync_free
        if not sync_free:
            self.finish()
        self._to(x.device)
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
            pending = (self._bins(x), self._send_ends(ends))
        elif sync_free:
            # NaN/inf propagate into min/max; counted on the device, raised by finish()
            bad = (~torch.isfinite(ends)).any()
            self._nonfinite = bad.long() if self._nonfinite is None else self._nonfinite + bad
        else:
            # One host read per batch and layer: whether every value is finite, and the batch's lowest and highest
            # bin, which decide whether the stored bins must grow. floor(x / eps) is monotonic in x, so the extreme
            # bins are those of the extreme values (the same float operations as for every value).
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
            self._add_bins(self._bins(x), lo, hi)

    def finish(self) -> None:
        """Settle what sync-free counting left on the device: raise if a batch held NaN/inf, and store the
        histogram trimmed to the bins in use, as counting with host reads stores it (bit for bit). One host read;
        nothing to do after counting with host reads. :func:`~knockout.stats.collect_stats` calls it. Before it,
        after counting into a buffer, ``hist`` holds the same counts over the whole window but the check for NaN/inf
        is not done; after counting a batch late (a buffer above :data:`BUFFER_MAX_BYTES`), ``hist`` lacks the last
        batch, which ``finish`` counts: call it before reading ``hist`` directly."""
        self._count_pending()
        if self._nonfinite is not None:
            bad, self._nonfinite = self._nonfinite, None
            if int(bad):
                self._buf = None
                raise KnockoutError(NONFINITE)
        if self._buf is None:
            return
        buf, self._buf = self._buf, None
        self.under, self.over = buf[:, 0].clone(), buf[:, -1].clone()
        used = (buf[:, 1:-1] != 0).any(0).nonzero().squeeze(1)  # the bins in use, as growth on a CPU keeps them
        if used.numel() == 0:
            self.hist = buf.new_zeros(self.width, 0)
            self.k_lo = self._buf_k_lo
            return
        lo, hi = (int(v) for v in used[[0, -1]].tolist())
        self.hist = buf[:, 1 + lo : 2 + hi].clone()
        self.k_lo = self.k_min + lo

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
        if self.n_bins:
            start = 1 + self.k_lo - self.k_min
            buf[:, start : start + self.n_bins] = self.hist
        self._buf, self._buf_k_lo = buf, self.k_lo
        # the stored fields are views of the buffer until finish(): reading them in between is right
        self.under, self.over, self.hist, self.k_lo = buf[:, 0], buf[:, -1], buf[:, 1:-1], self.k_min
        return True

    def _count_into_buffer(self, x: torch.Tensor) -> None:
        """Sync-free counting of ``x`` into the buffer (see :meth:`_start_buffer`)."""
        k = self._bins(x).nan_to_num_(nan=float(self.k_max + 1)).clamp_(self.k_min - 1, self.k_max + 1)
        flat = self._flat_index(k, self.k_min - 1, self._buf.shape[1])
        self._buf.view(-1).index_add_(0, flat.view(-1), self._buf.new_ones(1).expand(flat.numel()))

    def _send_ends(self, ends: torch.Tensor):
        """Start the transfer to the host of what :meth:`_read_ends` reads, without waiting for it: ``(values,
        event)``, the event marking when they are there (``None`` on the CPU)."""
        values = torch.cat([ends, ends / self._eps_as(ends)])
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
        finite, lo, hi = self._ends_of(values.tolist())
        if not finite:
            raise KnockoutError(NONFINITE)
        self._add_bins(k, lo, hi)

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

    def _add_bins(self, k: torch.Tensor, lo: int, hi: int) -> None:
        """Count the bins ``k: [n, width]`` (:meth:`_bins` of finite values; modified in place) into the histogram;
        ``lo``/``hi``: the lowest/highest of them."""
        if lo >= self.k_min and hi <= self.k_max:  # common case: nothing outside the window
            self._grow(lo, hi)
            self.hist += self._count(k, self.k_lo, self.n_bins)
            return
        # Some values outside the window. One more read: the lowest and highest bin of the values inside it.
        k = k.clamp_(self.k_min - 1, self.k_max + 1)
        below, above = k < self.k_min, k > self.k_max
        ends = torch.stack([torch.where(below, self.k_max + 1, k).amin(), torch.where(above, self.k_min - 1, k).amax()])
        in_lo, in_hi = (int(v) for v in ends.tolist())
        if in_lo <= in_hi:  # some value inside the window
            self._grow(in_lo, in_hi)
        # Count with one more bin on each side of the stored ones: after growing, they hold exactly the values
        # below and above the window.
        k = k.clamp_(self.k_lo - 1, self.k_lo + self.n_bins)
        counts = self._count(k, self.k_lo - 1, self.n_bins + 2)
        self.under += counts[:, 0]
        self.over += counts[:, -1]
        self.hist += counts[:, 1:-1]

    def _count(self, k: torch.Tensor, base: int, n_cols: int) -> torch.Tensor:
        """``[width, n_cols]`` int64 counts of the bins ``k: [n, width]`` (whole numbers in a float dtype, each in
        ``base .. base + n_cols - 1``; modified in place): one ``bincount`` of flat indices ``j * n_cols + k - base``.

        The flat index is formed in k's float dtype when every number involved is a whole number below the dtype's
        exact-integer limit (2**24 in float32), else in an integer type; it is handed to ``bincount`` as int32 where
        it fits. The counts are the same either way; the float path saves two passes over int64 on a CPU. Off the
        CPU the indices are added up with ``index_add_``, which (unlike ``bincount`` there) does not wait for the
        device."""
        flat = self._flat_index(k, base, n_cols).view(-1)
        if flat.device.type != "cpu":
            counts = torch.zeros(self.width * n_cols, dtype=torch.int64, device=flat.device)
            return counts.index_add_(0, flat, counts.new_ones(1).expand(flat.numel())).view(self.width, n_cols)
        return torch.bincount(flat, minlength=self.width * n_cols).view(self.width, n_cols)

    def _flat_index(self, k: torch.Tensor, base: int, n_cols: int) -> torch.Tensor:
        """``[n, width]`` flat indices ``j * n_cols + k - base`` of the bins ``k`` (see :meth:`_count`)."""
        bound = self.width * n_cols + abs(base) + n_cols  # above any number formed here
        exact = k.is_floating_point() and bound <= 2 / torch.finfo(k.dtype).eps
        index = torch.int32 if bound < 2**31 else torch.int64
        dtype = k.dtype if exact else index
        key = (base, n_cols, dtype, k.device)
        offsets = self._offsets.get(key)
        if offsets is None:  # j * n_cols - base; the same few keys come back batch after batch
            if len(self._offsets) >= 8:
                self._offsets.clear()
            offsets = self._offsets[key] = torch.arange(self.width, device=k.device, dtype=dtype) * n_cols - base
        return k.add_(offsets).to(index) if exact else k.to(index).add_(offsets)

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
        self._merge(other.count, other.mean, other.m2, other.min, other.max)
        self.under += other.under
        self.over += other.over
        if other.n_bins:
            self._grow(other.k_lo, other.k_lo + other.n_bins - 1)
            start = other.k_lo - self.k_lo
            self.hist[:, start : start + other.n_bins] += other.hist

    def _to(self, device) -> None:
        if self.mean.device != device:
            self.finish()
            for name in self.TENSORS:
                setattr(self, name, getattr(self, name).to(device))

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every field needed to rebuild these statistics (as baukit's runningstats), on the statistics' device."""
        self.finish()
        state = {name: getattr(self, name).detach() for name in self.TENSORS}
        state["count"] = torch.tensor([self.count], dtype=torch.int64)
        state["k_lo"] = torch.tensor([self.k_lo], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the state by ``state`` (from :meth:`state_dict`). The tensors are cloned, so statistics built
        under ``torch.inference_mode`` can still be merged and extended afterwards."""
        self._buf, self._nonfinite, self._pending = None, None, None
        for name in self.TENSORS:
            setattr(self, name, state[name].clone())
        self.count = int(state["count"][0])
        self.k_lo = int(state["k_lo"][0])

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
        ``numpy.argmax``): :func:`knockout.stats.centres.peak_at` at the stored ``eps``.

        A neuron with no value inside the window (all clipped) has no peak; its mean is used and a warning given.
        """
        self.finish()
        return centres.peak_at(self, self.eps)
