"""Evaluate a (possibly ablated) model on fixed batches."""

from __future__ import annotations

import functools
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
    share of a data-parallel evaluation may have none; its rows still count as documents). Contrast batches (task
    prompts with a correct and an incorrect answer) add the logit difference (:class:`Metrics`).
    """
    device = input_device(model)
    metrics = Metrics(per_doc=per_doc)
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        if on_batch is not None:
            on_batch(i, batch)
        logits, targets, contrast = forward_scored(model, batch)
        metrics.add(logits, targets, contrast)
    if metrics.n == 0 and not allow_empty:
        raise KnockoutError("the evaluation set has no scored targets; give more evaluation data")
    return metrics


def forward_scored(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logits, targets, contrast)`` of one batch (already on the model's device). When the batch names the few
    positions that hold its scored targets (``batch.keep``, task prompts) and the model takes ``logits_to_keep``, the
    logits are computed at those positions only, and the targets cut to match."""
    if batch.keep is not None and _takes_logits_to_keep(type(model)):
        logits = model(**batch.inputs, logits_to_keep=batch.keep).logits
        cut = lambda t: None if t is None else t[:, batch.keep]  # noqa: E731
        return logits, cut(batch.targets), cut(batch.contrast)
    return model(**batch.inputs).logits, batch.targets, batch.contrast


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return False
