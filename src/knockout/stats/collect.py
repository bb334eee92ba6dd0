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
from knockout.stats.running import DEFAULT_EPS, DEFAULT_LIMIT, HistGrid
from knockout.stats.statistics import Statistics


def collect_stats(
    model: torch.nn.Module,
    sites: Sequence[Site],
    batches: Sequence[Batch],
    eps: float = DEFAULT_EPS,
    limit: float | str = DEFAULT_LIMIT,
    meta: dict[str, str] | None = None,
    progress: bool = True,
    into: Statistics | None = None,
) -> Statistics:
    """Run ``model`` over ``batches`` and accumulate per-neuron statistics of every site's pre-out.

    Only positions where ``batch.valid`` is True (not padding) are counted. Memory does not grow with the number
    of tokens: each batch's activations are folded into the running statistics and dropped. The result can be
    merged with and extended by other statistics (its tensors are ordinary ones, not inference-mode tensors).

    Each batch goes to one of two halves (the even- and the odd-numbered batches), and the result is the two
    merged, with each half's centres (:meth:`Statistics.from_halves`): the split costs no extra work per batch,
    and the halves tell how well every centre is determined (:meth:`Statistics.centre_spread`). ``limit`` is a
    number or ``"auto"`` (:func:`knockout.stats.running.auto_limit`).

    ``into``: statistics to extend (and return) instead of new ones (``eps``, ``limit`` and ``meta`` are then
    theirs): the batches are added to them directly, and their halves' centres, which would no longer describe
    the data, are dropped.
    """
    if into is not None:
        if into.widths != [s.width for s in sites]:
            raise KnockoutError(
                f"cannot add pre-outs of widths {[s.width for s in sites]} to statistics of {into.widths}"
            )
        _collect(model, sites, batches, [into], progress)
        into.half_centres = into.half_tokens = None
        return into
    return Statistics.from_halves(*collect_halves(model, sites, batches, eps, limit, meta, progress))


def collect_halves(
    model: torch.nn.Module,
    sites: Sequence[Site],
    batches: Sequence[Batch],
    eps: float = DEFAULT_EPS,
    limit: float | str = DEFAULT_LIMIT,
    meta: dict[str, str] | None = None,
    progress: bool = True,
    batch_index: Sequence[int] | None = None,
) -> tuple[Statistics, Statistics]:
    """The statistics of the two halves of a collection (see :func:`collect_stats`): batch ``i`` goes to half
    ``batch_index[i] % 2`` (``batch_index``: each batch's index in the whole collection, default ``0, 1, ...``; a
    sharded collection passes its batches' global indices, so that its halves are the same batches as in one
    process). Both halves share one grid; ``meta`` is given to both."""
    widths = [s.width for s in sites]
    grid = HistGrid.of(eps, limit, widths)
    halves = (Statistics(widths, meta=meta, grid=grid), Statistics(widths, meta=meta, grid=grid))
    if batch_index is not None and len(batch_index) != len(batches):
        raise ValueError(f"{len(batch_index)} batch indices for {len(batches)} batches")
    parity = [i % 2 for i in (batch_index if batch_index is not None else range(len(batches)))]
    _collect(model, sites, batches, [halves[p] for p in parity], progress)
    for a, b in zip(halves[0].layers, halves[1].layers):  # an empty half (one batch; a shard of one parity) joins
        if a.count == 0 and b.count > 0:  # the other's device, so that every later step runs where the data is
            a._to(b.mean.device)
        elif b.count == 0 and a.count > 0:
            b._to(a.mean.device)
    return halves


def _collect(
    model: torch.nn.Module,
    sites: Sequence[Site],
    batches: Sequence[Batch],
    targets: Sequence[Statistics],
    progress: bool,
) -> None:
    """Add the pre-outs of ``batches[i]`` to ``targets[i]`` (one entry per batch, or one for all)."""
    device = input_device(model)
    current: dict = {}

    def record(site: Site, z: torch.Tensor) -> None:  # z: [batch, pos, width]
        # Outside inference mode, so that the statistics' tensors stay ordinary tensors (no copy at the end).
        with torch.inference_mode(False):
            current["target"].add(site.layer, z.flatten(0, 1).index_select(0, current["rows"].to(z.device)))

    with torch.inference_mode(), capture(sites, record):
        for i, batch in enumerate(tqdm(batches, desc="statistics", unit="batch", disable=not progress)):
            current["target"] = targets[i if len(targets) > 1 else 0]
            # the valid positions as row indices of the flattened [batch * pos, width] pre-out, found on the host
            # before the batch moves (a boolean mask would read its count back from the device at every layer)
            current["rows"] = batch.valid.flatten().nonzero().squeeze(1).to(device)
            batch = batch.to(device)
            model(**batch.inputs)
    for stats in {id(t): t for t in targets}.values():
        for layer in stats.layers:
            layer.finish()  # on an accelerator: the one read of the collection (NaN/inf?, bins in use)
