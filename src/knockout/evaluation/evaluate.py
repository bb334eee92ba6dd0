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
) -> Metrics:
    """Top-1 and cross-entropy of ``model`` over ``batches``.

    Works for every task: ``logits[b, t]`` is scored against ``targets[b, t]`` (next-token or masked-token targets,
    ``IGNORE`` elsewhere), or ``logits[b]`` against ``targets[b]`` (image classes). ``on_batch(index, batch)`` is
    called before each forward pass, for ablations whose values depend on the input (resampling).
    """
    device = input_device(model)
    metrics = Metrics()
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        if on_batch is not None:
            on_batch(i, batch)
        logits = model(**batch.inputs).logits
        metrics.add(logits, batch.targets)
    if metrics.n == 0:
        raise KnockoutError("the evaluation set has no scored targets; give more evaluation data")
    return metrics
