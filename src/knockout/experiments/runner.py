"""The sweep: methods x fractions x seeds -> one results row each, resumable; and a statistics-only run.

This module orchestrates; both runs start with :func:`knockout.experiments.prepare.prepare` (checks, model, sites,
inputs), the run folder's files are written through :mod:`knockout.runfolder`, the batches are built by
:mod:`knockout.data.tasks`, and the methods come from the registry in :mod:`knockout.ablation`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from knockout import distributed, reporting, runfolder
from knockout.ablation.methods import get_method
from knockout.config import SweepConfig
from knockout.errors import KnockoutError
from knockout.experiments.callbacks import Callback, Callbacks, run_files
from knockout.experiments.circuits import keep_sets
from knockout.experiments.engine import (
    NeuronSet,
    RowEngine,
    ablate_sets,
    collect_run_stats,
    run_targets,
    warn_clipped,
)
from knockout.experiments.prepare import Prepared, prepare
from knockout.inference.sequential import Plan, SequentialTest
from knockout.loading import LoadedModel, resolve_device
from knockout.reporting.results import RunResults, load_run
from knockout.stats import centres
from knockout.stats.running import hist_bytes, size_text
from knockout.stats.statistics import Statistics

log = logging.getLogger(__name__)


def run_stats(cfg: SweepConfig, path: str | Path, progress: bool = True) -> Statistics:
    """Collect the statistics of ``cfg``'s model and data (its model, data and histogram settings) and write them
    to ``path`` (``.safetensors``); returns them. Under ``torchrun`` every rank collects its share and rank 0
    writes."""
    with distributed.process_group(resolve_device(cfg.device)):
        run = prepare(cfg, distributed.world(), stats_file=path)
        stats = collect_run_stats(run, progress)
        stats.check_finite("the collected statistics")
        if run.world.is_main:
            stats.save(path)
        warn_clipped(stats)
        return stats


def describe_stats(stats: Statistics) -> str:
    """One line about collected statistics: size, largest peak-mean gap, clipped share and neurons, point-mass peaks
    and the histograms' memory."""
    gap = max(float((s.peak() - s.mean).abs().max()) for s in stats.layers)
    clipped = max(s.clipped_fraction for s in stats.layers)
    n_clipped = sum(int(((s.under + s.over) > 0).sum()) for s in stats.layers)
    n_pm = sum(int(centres.point_mass(s).sum()) for s in stats.layers)
    return (
        f"{len(stats)} layers x {stats.widths[0]} neurons, {stats.n_tokens} tokens, "
        f"largest |peak - mean| {gap:.4f}, clipped {100 * clipped:.3f}% ({n_clipped} neurons with a value outside "
        f"±{stats.limit:g}), point-mass peaks {n_pm} ({100 * n_pm / max(sum(stats.widths), 1):.2f}% of neurons), "
        f"histograms {size_text(hist_bytes(stats))}"
    )


def run_sweep(
    cfg: SweepConfig,
    progress: bool = True,
    loaded: LoadedModel | None = None,
    restart: bool = False,
    callbacks: Sequence[Callback] = (),
    report: bool = False,
) -> RunResults | None:
    """Run (or resume) the sweep of ``cfg``; returns its results as data (:func:`knockout.reporting.load_run`;
    path-like: ``Path(results)`` is the run folder), on the process that writes the folder (``None`` on the other
    ranks of a torchrun).

    For each seed: the unablated baseline, then for each method and fraction the ablated evaluation. Rows already
    in the folder's results are skipped, so re-running the same command resumes an interrupted run. ``restart``
    moves an existing run folder aside (``<out>.old-<timestamp>``) and starts afresh. ``loaded``: the model of
    ``cfg`` when the caller has it loaded already. ``report``: write the report (``report/``) at the end, as the CLI
    does. ``callbacks``: :class:`~knockout.experiments.callbacks.Callback` instances told about the start, every
    row and the end (after the report), e.g. the trackers of :mod:`knockout.tracking`.

    Launched with ``torchrun`` (``WORLD_SIZE`` > 1) it runs data-parallel: every rank loads the model, reads the same
    resume state and builds the same batches; statistics and every evaluation are sharded over the ranks and
    all-reduced, so all ranks hold the same rows (and per-document sums); only rank 0 writes files. A barrier
    separates the reading of the existing run folder from the first write.
    """
    notify = Callbacks(callbacks)  # checked before anything runs
    if cfg.scan.unit is not None:
        raise KnockoutError("this config is a scan's (scan.unit is set); run it with `knockout scan` (run_scan)")
    with distributed.process_group(resolve_device(cfg.device)):
        try:
            run = prepare(cfg, distributed.world(), restart=restart, loaded=loaded)
            out = Path(cfg.out)
            if not run.world.is_main:  # under torchrun, rank 0 alone reports
                notify = Callbacks()
            try:
                if cfg.ablate is not None:  # named component sets instead of random fractions
                    run_targets(run, ablate_sets(run), progress and run.world.is_main, notify)
                elif cfg.keeps:  # circuits kept, the rest ablated (knockout.experiments.circuits)
                    run_targets(run, keep_sets(cfg, run.sites), progress and run.world.is_main, notify)
                else:
                    _sweep(run, progress and run.world.is_main, notify)
                results = None
                if run.world.is_main:
                    folder = runfolder.RunFolder(out)  # read once, for the results and the report
                    results = _quietly(lambda: load_run(folder))  # the answer, computed once for the report too
                    if report:
                        _quietly(lambda: reporting.write_report(folder, answer=results.answer))
                    notify.end(out, run_files(out))
            except BaseException as e:
                notify.error(e)
                raise
        finally:
            runfolder.unlock_run(cfg.out)  # the run folder's lock, taken by rank 0 in prepare
        return results


