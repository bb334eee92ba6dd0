"""One streaming pass over a collection set: pre-out activations -> :class:`Statistics`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from knockout.data.batch import Batch
from knockout.devices import input_device
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
) -> Statistics:
    """Run ``model`` over ``batches`` and accumulate per-neuron statistics of every site's pre-out.

    Only positions where ``batch.valid`` is True (not padding) are counted. Memory does not grow with the number
    of tokens: each batch's activations are folded into the running statistics and dropped. The result can be
    merged with and extended by other statistics (its tensors are ordinary ones, not inference-mode tensors).
    """
    stats = Statistics([s.width for s in sites], eps=eps, limit=limit, meta=meta)
    device = input_device(model)
    current: dict[str, torch.Tensor] = {}

    def record(site: Site, z: torch.Tensor) -> None:  # z: [batch, pos, width]
        rows = current["rows"]
        stats.add(site.layer, z.flatten(0, 1).index_select(0, rows.to(z.device)))

    with torch.inference_mode(), capture(sites, record):
        for batch in tqdm(batches, desc="statistics", unit="batch", disable=not progress):
            batch = batch.to(device)
            # the valid positions as row indices of the flattened [batch * pos, width] pre-out, found once per
            # batch (a boolean mask would read its count back from the device at every layer)
            current["rows"] = batch.valid.flatten().nonzero().squeeze(1)
            model(**batch.inputs)
    for layer in stats.layers:  # clone out of inference mode, so that merge/add work on the result
        layer.load_state_dict(layer.state_dict())
    return stats
