"""Evaluate a (possibly ablated) model on fixed batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from knockout.data.batch import Batch
from knockout.devices import input_device
from knockout.errors import KnockoutError
from knockout.evaluation.metrics import Metrics


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    on_batch: Callable[[int, Batch], None] | None = None,
    per_doc: bool = False,
    allow_empty: bool = False,
) -> Metrics:
    """Top-1 and cross-entropy of ``model`` over ``batches``.

    Works for every task: ``logits[b, t]`` is scored against ``targets[b, t]`` (next-token or masked-token targets,
    ``IGNORE`` elsewhere), or ``logits[b]`` against ``targets[b]`` (image classes). ``on_batch(index, batch)`` is
    called before each forward pass, for ablations whose values depend on the input (resampling). ``per_doc``: also
    keep per-document sums (:meth:`Metrics.doc_sums`; one document per batch row), for paired comparisons.
    ``allow_empty``: return metrics with ``n == 0`` instead of raising when no batch has a scored target (a rank's
    share of a data-parallel evaluation may have none; its rows still count as documents).
    """
    device = input_device(model)
    metrics = Metrics(per_doc=per_doc)
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        if on_batch is not None:
            on_batch(i, batch)
        logits = model(**batch.inputs).logits
        metrics.add(logits, batch.targets)
    if metrics.n == 0 and not allow_empty:
        raise KnockoutError("the evaluation set has no scored targets; give more evaluation data")
    return metrics