def _quietly(make):
    """``make()`` without numpy's floating-point warnings (reports compute from stored numbers; a warning line in the
    middle of the output only confuses)."""
    import warnings

    import numpy as np

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return make()


def _sweep(run: Prepared, progress: bool, notify: Callbacks | None = None) -> None:
    """The rows of a prepared run (see :func:`run_sweep`): every method at its fractions for the fixed seeds, then,
    with ``seeds='auto'``, the sets the sequential design asks for (:func:`_add_sets`)."""
    cfg = run.cfg
    classes = [get_method(m) for m in cfg.methods]
    per_seed = sum(len(cfg.fractions_of(c.name)) for c in classes)
    engine = RowEngine(run, progress, notify, planned=cfg.fixed_seeds, rows_per_seed=per_seed)
    for seed in cfg.fixed_seeds:
        engine.ensure(seed, [(c, NeuronSet(f)) for c in classes for f in cfg.fractions_of(c.name)])
    if cfg.sequential:
        _add_sets(cfg, engine, classes)
    engine.close()


def _add_sets(cfg: SweepConfig, engine: RowEngine, classes: list) -> None:
    """``--seeds auto``: at each decision fraction, replay the sequential design on the stored sums and evaluate the
    sets its next look needs (only the methods of pairs not yet decided), until every fraction's design is finished
    (all decided, futile, or the maximum reached). With documents on demand (``--decide-max-docs``) the next look
    may also need more documents: the sets used so far grow to them and new sets are evaluated on them
    (:meth:`RowEngine.ensure`). Replaying makes a resumed run take the same path."""
    plan = Plan.from_dict(cfg.design())
    by_name = {c.name: c for c in classes}
    while True:
        todo = []
        for fraction in cfg.decide.fractions:
            contenders = [c.name for c in classes if not c.is_bound and fraction in cfg.fractions_of(c.name)]
            if len(contenders) < 2:
                continue
            test = SequentialTest(plan, contenders, "ce")
            test.replay(engine.sums(fraction, contenders))
            if test.next_sets is not None:
                todo.append((fraction, test.next_sets, test.methods_needed(), test.next_docs))
                more = test.next_docs is not None and test.docs_used and test.next_docs > test.docs_used[-1]
                log.info(
                    "at %g: %d pair(s) undecided after %d sets; adding sets up to %d%s",
                    fraction, len(test.undecided), plan.looks[test.looks_done - 1], test.next_sets,
                    f", documents up to {test.next_docs} (they limit the interval)" if more else "",
                )  # fmt: skip
        if not todo:
            return
        for fraction, n_sets, methods, n_docs in todo:
            for seed in range(n_sets):
                engine.ensure(seed, [(by_name[m], NeuronSet(fraction)) for m in methods], n_docs)


def run_models(
    cfg: SweepConfig,
    models: list[str],
    progress: bool = True,
    restart: bool = False,
    callbacks: Sequence[Callback] = (),
) -> tuple[list[RunResults | None], Path | None]:
    """The sweep of ``cfg`` on each of ``models`` (the same data, documents and rules: give ``eval_docs`` so that the
    evaluation documents are the same whatever the tokenizer), each into ``cfg.out/<model>``, then their comparison
    into ``cfg.out/compare`` (:func:`knockout.reporting.compare_runs`, at the decision fractions). Returns every run's
    results and the comparison's page (``None`` on torchrun ranks other than 0)."""
    from knockout.reporting import compare_runs
    from knockout.runfolder import model_label

    if len(models) < 2 or len(set(models)) < len(models):
        raise KnockoutError(f"--models needs two or more different models, got {','.join(models)}")
    if cfg.eval_docs is None:
        raise KnockoutError(
            "--models compares models on the same evaluation documents: give --eval-docs N (a token count would cut "
            "the documents differently for each tokenizer)"
        )
    labels = [model_label(m) for m in models]
    if len(set(labels)) < len(labels):
        labels = [f"{label}-{i + 1}" for i, label in enumerate(labels)]
    out = Path(cfg.out)
    results = []
    for model, label in zip(models, labels):
        run_cfg = dataclasses.replace(cfg, model=model, out=str(out / label))
        results.append(run_sweep(run_cfg, progress, restart=restart, callbacks=callbacks, report=True))
    if any(r is None for r in results):
        return results, None
    answers = [r.answer for r in results]
    page = _quietly(
        lambda: compare_runs([r.dir for r in results], out / "compare", cfg.decide.fractions, labels, answers)
    )
    return results, page
