"""Metrics (top-1, cross-entropy) and evaluation of causal LMs, masked LMs and image classifiers."""

from knockout.evaluation.evaluate import evaluate
from knockout.evaluation.metrics import Metrics

__all__ = ["Metrics", "evaluate"]
