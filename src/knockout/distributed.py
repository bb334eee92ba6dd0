"""Data-parallel statistics and evaluation with ``torch.distributed`` (``torchrun`` or ``accelerate launch``).

Every rank holds the whole model and builds the same batches (they are deterministic); each rank runs on its
share of them and the partial results are combined so that every rank ends with the result of one process run over
all batches:

- statistics: histograms, ``count``, ``under``/``over``, ``min``/``max`` bit-exact; ``mean``/``m2`` equal up to
  float64 rounding, and the same bits on every rank (every rank merges the ranks' statistics in rank order with
  :meth:`~knockout.stats.running.LayerStats.merge`, as partial statistics are merged in one process, so a split of
  the data changes only the rounding);
- metrics: ``n`` and ``n_correct`` exact, ``ce_sum`` up to float rounding; per-document sums (``per_doc``, for
  paired comparisons) gathered from the ranks in the original batch order. A batch is one rank's whole unit of work
  and its per-document sums are computed within it, so they are the single-process sums bit for bit (given the same
  logits for that batch, as on CPU with the same thread count).

How a run uses it::

    from knockout import distributed as dist

    dist.init_from_env(device=device)           # no-op (returns False) in a plain single-process run
    batches = stats_batches(...)                # every rank builds the same list
    stats = dist.all_reduce_statistics(collect_stats(model, sites, dist.shard(batches), ...))
    metrics = dist.all_reduce_metrics(evaluate(model, dist.shard(eval_batches)))
    if dist.is_main():                          # every rank holds the same results; only rank 0 writes files
        stats.save(path)

or the two wrappers :func:`collect_stats_sharded` and :func:`evaluate_sharded`, which also pass the *global* batch
index to ``on_batch`` (resampling ablations seed their random inputs by batch index, so a rank must not number its
share from 0) and accept a rank whose share is empty. :func:`collect_stats_sharded` also keeps the collection's two
halves apart until they are all-reduced, so its statistics carry the halves' centres
(:meth:`~knockout.stats.Statistics.from_halves`), which a merge of whole statistics drops.

Sharding is round-robin: rank ``r`` of ``w`` takes items ``r, r + w, r + 2w, ...``. Batches built from length-sorted
or grouped documents then spread evenly over the ranks, and the union over ranks is every item exactly once. The
order in which batches are seen does not matter: statistics are order-independent by design (see
:mod:`knockout.stats.running`) and metrics are sums.

Statistics and metrics are exchanged with ``all_gather_object`` (pickled on the CPU; with ``nccl`` the bytes travel
through the current CUDA device); results are moved back to the device the statistics were on. Inputs are never
modified in place (they may be inference tensors made under ``torch.inference_mode``); the results are new,
ordinary tensors.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist

from knockout.data.batch import Batch
from knockout.errors import KnockoutError
from knockout.evaluation.evaluate import evaluate
from knockout.evaluation.metrics import Metrics
from knockout.sites import Site
from knockout.stats.collect import collect_halves
from knockout.stats.running import LayerStats
from knockout.stats.statistics import Statistics

log = logging.getLogger(__name__)

T = TypeVar("T")

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# -- process group --------------------------------------------------------------------------------------------------
class World(NamedTuple):
    """This process's place in a run: its ``rank`` among ``size`` processes. The runner reads it once, after joining
    the process group, and passes it down (methods get it in their context): rank 0 writes files and shows progress.
    """

    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        """True on rank 0 (and in a single-process run)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def single() -> World:
    """The world of a single-process run."""
    return World(0, 1)


