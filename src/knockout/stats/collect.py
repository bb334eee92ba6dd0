"""One streaming pass over a collection set: pre-out activations -> :class:`Statistics`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from knockout.data.batch import Batch
from knockout.devices import input_device
from knockout.errors import KnockoutError
from knockout.hooks import capture
from knockout.sites import Site
from knockout.stats.running import DEFAULT_EPS, DEFAULT_LIMIT
from knockout.stats.statistics import Statistics


def collect_stats(
    model: torch.nn.Module,
    sites: Sequence[Site],
    batches: Sequence[Batch],
    eps: float = DEFAULT_EPS,
    limit: float = DEFAULT_LIMIT,
    meta: dict[str, str] | None = None,
    progress: bool = True,
    into: Statistics | None = None,
) -> Statistics:
    """Run ``model`` over ``batches`` and accumulate per-neuron statistics of every site's pre-out.

    Only positions where ``batch.valid`` is True (not padding) are counted. Memory does not grow with the number
    of tokens: each batch's activations are folded into the running statistics and dropped. ``into``: statistics
    to extend (and return) instead of new ones (``eps``, ``limit`` and ``meta`` are then theirs). The result can
    be merged with and extended by other statistics (its tensors are ordinary ones, not inference-mode tensors).
    """
    if into is None:
        stats = Statistics([s.width for s in sites], eps=eps, limit=limit, meta=meta)
    elif into.widths != [s.width for s in sites]:
        raise KnockoutError(f"cannot add pre-outs of widths {[s.width for s in sites]} to statistics of {into.widths}")
    else:
        stats = into
    device = input_device(model)
    current: dict[str, torch.Tensor] = {}

    def record(site: Site, z: torch.Tensor) -> None:  # z: [batch, pos, width]
        # Outside inference mode, so that the statistics' tensors stay ordinary tensors (no copy at the end).
        with torch.inference_mode(False):
            stats.add(site.layer, z.flatten(0, 1).index_select(0, current["rows"].to(z.device)))

    with torch.inference_mode(), capture(sites, record):
        for batch in tqdm(batches, desc="statistics", unit="batch", disable=not progress):
            # the valid positions as row indices of the flattened [batch * pos, width] pre-out, found on the host
            # before the batch moves (a boolean mask would read its count back from the device at every layer)
            current["rows"] = batch.valid.flatten().nonzero().squeeze(1).to(device)
            batch = batch.to(device)
            model(**batch.inputs)
    for layer in stats.layers:
        layer.finish()  # on an accelerator: the one read of the collection (NaN/inf?, bins in use)
    return stats
