"""Figures of a run, drawn with matplotlib's object API (no pyplot, no display; PNG and SVG).

* :func:`curves_figure`: the paper's Figures 2 and 3, change in top-1 (percentage points) and in cross-entropy
  (nats) against the percentage of neurons ablated, one line per method (mean over seeds) with a ±1 std band. One
  column per run, so the same function draws a single run and a comparison.
* :func:`layers_figure`: Figure 1 (left), the layer-averaged histogram of pre-out activations for chosen layers.
* :func:`gallery_figure`: Figure 1 (centre, right), the most atypical neurons' histograms with mean, peak and zero
  marked.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from knockout.reporting.neurons import LayerHist, NeuronScore, layer_average

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
FIXED_COLORS = {"peak": "#d62728", "mean": "#1f77b4", "zero": "#2ca02c"}


def method_colors(methods: list[str]) -> dict[str, str]:
    """One colour per method, the same in every figure (peak red, mean blue, zero green, others in turn)."""
    colors, others = {}, iter(c for c in PALETTE if c not in FIXED_COLORS.values())
    for m in methods:
        colors[m] = FIXED_COLORS.get(m) or next(others, "#333333")
    return colors


def _curve(summary: list[dict], method: str, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (fraction in %), mean and std of ``delta_{metric}`` for ``method``; (0, 0, 0) prepended when the run has no
    fraction-0 row, since ablating no neuron is the baseline by definition."""
    pts = sorted(
        (e["fraction"], e[f"delta_{metric}_mean"], e[f"delta_{metric}_std"]) for e in summary if e["method"] == method
    )
    if pts and pts[0][0] > 0:
        pts.insert(0, (0.0, 0.0, 0.0))
    a = np.array(pts, dtype=np.float64).reshape(-1, 3)
    scale = 100.0 if metric == "top1" else 1.0
    return 100 * a[:, 0], scale * a[:, 1], scale * a[:, 2]


