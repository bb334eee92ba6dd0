"""Callbacks: what a sweep tells an experiment tracker (or any other observer) while it runs.

Subclass :class:`Callback` and override the methods you need (each is a no-op by default), then pass instances to
``run_sweep(cfg, callbacks=[...])``. The sweep calls, in this order:

1. :meth:`Callback.on_start` once, with the resolved config (``config.json``'s contents: every setting and the
   ``resolved`` record: model identity and commit, versions, data identity);
2. :meth:`Callback.on_row` for every row of the run: on a resumed run first for the rows already stored (in their
   order in ``results.jsonl``), then for each new row right after it is stored; so the rows a callback sees are
   exactly ``results.jsonl``'s, in its order;
3. :meth:`Callback.on_end` once, after the last row and, with ``run_sweep(..., report=True)`` (the CLI always), after
   the report is written, with the run folder and its files;

or :meth:`Callback.on_error` instead of ``on_end`` when the sweep raises (the error is raised again afterwards).
Under ``torchrun`` only rank 0 calls callbacks. Ready-made trackers: :mod:`knockout.tracking` (MLflow, W&B).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from knockout import runfolder
from knockout.errors import KnockoutError
from knockout.runfolder import ResultRow

log = logging.getLogger(__name__)


class Callback:
    """Base class of sweep callbacks: every method does nothing; override what you need (see the module docs)."""

    def on_start(self, config: dict) -> None:
        """The run starts: ``config`` is what ``config.json`` holds (settings, and ``config["resolved"]``)."""

    def on_row(self, row: ResultRow, doc_summary: dict) -> None:
        """``row`` was stored in ``results.jsonl``; ``doc_summary`` (:func:`doc_summary`) summarises its
        per-document metrics (``{}`` when the row has no per-document sums)."""

    def on_end(self, run_dir: Path, files: list[Path]) -> None:
        """The run is complete: ``files`` (:func:`run_files`) are the run folder's results, config and report."""

    def on_error(self, error: BaseException) -> None:
        """The sweep raised ``error`` (also ``KeyboardInterrupt``) after :meth:`on_start`; it is raised again."""


class Callbacks:
    """Calls each of ``callbacks`` in turn (the sweep's single way of notifying them)."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise KnockoutError(f"callbacks must be knockout Callback instances, got {type(cb).__name__}")

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def start(self, config: dict) -> None:
        for cb in self.callbacks:
            cb.on_start(config)

    def row(self, row: ResultRow, sums: dict | None) -> None:
        if not self.callbacks:
            return
        summary = doc_summary(sums)
        for cb in self.callbacks:
            cb.on_row(row, summary)

    def end(self, run_dir: Path, files: list[Path]) -> None:
        for cb in self.callbacks:
            cb.on_end(run_dir, files)

    def error(self, error: BaseException) -> None:
        """Tell every callback; a callback that fails here is logged, so the others and the original error go on."""
        for cb in self.callbacks:
            try:
                cb.on_error(error)
            except Exception as e:  # the sweep's own error matters more
                log.warning("callback %s failed while handling an error: %s", type(cb).__name__, e)


def doc_summary(sums: dict | None) -> dict:
    """A row's per-document summary from its sums (``{"n", "ce_sum", "correct"}``, ``[n_docs]`` each, as
    :meth:`knockout.evaluation.Metrics.doc_sums` gives them), over the documents with at least one scored target:

    ``n_docs``; ``ce_mean`` and ``ce_std`` (mean and sample standard deviation, ddof 1, of each document's mean
    cross-entropy in nats); ``top1_mean`` and ``top1_std`` (the same for its top-1 accuracy). A standard deviation
    of fewer than two documents is ``None``. ``{}`` when ``sums`` is ``None``."""
    if sums is None:
        return {}
    n = np.asarray(sums["n"], dtype=np.float64)
    keep = n > 0
    ce = np.asarray(sums["ce_sum"], dtype=np.float64)[keep] / n[keep]
    top1 = np.asarray(sums["correct"], dtype=np.float64)[keep] / n[keep]
    out: dict = {"n_docs": int(keep.sum())}
    for name, values in (("ce", ce), ("top1", top1)):
        out[f"{name}_mean"] = float(values.mean()) if len(values) else None
        out[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
        if out[f"{name}_std"] is not None and not math.isfinite(out[f"{name}_std"]):
            out[f"{name}_std"] = None
    return out


def run_files(run_dir: str | Path) -> list[Path]:
    """The files a tracker keeps of a finished run: ``config.json``, ``results.jsonl``, ``results.csv`` and every
    file of ``report/`` (those that exist), in that order (the report's sorted by path)."""
    run_dir = Path(run_dir)
    names = (runfolder.CONFIG_FILE, runfolder.RESULTS_FILE, runfolder.RESULTS_CSV)
    files = [run_dir / name for name in names if (run_dir / name).is_file()]
    report = run_dir / runfolder.REPORT_DIR
    if report.is_dir():
        files += sorted(p for p in report.rglob("*") if p.is_file())
    return files


def replay(store_rows: Sequence[ResultRow], stored_docs: dict, callbacks: Callbacks) -> None:
    """Tell ``callbacks`` about rows already stored when a run resumes (see the module docs)."""
    for row in store_rows:
        callbacks.row(row, stored_docs.get(row.key))
