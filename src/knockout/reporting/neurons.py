"""Per-neuron activation distributions from a stored statistics file: layer averages and atypical neurons.

Reads ``stats.safetensors`` (see :mod:`knockout.stats`) one layer at a time, so a large model's histograms are never
all in memory at once. Nothing here loads a model.

Atypicality
-----------
For neuron ``i`` with mean ``mu``, population std ``sigma`` and histogram peak without point masses ``p`` (all from
the stored statistics; ``p`` is :func:`knockout.stats.centres.peak_without_point_masses`, the stored peak unless the
neuron's modal bin is a point mass):

* **offset** ``= max(|p - mu| - eps / 2, 0) / sigma`` (0 when ``sigma = 0``): how far the most likely value sits
  from the mean, in standard deviations. ``p`` is a bin centre, so the true mode may lie up to ``eps / 2`` from it;
  that much is forgiven, so nearly constant neurons (``sigma`` below ``eps``) are not called atypical for the
  histogram's rounding. About 0 for a symmetric unimodal neuron, about 1 for an exponential or a two-peaked one.
* **modes**: the stored ``eps``-histogram is resampled onto ``GRID_BINS = 50`` bins centred on ``mu``, of width
  ``max(sigma / 5, eps)`` (so ``mu ± 5 sigma`` when ``sigma >= 5 eps``, never finer than the stored bins; counts
  are read from the cumulative histogram, linear inside a stored bin),
  smoothed twice with the kernel ``[1, 2, 1] / 4``, and scaled so its maximum is 1. A *mode* is a local
  maximum whose topographic prominence (its height minus the higher of the two lowest points between it and a
  higher point, or the edge, on either side) is at least ``MIN_PROMINENCE = 0.1``. ``second`` is the prominence of
  the second most prominent mode (0 for a unimodal neuron), in ``[0, 1]``.
* **score** ``= offset + second``. A clean two-peaked neuron scores about 2, a skewed or off-centre unimodal neuron
  about 1, a zero-centred Gaussian-like neuron about 0. The gallery shows the neurons with the highest score.

Point masses. With few statistics tokens a narrow spike (e.g. the same activation at the first position of every
sequence) can hold the most populated bin, so the stored peak (the value ``peak`` ablates to) is the spike, not the
top of the bulk. Such a neuron (:func:`knockout.stats.centres.point_mass`) is flagged ``point_mass``; its offset is
measured from the bulk's peak ``peak_nopm``, so it ranks by the shape of its bulk, and the gallery labels it and
draws both peaks. :func:`point_mass_counts` counts them per layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from knockout.stats import centres
from knockout.stats.running import LayerStats
from knockout.stats.statistics import load_layer, read_metadata

GRID_BINS = 50
GRID_SIGMAS = 5.0
MIN_PROMINENCE = 0.1


@dataclass
class LayerHist:
    """One layer's stored statistics as numpy arrays: ``hist`` is ``[width, n_bins]`` counts, column ``j`` being
    the bin ``[(k_lo + j) * eps, (k_lo + j + 1) * eps)``; ``peak`` as :meth:`knockout.stats.LayerStats.peak`."""

    layer: int
    mean: np.ndarray  # [width] float64
    std: np.ndarray  # [width] float64, population std (ddof=0)
    hist: np.ndarray  # [width, n_bins] int64
    k_lo: int
    eps: float
    count: int
    peak: np.ndarray  # [width] float64
    point_mass: np.ndarray | None = None  # [width] bool, the modal bin is a point mass (centres.point_mass)
    peak_nopm: np.ndarray | None = None  # [width] float64, centres.peak_without_point_masses
    mode: np.ndarray | None = None  # [width] float64, centres.mode (kernel density maximum; NaN if unknown)

    def __post_init__(self):
        if self.point_mass is None:
            self.point_mass = np.zeros(self.mean.shape[0], dtype=bool)
        if self.peak_nopm is None:
            self.peak_nopm = self.peak.copy()
        if self.mode is None:
            self.mode = np.full(self.mean.shape[0], np.nan)

    @classmethod
    def of(cls, layer: int, stats: LayerStats) -> LayerHist:
        return cls(
            layer,
            stats.mean.double().numpy(),
            stats.std.double().numpy(),
            stats.hist.long().numpy(),
            stats.k_lo,
            stats.eps,
            stats.count,
            stats.peak().double().numpy(),
            centres.point_mass(stats).numpy(),
            centres.peak_without_point_masses(stats).double().numpy(),
            centres.mode(stats).double().numpy(),
        )

    @property
    def width(self) -> int:
        return self.mean.shape[0]

    def edges(self) -> np.ndarray:
        """``[n_bins + 1]`` bin edges."""
        return (np.arange(self.hist.shape[1] + 1) + self.k_lo) * self.eps

    def rows(self, r: list[int]) -> LayerHist:
        """The same layer restricted to neurons ``r``."""
        return LayerHist(
            self.layer, self.mean[r], self.std[r], self.hist[r], self.k_lo, self.eps, self.count, self.peak[r],
            self.point_mass[r], self.peak_nopm[r], self.mode[r],
        )  # fmt: skip


class StatsFile:
    """Lazy reader of a statistics file (``knockout.stats/2``, or ``/1`` of older runs): one layer at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta = read_metadata(self.path)
        self.meta = meta
        self.widths: list[int] = json.loads(meta["widths"])
        self.eps = float(meta["eps"])

    def __len__(self) -> int:
        return len(self.widths)

    def layer(self, i: int) -> LayerHist:
        return LayerHist.of(i, load_layer(self.path, i))