def curves_figure(runs: list[tuple[str, list[dict]]], methods: list[str] | None = None) -> Figure:
    """Δtop-1 (top row) and ΔCE (bottom row) against the fraction ablated; one column per (label, summary) run."""
    if methods is None:
        methods = list(dict.fromkeys(e["method"] for _, s in runs for e in s if e["method"] != "baseline"))
    colors = method_colors(methods)
    n = max(len(runs), 1)
    fig = Figure(figsize=(4.6 * n, 6.4), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for col, (label, summary) in enumerate(runs):
        for row, (metric, ylabel) in enumerate((("top1", "Δ top-1 (pp)"), ("ce", "Δ cross-entropy (nats)"))):
            ax = axes[row, col]
            for m in methods:
                x, mean, std = _curve(summary, m, metric)
                if len(x) == 0:
                    continue
                ax.plot(x, mean, marker="o", ms=3, lw=1.6, color=colors[m], label=m)
                ax.fill_between(x, mean - std, mean + std, color=colors[m], alpha=0.18, lw=0)
            ax.axhline(0, color="0.5", lw=0.8, ls=":")
            ax.set_xlabel("neurons ablated (%)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(label)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        axes[0, 0].legend(handles, labels, fontsize=8, loc="lower left")
    return fig


def _trim(edges: np.ndarray, counts: np.ndarray, q: float = 1e-3) -> slice:
    """Bins between the ``q`` and ``1 - q`` quantiles of ``counts`` (so a few outliers do not squash the plot)."""
    c = np.cumsum(counts)
    if c.size == 0 or c[-1] <= 0:
        return slice(0, len(counts))
    lo = int(np.searchsorted(c, q * c[-1], side="left"))
    hi = int(np.searchsorted(c, (1 - q) * c[-1], side="left")) + 1
    return slice(lo, max(hi, lo + 1))


def _rebin(edges: np.ndarray, counts: np.ndarray, target: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Merge runs of ``r`` adjacent bins so about ``target`` remain (bins stay multiples of the stored ``eps``)."""
    r = max(1, int(np.ceil(len(counts) / target)))
    if r == 1:
        return edges, counts
    pad = (-len(counts)) % r
    counts = np.concatenate([counts, np.zeros(pad)])
    step = edges[1] - edges[0]
    new_edges = edges[0] + step * r * np.arange(len(counts) // r + 1)
    return new_edges, counts.reshape(-1, r).sum(1)


def _draw_hist(ax, edges: np.ndarray, counts: np.ndarray, color: str = "#4c72b0") -> None:
    sl = _trim(edges, counts)
    e, c = edges[sl.start : sl.stop + 1], counts[sl]
    e, c = _rebin(e, c.astype(np.float64))
    width = np.diff(e)
    total = c.sum()
    density = c / (total * width) if total else c
    ax.stairs(density, e, fill=True, color=color, alpha=0.55)
    ax.stairs(density, e, color=color, lw=0.8)


#: x-axis label of the histograms per site (``model_identity.site``)
SITE_AXIS = {"attention": "pre-out activation", "mlp": "MLP neuron activation (input of the MLP out-projection)"}


def layers_figure(layers: list[LayerHist], site: str = "attention") -> Figure:
    """Figure 1 (left): the average over a layer's neurons of their activation histograms, one panel per layer."""
    n = max(len(layers), 1)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, lh in zip(axes, layers):
        edges, density = layer_average(lh)
        _draw_hist(ax, edges, density * lh.eps)
        ax.axvline(0, color="0.3", lw=0.8, ls=":")
        ax.set_title(f"layer {lh.layer}: mean of {lh.width} neurons", fontsize=9)
        ax.set_xlabel(SITE_AXIS.get(site, "activation"))
        ax.set_ylabel("density")
    for ax in axes[len(layers) :]:
        ax.set_axis_off()
    return fig


def gallery_figure(
    neurons: list[tuple[NeuronScore, LayerHist]], n_heads: int | None = None, site: str = "attention"
) -> Figure:
    """Figure 1 (centre, right): each neuron's histogram with its mean (dashed), peak (solid) and zero (dotted).

    A neuron whose peak is a point mass says so in its title; its peak is drawn dotted, labelled "(point mass)",
    next to the peak without point masses (orange, solid). The bin-free KDE mode is dash-dotted green; a peak more
    than half a std from it (a spike the point-mass test missed, or a narrow mode) says so in the title."""
    n = max(len(neurons), 1)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(3.6 * cols, 2.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for rank, (ax, (s, lh)) in enumerate(zip(axes, neurons), start=1):
        _draw_hist(ax, lh.edges(), lh.hist[0].astype(np.float64), color="#6a51a3")
        ax.axvline(0, color="0.3", lw=0.9, ls=":", label="zero")
        ax.axvline(s.mean, color="#1f77b4", lw=1.4, ls="--", label=f"mean {s.mean:.3g}")
        if s.point_mass:  # the stored peak is a spike: label it, and draw the bulk's peak the score used
            ax.axvline(s.peak, color="#d62728", lw=1.4, ls=(0, (1, 1)), label=f"peak {s.peak:.3g} (point mass)")
            ax.axvline(s.peak_nopm, color="#ff7f0e", lw=1.4, label=f"peak w/o point mass {s.peak_nopm:.3g}")
        else:
            ax.axvline(s.peak, color="#d62728", lw=1.4, label=f"peak {s.peak:.3g}")
        if np.isfinite(s.mode):
            ax.axvline(s.mode, color="#2ca02c", lw=1.2, ls="-.", label=f"mode (KDE) {s.mode:.3g}")
        who = f"L{s.layer} n{s.neuron}"
        if n_heads and s.width % n_heads == 0:
            d_head = s.width // n_heads
            who += f" (h{s.neuron // d_head}.{s.neuron % d_head})"
        title = f"#{rank} {who}  score {s.score:.2f} ({s.modes} mode{'s' if s.modes != 1 else ''})"
        note = "\npoint mass at the peak" if s.point_mass else "\npeak far from the KDE mode" if s.peak_off_mode else ""
        ax.set_title(title + note, fontsize=9)
        ax.set_xlabel(SITE_AXIS.get(site, "activation"))
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[len(neurons) :]:
        ax.set_axis_off()
    return fig


def forest_figure(panels: list[tuple[str, list[tuple]]]) -> Figure:
    """A forest plot: one panel per ``(title, entries)``; each entry ``(label, estimate, low, high, decided, kind)`` is
    a point with its interval (filled when decided, hollow when not; ``kind`` "pair" in black, "excess" in grey, or
    any matplotlib colour), against a dashed line at 0. Used for the answer's paired differences (CE, nats) per
    fraction, and for several runs side by side (one colour per run)."""
    n = max(len(panels), 1)
    height = max(2.2, 0.42 * max((len(e) for _, e in panels), default=1) + 1.2)
    fig = Figure(figsize=(4.8 * n, height), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (title, entries) in zip(axes, panels):
        ys = np.arange(len(entries))[::-1]
        for y, (_label, est, lo, hi, decided, kind) in zip(ys, entries):
            color = {"pair": "black", "excess": "0.55"}.get(kind, kind)
            ax.plot([lo, hi], [y, y], color=color, lw=1.6)
            ax.plot([est], [y], "o", ms=6, color=color, mfc=color if decided else "white")
        ax.axvline(0, color="0.4", lw=0.9, ls="--")
        ax.set_yticks(ys, [e[0] for e in entries], fontsize=8)
        ax.set_xlabel("difference in cross-entropy (nats)")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    return fig


def faithfulness_figure(curves: dict[str, dict], metric_names: dict[str, str]) -> Figure:
    """Faithfulness curves side by side: one panel per metric (``curves[metric][method]``, a
    :class:`~knockout.inference.faithfulness.FaithfulnessCurve`), one line per method with its pointwise interval
    as a band, against the circuit size ``k``; dotted lines at 0 and 1, dashed at the curve's threshold."""
    methods = list(dict.fromkeys(m for by in curves.values() for m in by))
    colors = method_colors(methods)
    n = max(len(curves), 1)
    fig = Figure(figsize=(4.8 * n, 3.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (metric, by) in zip(axes, curves.items()):
        threshold = None
        for m, c in by.items():
            k = np.asarray(c.sizes)
            ax.plot(k, c.faithfulness, marker="o", ms=3, lw=1.6, color=colors[m], label=m)
            ax.fill_between(k, c.low, c.high, color=colors[m], alpha=0.15, lw=0)
            threshold = c.threshold
        for y in (0, 1):
            ax.axhline(y, color="0.5", lw=0.8, ls=":")
        if threshold is not None:
            ax.axhline(threshold, color="0.5", lw=0.8, ls="--")
        positive = [k for c in by.values() for k in c.sizes if k > 0]
        if positive and max(positive) > 20 * min(positive):  # sizes such as 1, 2, 4, ..., 270: a log axis
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_xlabel("units kept (k)")
        ax.set_ylabel("faithfulness")
        ax.set_title(f"by {metric_names.get(metric, metric)}", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=8, loc="upper left")
    return fig


def save_figure(fig: Figure, stem: Path, dpi: int = 110) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` (each atomically); returns both paths."""
    from knockout.runfolder import write_atomic

    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    write_atomic(paths[0], png_bytes(fig, dpi))
    buf = io.BytesIO()
    fig.savefig(buf, format="svg")
    write_atomic(paths[1], buf.getvalue())
    return paths


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
