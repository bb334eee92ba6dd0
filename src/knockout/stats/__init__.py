"""Streaming per-neuron statistics of the pre-out (mean, variance, min, max, eps-histogram -> peak)."""

from knockout.stats.collect import collect_stats
from knockout.stats.running import DEFAULT_EPS, DEFAULT_LIMIT, HistGrid, LayerStats
from knockout.stats.statistics import Statistics

__all__ = ["DEFAULT_EPS", "DEFAULT_LIMIT", "HistGrid", "LayerStats", "Statistics", "collect_stats"]