def default_layers(n_layers: int, k: int = 4) -> list[int]:
    """``k`` layers spread evenly over depth, first and last included."""
    if n_layers <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(k, n_layers))})


def layer_average(lh: LayerHist) -> tuple[np.ndarray, np.ndarray]:
    """The layer-averaged distribution: bin edges ``[n_bins + 1]`` and density ``[n_bins]`` (the mean over neurons
    of each neuron's histogram, normalised to integrate to 1)."""
    counts = lh.hist.sum(0).astype(np.float64)
    total = counts.sum()
    return lh.edges(), counts / (total * lh.eps) if total else counts


# -- atypicality ----------------------------------------------------------------------------------------------
def resample(lh: LayerHist, rows: np.ndarray | None = None) -> np.ndarray:
    """``[n, GRID_BINS]`` counts of neurons ``rows`` on their own grid ``mu ± GRID_SIGMAS sigma`` (see module doc)."""
    rows = np.arange(lh.width) if rows is None else np.asarray(rows)
    hist = lh.hist[rows]
    n_bins = hist.shape[1]
    if n_bins == 0:
        return np.zeros((len(rows), GRID_BINS))
    cdf = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(hist, axis=1, dtype=np.float64)], axis=1)
    # bin width 2 * GRID_SIGMAS * sigma / GRID_BINS, but never finer than the stored eps (that would be interpolation)
    width = np.maximum(lh.std[rows] * (2 * GRID_SIGMAS / GRID_BINS), lh.eps)
    steps = np.arange(GRID_BINS + 1) - GRID_BINS / 2
    edges = lh.mean[rows, None] + steps[None, :] * width[:, None]  # [n, GRID_BINS + 1]
    pos = np.clip(edges / lh.eps - lh.k_lo, 0, n_bins)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_bins - 1)
    frac = pos - i0
    lo = np.take_along_axis(cdf, i0, 1)
    hi = np.take_along_axis(cdf, i0 + 1, 1)
    return np.diff(lo + frac * (hi - lo), axis=1)


def _smooth(g: np.ndarray) -> np.ndarray:
    for _ in range(2):
        padded = np.pad(g, ((0, 0), (1, 1)))
        g = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4
    return g


def prominences(g: np.ndarray) -> list[float]:
    """Topographic prominences of the local maxima of the 1-d profile ``g`` (zero beyond both ends; a plateau
    counts once), largest first."""
    g = np.concatenate([[0.0], np.asarray(g, dtype=np.float64), [0.0]])
    out = []
    for i in range(1, len(g) - 1):
        h = g[i]
        if not (h > g[i - 1] and h >= g[i + 1]):
            continue
        j = i
        while j > 0 and g[j - 1] <= h:
            j -= 1
        left = g[j:i].min() if j < i else h
        k = i
        while k < len(g) - 1 and g[k + 1] <= h:
            k += 1
        right = g[i + 1 : k + 1].min() if k > i else h
        out.append(float(h - max(left, right)))
    return sorted(out, reverse=True)