def world() -> World:
    """``(rank, size)`` of this process; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return single()


def launch_world() -> World:
    """``(rank, size)`` as the launcher (``torchrun``, ``accelerate launch``) set them in ``RANK`` and
    ``WORLD_SIZE``, usable before any process group exists; ``(0, 1)`` when not launched so."""
    return World(int(os.environ.get("RANK") or 0), int(os.environ.get("WORLD_SIZE") or 1))


def is_main() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return world().is_main


def init_from_env(
    backend: str | None = None,
    device: torch.device | str | None = None,
    timeout: datetime.timedelta | None = None,
) -> bool:
    """Join the process group described by the launcher's environment; return whether the run is distributed.

    ``torchrun`` and ``accelerate launch`` set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Nothing
    is initialised when ``WORLD_SIZE`` is unset or 1. ``backend`` defaults to ``nccl`` when ``device`` (the model's
    device; default: CUDA if available) is a CUDA device and NCCL is available, else ``gloo``. With NCCL the current
    CUDA device is set to ``LOCAL_RANK``. Calling it again once initialised only reports the world size.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    world_size = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world_size <= 1:
        return False
    missing = [v for v in _LAUNCH_VARS if not os.environ.get(v)]
    if missing:
        raise KnockoutError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun or accelerate launch"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if "nccl" in backend:
        local = int(os.environ.get("LOCAL_RANK", int(os.environ["RANK"]) % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(device if device.type == "cuda" and device.index is not None else local)
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    rank, size = world()
    log.info("torch.distributed: rank %d of %d, backend %s", rank, size, dist.get_backend())
    return size > 1


@contextmanager
def process_group(device: torch.device | str | None = None) -> Iterator[bool]:
    """Join the launcher's process group for the body (:func:`init_from_env`) and leave it afterwards, also on
    error; yields whether the run is distributed. Inside an already initialised group it only reports that (and
    leaves the group to whoever joined it)."""
    if dist.is_available() and dist.is_initialized():
        yield dist.get_world_size() > 1
        return
    joined = init_from_env(device=device)
    try:
        yield joined
    finally:
        if joined:
            shutdown()


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single-process run). Used so that rank 0 has written a file
    before other ranks read it, or other ranks have read the old state before rank 0 replaces it."""
    if world()[1] > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (if one is initialised), e.g. in a ``finally`` at the end of a run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- sharding -------------------------------------------------------------------------------------------------------
def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """Indices of this rank's share of ``n`` items, round-robin: ``rank, rank + world_size, ...``."""
    if rank is None or world_size is None:
        rank, world_size = world()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(range(rank, n, world_size))


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of ``items`` (round-robin, see :func:`shard_indices`); the shares of all ranks together
    hold every item exactly once. A rank gets nothing when there are fewer items than ranks."""
    return [items[i] for i in shard_indices(len(items), rank, world_size)]


# -- reductions -----------------------------------------------------------------------------------------------------
def all_reduce_statistics(stats: Statistics) -> Statistics:
    """Merge every rank's ``stats`` into one :class:`Statistics`, the same (bit for bit) on every rank.

    Per layer, every rank's state (:meth:`~knockout.stats.running.LayerStats.state_dict`, on the CPU) is gathered to
    every rank, and each rank merges them in rank order 0, 1, ... into new statistics with
    :meth:`~knockout.stats.running.LayerStats.merge`: the same operations on the same values everywhere, and the
    same merge as of two statistics in one process. ``meta`` is rank 0's. Returns ``stats`` itself when the run is
    not distributed; otherwise a new object with ordinary (non-inference) tensors, each layer on the device its
    statistics were on. Every rank must call it (it is a collective).
    """
    rank, size = world()
    if size == 1:
        return stats
    with torch.inference_mode(False), torch.no_grad():
        header = {"widths": stats.widths, "eps": stats.eps, "limit": stats.limit, "meta": stats.meta}
        headers: list[dict] = [None] * size  # type: ignore[list-item]
        dist.all_gather_object(headers, header)
        for r, h in enumerate(headers):
            if (h["widths"], h["eps"], h["limit"]) != (stats.widths, stats.eps, stats.limit):
                raise KnockoutError(
                    f"rank {r} collected statistics with widths/eps/limit {(h['widths'], h['eps'], h['limit'])}, "
                    f"rank {rank} with {(stats.widths, stats.eps, stats.limit)}: every rank must use the same settings"
                )
        out = Statistics(stats.widths, meta=headers[0]["meta"], grid=stats.grid)
        for mine, res in zip(stats.layers, out.layers):
            home = mine.mean.device
            res._to(home)  # empty, on the layer's device
            states: list[dict] = [None] * size  # type: ignore[list-item]
            dist.all_gather_object(states, {k: t.cpu() for k, t in mine.state_dict().items()})
            for state in states:  # in rank order
                part = LayerStats(res.width, grid=res.grid)
                part.load_state_dict({k: t.to(home) for k, t in state.items()})
                res.merge(part)
    return out


def all_reduce_metrics(m: Metrics, batch_index: Sequence[int] | None = None) -> Metrics:
    """Sum every rank's :class:`Metrics`: ``n`` and ``n_correct`` exactly (Python ints), ``ce_sum`` (and the logit
    difference's ``ld_sum``) as the correctly rounded float64 sum (``math.fsum``) of the ranks' sums, the same on
    every rank. Returns ``m`` itself when the run is not distributed. Every rank must call it.

    Per-document sums (``m.per_doc``, on every rank alike) are gathered too: ``batch_index[i]`` is the index, in the
    full list of batches, of the ``i``-th batch this rank added to ``m``. The result holds every rank's per-batch
    sums in that global order, so its :meth:`~Metrics.doc_sums` equal those of one process evaluating all batches,
    bit for bit given the same logits (each batch's sums are computed within the batch, whichever rank runs it).
    """
    rank, size = world()
    if size == 1:
        return m
    docs = None
    if m.per_doc:
        per_batch = m.batch_doc_sums()
        if batch_index is None or len(batch_index) != len(per_batch):
            raise ValueError(
                f"per-document sums of {len(per_batch)} batches need their {len(per_batch)} global batch indices, "
                f"got {None if batch_index is None else len(batch_index)}"
            )
        docs = [(int(i), d) for i, d in zip(batch_index, per_batch)]
    parts: list[tuple[int, int, float, list | None, int, float]] = [None] * size  # type: ignore[list-item]
    dist.all_gather_object(parts, (int(m.n), int(m.n_correct), float(m.ce_sum), docs, m.n_contrast, m.ld_sum))
    if any((p[3] is None) != (docs is None) for p in parts):
        raise KnockoutError(f"rank {rank} evaluated with per_doc={m.per_doc}, another rank not: every rank must agree")
    out = Metrics(
        n=sum(p[0] for p in parts),
        n_correct=sum(p[1] for p in parts),
        ce_sum=math.fsum(p[2] for p in parts),
        per_doc=m.per_doc,
        n_contrast=sum(p[4] for p in parts),
        ld_sum=math.fsum(p[5] for p in parts),
    )
    if docs is not None:
        ordered = sorted((pair for p in parts for pair in p[3]), key=lambda pair: pair[0])  # type: ignore[union-attr]
        index = [i for i, _ in ordered]
        if len(set(index)) != len(index):
            dup = sorted({i for i in index if index.count(i) > 1})
            raise ValueError(f"batches {dup} were evaluated on more than one rank")
        for _, d in ordered:
            out.add_doc_sums(d)
    return out


# -- sharded passes -------------------------------------------------------------------------------------------------
def collect_stats_sharded(
    model: torch.nn.Module, sites: Sequence[Site], batches: Sequence[Batch], **kwargs
) -> Statistics:
    """:func:`~knockout.stats.collect_stats` on this rank's share of ``batches``, all-reduced over ranks. The same
    as ``collect_stats(model, sites, batches, **kwargs)`` in a single-process run (``into`` is not taken: extend
    statistics by merging). Each half of the collection (its
    even- and odd-numbered batches, by their index in ``batches``) is all-reduced on its own before the halves are
    merged. The progress bar (unless ``progress`` is given) is shown on rank 0 only."""
    kwargs.setdefault("progress", is_main())
    idx = shard_indices(len(batches))
    half_a, half_b = collect_halves(model, sites, [batches[i] for i in idx], batch_index=idx, **kwargs)
    return Statistics.from_halves(all_reduce_statistics(half_a), all_reduce_statistics(half_b))


def evaluate_sharded(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    on_batch: Callable[[int, Batch], None] | None = None,
    per_doc: bool = False,
) -> Metrics:
    """:func:`~knockout.evaluation.evaluate` on this rank's share of ``batches``, all-reduced over ranks.

    ``on_batch`` receives each batch's index in the full ``batches`` list (as in a single-process run), not its
    position in this rank's share. A rank whose share has no scored targets contributes no targets (instead of
    raising; its documents still count, with nothing scored); the error is raised, on every rank, only when no rank
    had any. ``per_doc``: also keep per-document sums, gathered
    from every rank in the order of ``batches`` (:func:`all_reduce_metrics`): the same as
    ``evaluate(model, batches, per_doc=True).doc_sums()``.
    """
    idx = shard_indices(len(batches))
    hook = None if on_batch is None else (lambda i, b: on_batch(idx[i], b))
    metrics = evaluate(model, [batches[i] for i in idx], on_batch=hook, per_doc=per_doc, allow_empty=True)
    metrics = all_reduce_metrics(metrics, idx)
    if metrics.n == 0:
        raise KnockoutError("the evaluation set has no scored targets; give more evaluation data")
    return metrics