@dataclass
class NeuronScore:
    layer: int
    neuron: int
    mean: float
    std: float
    peak: float
    offset: float
    modes: int
    second: float
    width: int = 0
    """Neurons in the layer (``head * d_head + j`` indexing)."""
    point_mass: bool = False
    """The stored peak is a point mass (:func:`knockout.stats.centres.point_mass`), not the top of the bulk."""
    peak_nopm: float = float("nan")
    """The peak without point masses, from which ``offset`` is measured (equal to ``peak`` unless ``point_mass``)."""
    mode: float = float("nan")
    """The bin-free mode (:func:`knockout.stats.centres.mode`), drawn next to the peak: a peak far from it is a
    spike or a narrow mode that the point-mass test did not flag."""

    @property
    def peak_off_mode(self) -> bool:
        """The peak lies more than half a std from the KDE mode (and is not flagged as a point mass)."""
        return not self.point_mass and abs(self.peak - self.mode) > 0.5 * self.std

    @property
    def score(self) -> float:
        return self.offset + self.second

    def as_dict(self) -> dict:
        return {**self.__dict__, "score": self.score, "peak_off_mode": self.peak_off_mode}


def score_layer(lh: LayerHist) -> list[NeuronScore]:
    """Atypicality of every neuron of one layer (see the module docstring)."""
    peak = lh.peak_nopm
    sigma = lh.std
    gap = np.maximum(np.abs(peak - lh.mean) - lh.eps / 2, 0.0)  # the true mode lies anywhere in the peak's bin
    offset = np.where(sigma > 0, gap / np.where(sigma > 0, sigma, 1.0), 0.0)
    g = _smooth(resample(lh))
    top = g.max(1, keepdims=True)
    g = np.where(top > 0, g / np.where(top > 0, top, 1.0), 0.0)
    # only profiles with at least two local maxima can have a second mode
    inner = (g[:, 1:-1] > g[:, :-2]) & (g[:, 1:-1] >= g[:, 2:])
    n_max = inner.sum(1) + (g[:, 0] > g[:, 1]) + (g[:, -1] > g[:, -2])
    out = []
    for i in range(lh.width):
        modes, second = 1 if top[i, 0] > 0 else 0, 0.0
        if n_max[i] >= 2 and sigma[i] > 0:
            proms = [p for p in prominences(g[i]) if p >= MIN_PROMINENCE]
            modes = max(len(proms), 1)
            second = proms[1] if len(proms) > 1 else 0.0
        out.append(
            NeuronScore(
                lh.layer,
                i,
                float(lh.mean[i]),
                float(sigma[i]),
                float(lh.peak[i]),
                float(offset[i]),
                modes,
                second,
                lh.width,
                bool(lh.point_mass[i]),
                float(peak[i]),
                float(lh.mode[i]),
            )
        )
    return out


def rank_atypical(stats: StatsFile, top_k: int = 8) -> tuple[list[NeuronScore], dict[tuple[int, int], LayerHist]]:
    """All neurons' scores, highest first, and for the ``top_k`` best a one-neuron :class:`LayerHist` each (for
    drawing). Reads one layer at a time."""
    scores: list[NeuronScore] = []
    for i in range(len(stats)):
        scores += score_layer(stats.layer(i))
    scores.sort(key=lambda s: (-s.score, s.layer, s.neuron))
    chosen = scores[:top_k]
    hists: dict[tuple[int, int], LayerHist] = {}
    for layer in sorted({s.layer for s in chosen}):
        lh = stats.layer(layer)
        for s in chosen:
            if s.layer == layer:
                hists[(layer, s.neuron)] = lh.rows([s.neuron])
    return scores, hists


def point_mass_counts(scores: list[NeuronScore], n_layers: int) -> list[int]:
    """Per layer, the number of neurons whose stored peak is a point mass (from :func:`rank_atypical`'s scores)."""
    counts = [0] * n_layers
    for s in scores:
        counts[s.layer] += s.point_mass
    return counts
