"""The sweep: methods x fractions x seeds -> one results row each, resumable; and a statistics-only run.

This module orchestrates; both runs start with :func:`knockout.experiments.prepare.prepare` (checks, model, sites,
inputs), the run folder's files are written through :mod:`knockout.runfolder`, the batches are built by
:mod:`knockout.data.tasks`, and the methods come from the registry in :mod:`knockout.ablation`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from knockout import distributed, runfolder
from knockout.ablation.methods import MethodContext, get_method
from knockout.ablation.selection import NeuronSelection
from knockout.data.batch import Batch
from knockout.data.packing import scored_fraction
from knockout.data.tasks import SEED_DEPENDENT_TASKS, eval_batches, stats_batches
from knockout.devices import model_dtype
from knockout.distributed import World
from knockout.errors import KnockoutError
from knockout.evaluation.evaluate import evaluate
from knockout.evaluation.metrics import Metrics
from knockout.experiments.callbacks import Callback, Callbacks, replay, run_files
from knockout.experiments.config import SweepConfig
from knockout.experiments.prepare import (
    Prepared,
    check_stats_source,
    environment,
    prepare,
    stats_meta,
    stats_provenance,
)
from knockout.inference.paired import DocSums
from knockout.inference.sequential import SequentialTest
from knockout.loading import DTYPES, LoadedModel, load_model, resolve_device
from knockout.reporting.results import RunResults, load_run
from knockout.runfolder import ResultRow, ResultStore
from knockout.stats import centres
from knockout.stats.running import (
    HistGrid,
    LayerStats,
    check_hist_memory,
    clip_remedy,
    describe_window,
    hist_bytes,
    size_text,
)
from knockout.stats.statistics import Statistics

log = logging.getLogger(__name__)


def collect_run_stats(run: Prepared, progress: bool = True) -> Statistics:
    """Statistics of the model's sites on the collection split of ``run`` (``knockout stats`` and sweeps).

    Under ``torchrun`` each rank collects its share of the batches and the shares are all-reduced
    (:func:`knockout.distributed.collect_stats_sharded`): every rank returns the statistics of all batches."""
    cfg = run.cfg
    check_hist_memory([s.width for s in run.sites], cfg.eps, cfg.hist_limit)
    log.info("statistics: %s", describe_window([s.width for s in run.sites], cfg.eps, cfg.hist_limit))
    batches = stats_batches(run.spec, run.inputs)
    if run.inputs.task != "image":
        log.info("statistics: %.1f%% of the computed positions are counted", 100 * scored_fraction(batches, "valid"))
    meta = stats_meta(run.spec, run.identity, run.data_id)
    return distributed.collect_stats_sharded(
        run.loaded.model, run.sites, batches, eps=cfg.eps, limit=cfg.hist_limit, meta=meta,
        progress=progress and run.world.is_main,
    )  # fmt: skip


def obtain_stats(run: Prepared, progress: bool = True) -> tuple[Statistics, bool]:
    """The run's statistics: the run folder's own if present (and of this model), else loaded from
    ``cfg.stats_path`` or collected. Returns them and whether they still have to be saved to the run folder."""
    cfg = run.cfg
    path = Path(cfg.out) / runfolder.STATS_FILE
    source = path if path.is_file() else (Path(cfg.stats_path) if cfg.stats_path else None)
    if source is not None:
        stats = Statistics.load(source)
        check_stats_source(stats, run, source, given=source != path)
        if stats.grid != HistGrid.of(cfg.eps, cfg.hist_limit, stats.widths):
            limit = "auto" if stats.grid.auto else stats.limit
            raise KnockoutError(
                f"statistics in {str(source)!r} use eps={stats.eps}, hist limit={limit}; "
                f"pass --eps {stats.eps} --hist-limit {limit} or recollect them"
            )
        log.info("using statistics from %s (%d tokens)", source, stats.n_tokens)
    else:
        stats = collect_run_stats(run, progress)
    stats.check_finite(f"statistics in {str(source)!r}" if source is not None else "the collected statistics")
    warn_clipped(stats)
    return stats, source != path


def warn_clipped(stats: Statistics) -> None:
    """Warn where values fell outside the histogram window: per layer, and naming the neurons."""
    for i, layer in enumerate(stats.layers):
        if layer.clipped_fraction > 1e-3:
            log.warning(
                "layer %d: %.2f%% of activations lie outside ±%g and are left out of the peak; %s",
                i,
                100 * layer.clipped_fraction,
                stats.limit,
                clip_remedy(stats.grid),
            )
        warn_clipped_neurons(i, layer)


def warn_clipped_neurons(layer_index: int, layer: LayerStats, threshold: float = 1e-3, shown: int = 10) -> None:
    """Warn, naming the layer and neurons, where a neuron has more than ``threshold`` of its values outside the
    histogram window (:func:`knockout.stats.centres.clipped_neurons`), and say what its centres then are."""
    bad = centres.clipped_neurons(layer, threshold)
    if not bad:
        return
    frac = centres.clipped(layer)
    listed = ", ".join(f"{i} ({100 * float(frac[i]):.2f}%)" for i in bad[:shown])
    log.warning(
        "layer %d: %d neurons have more than %g%% of their values outside ±%g: %s%s. Their peak (and mode, "
        "peak@EPS, peak-smooth) is taken over the values inside the window only; their median counts the clipped "
        "values. %s",
        layer_index,
        len(bad),
        100 * threshold,
        layer.limit,
        listed,
        f" and {len(bad) - shown} more" if len(bad) > shown else "",
        clip_remedy(layer.grid)[0].upper() + clip_remedy(layer.grid)[1:],
    )


def _evaluate(model: torch.nn.Module, batches: list[Batch], world: World, on_batch=None) -> Metrics:
    """:func:`evaluate` on every batch, keeping per-document sums; in a distributed run on this rank's share,
    all-reduced, with the per-document sums of all ranks gathered in batch order (every rank holds them all)."""
    if world.distributed:
        return distributed.evaluate_sharded(model, batches, on_batch=on_batch, per_doc=True)
    return evaluate(model, batches, on_batch=on_batch, per_doc=True)


def load_generator(cfg: SweepConfig, loaded: LoadedModel) -> LoadedModel | None:
    """The causal LM that writes ``resample-text``'s text when it is not the model itself (``--resample-model``),
    loaded on the model's device and in its dtype; ``None`` otherwise."""
    spec = cfg.resample.model
    if spec is None or "resample-text" not in cfg.methods:
        return None
    dtype = model_dtype(loaded.model)
    dtype_name = next((k for k, v in DTYPES.items() if v == dtype), "auto")
    generator = load_model(
        spec, task="causal", dtype=dtype_name, device=str(loaded.device), trust_remote_code=cfg.trust_remote_code
    )
    if generator.task != "causal":
        raise KnockoutError(f"--resample-model must be a causal LM, got a {generator.task} model")
    return generator


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
                    from knockout.experiments.targets import ablate_sets, run_targets

                    run_targets(run, ablate_sets(run), progress and run.world.is_main, notify)
                else:
                    _sweep(run, progress and run.world.is_main, notify)
                if run.world.is_main:
                    if report:
                        _write_report(out)
                    notify.end(out, run_files(out))
            except BaseException as e:
                notify.error(e)
                raise
        finally:
            runfolder.unlock_run(cfg.out)  # the run folder's lock, taken by rank 0 in prepare
        return load_run(cfg.out) if run.world.is_main else None


def run_record(run: Prepared, used: float, stats: Statistics | None = None) -> dict:
    """What a run resolved, stored as config.json's ``resolved``: task, positions used (``used``: the share of
    computed evaluation positions that are scored), model identity and revision, site modules, device, dtype,
    versions, data identity, and where the statistics came from."""
    loaded, model = run.loaded, run.loaded.model
    return {
        "task": loaded.task,
        "positions_used": {"eval_scored_fraction": round(used, 6), "sort_by_length": run.spec.sort_by_length},
        "model_identity": run.identity,
        "model_revision": {"requested": loaded.revision, "commit": loaded.commit},
        "site_modules": [s.name for s in run.sites],
        "device": str(loaded.device),
        "dtype": str(model_dtype(model)),
        "device_map": {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()} or None,
        "environment": environment(),
        "data_identity": run.data_id,
        "statistics": None if stats is None else stats_provenance(stats, run.cfg.stats_path),
    }


def _write_report(run_dir: Path) -> Path:
    """The run's report (:func:`knockout.reporting.write_report`), without numpy's floating-point warnings."""
    from knockout.reporting import write_report

    return _quietly(lambda: write_report(run_dir))


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
    cfg, loaded, world = run.cfg, run.loaded, run.world
    out = Path(cfg.out)
    classes = [get_method(m) for m in cfg.methods]
    for cls in classes:
        if loaded.task not in cls.tasks:
            raise KnockoutError(f"method {cls.name!r} does not apply to {loaded.task} models")
    seeds = cfg.fixed_seeds
    first_batches = eval_batches(run.spec, run.inputs, seeds[0])
    used = scored_fraction(first_batches) if loaded.task != "image" else 1.0
    if world.is_main:
        log.info(
            "evaluation: %.1f%% of the computed positions are scored targets%s",
            100 * used,
            " (batches sorted by length)" if run.spec.sort_by_length else "",
        )
    stats, save_stats = None, False
    if any(c.needs_stats for c in classes):
        stats, save_stats = obtain_stats(run, progress)
    rows = _Rows(run, classes, stats, first_batches, progress)
    resolved = run_record(run, used, stats)
    distributed.barrier()  # every rank has read the folder's state; rank 0 may now write
    config = json.loads(json.dumps({**cfg.to_dict(), "resolved": resolved}))  # JSON types, as config.json holds
    if world.is_main:
        runfolder.write_config(out, config)
        if save_stats:
            stats.save(out / runfolder.STATS_FILE)
    notify = notify or Callbacks()
    notify.start(config)
    replay(list(rows.store.rows.values()), rows.docs, notify)  # a resumed run's stored rows first
    rows.notify = notify
    for seed in seeds:
        rows.ensure(seed, [(c, f) for c in classes for f in cfg.fractions_of(c.name)])
    if cfg.sequential:
        _add_sets(cfg, rows, classes)
    rows.close()
    distributed.barrier()  # rank 0's files are complete when run_sweep returns on any rank


def _add_sets(cfg: SweepConfig, rows: _Rows, classes: list) -> None:
    """``--seeds auto``: at each decision fraction, replay the sequential design on the stored sums and evaluate the
    sets its next look needs (only the methods of pairs not yet decided), until every fraction's design is finished
    (all decided, futile, or the maximum reached). Replaying makes a resumed run take the same path."""
    plan = cfg.decide.plan()
    by_name = {c.name: c for c in classes}
    while True:
        todo = []
        for fraction in cfg.decide.fractions:
            contenders = [c.name for c in classes if not c.is_bound and fraction in cfg.fractions_of(c.name)]
            if len(contenders) < 2:
                continue
            test = SequentialTest(plan, contenders, "ce")
            test.replay(rows.sums(fraction, contenders))
            if test.next_sets is not None:
                todo.append((fraction, test.next_sets, test.methods_needed()))
                log.info(
                    "at %g: %d pair(s) undecided after %d sets; adding sets up to %d",
                    fraction, len(test.undecided), plan.looks[test.looks_done - 1], test.next_sets,
                )  # fmt: skip
        if not todo:
            return
        for fraction, n_sets, methods in todo:
            for seed in range(n_sets):
                rows.ensure(seed, [(by_name[m], fraction) for m in methods])


class _Rows:
    """Evaluates and stores the rows of one run: per seed its baseline and the (method, fraction) rows not yet in the
    run folder, with their per-document sums; keeps each seed's batches, neuron selection and method instances."""

    def __init__(self, run: Prepared, classes: list, stats: Statistics | None, first_batches: list[Batch], progress):
        cfg, loaded = run.cfg, run.loaded
        self.run, self.cfg, self.world = run, cfg, run.world
        self.out = Path(cfg.out)
        self.model = loaded.model
        self.store = ResultStore(self.out, read_only=not run.world.is_main)
        self.docs = runfolder.read_doc_sums(self.out, runfolder.ALL_DOC_FIELDS)  # a resumed run's, read once
        self._redo: set[tuple] = set()  # rows whose stored sums disagree with them (warned once)
        self.n_neurons = sum(s.width for s in run.sites)
        self.first_seed = cfg.fixed_seeds[0]
        self.first_batches = first_batches
        self.notify = Callbacks()  # told about every row stored (set by _sweep once the callbacks have started)
        generator = load_generator(cfg, loaded)
        train = stats_batches(run.spec, run.inputs) if any(c.needs_train_batches for c in classes) else ()

        def context(seed: int, batches: list[Batch]) -> MethodContext:
            return MethodContext(
                self.model, run.sites, stats, seed, loaded.task, loaded.processor, batches, optimal=cfg.optimal,
                resample=cfg.resample, image=cfg.image, generator=generator, train_batches=train,
                artifacts=self.out / runfolder.ARTIFACTS_DIR, world=run.world, progress=progress,
            )  # fmt: skip

        self.context = context
        # built before the first file is written: a method refusing its settings fails here
        self.instances = {self.first_seed: {c.name: c(context(self.first_seed, first_batches)) for c in classes}}
        self._seed: tuple[int, list[Batch], NeuronSelection] | None = None
        total = len(cfg.fixed_seeds) * (1 + sum(len(cfg.fractions_of(c.name)) for c in classes))
        self.bar = tqdm(total=total, desc="sweep", unit="row", disable=not progress)

    def sums(self, fraction: float, methods: list[str]) -> dict[str, list[DocSums]]:
        """Per method, the per-document sums of its rows at ``fraction`` for seeds 0, 1, ... (as long as they are
        consecutive)."""
        out: dict[str, list[DocSums]] = {}
        for m in methods:
            found, seed = [], 0
            while (d := self.docs.get(runfolder.row_key(m, fraction, seed))) is not None:
                found.append(DocSums(**d))
                seed += 1
            out[m] = found
        return out

    def _setup(self, seed: int) -> tuple[list[Batch], NeuronSelection]:
        if self._seed is None or self._seed[0] != seed:
            same_inputs = seed == self.first_seed or self.run.loaded.task not in SEED_DEPENDENT_TASKS
            batches = self.first_batches if same_inputs else eval_batches(self.run.spec, self.run.inputs, seed)
            selection = NeuronSelection.for_sites(self.run.sites, seed, self.cfg.selection)
            if self.world.is_main:
                runfolder.save_selection(self.out, selection.state_dict(), selection.mode)
            self._seed = (seed, batches, selection)
        return self._seed[1], self._seed[2]

    def _baseline(self, seed: int, batches: list[Batch], done: bool) -> ResultRow:
        """The unablated row of ``seed`` (``done``: stored and intact). Where the evaluation inputs do not depend on
        the seed it is the first seed's (the same model on the same batches), stored again under this seed without
        evaluating."""
        base = self.store.get("baseline", 0.0, seed) if done else None
        first_ok = self.first_seed != seed and self.done("baseline", 0.0, self.first_seed)
        first = self.store.get("baseline", 0.0, self.first_seed) if first_ok else None
        first_docs = self.docs.get(runfolder.row_key("baseline", 0.0, self.first_seed))
        if base is None and batches is self.first_batches and first is not None and first_docs is not None:
            base = dataclasses.replace(first, seed=seed, seconds=0.0)
            self._store(base, first_docs)
        if base is None:
            t0 = time.perf_counter()
            m = _evaluate(self.model, batches, self.world)
            seconds = time.perf_counter() - t0
            base = ResultRow.measured(
                "baseline", 0.0, seed, m.top1, m.ce, m.n, 0, self.n_neurons, seconds, logit_diff=m.logit_diff
            )
            self._store(base, m.doc_sums())
        return base

    def _store(self, row: ResultRow, docs: dict | None) -> None:
        """Store ``row`` with its per-document sums, then tell the callbacks: every row of a sweep passes here."""
        if docs is not None:
            self.docs[row.key] = docs
            if self.world.is_main:  # before the row, so a stored row always has its sums
                runfolder.save_doc_sums(self.out, row.method, row.fraction, row.seed, docs)
        self.store.add(row)
        self.notify.row(row, docs)

    def done(self, method: str, fraction: float, seed: int) -> bool:
        """The row is stored with per-document sums that add up to it (else it is run again)."""
        row = self.store.get(method, fraction, seed)
        if row is None:
            return False
        why = runfolder.doc_sums_disagree(row, self.docs.get(row.key))
        if why is not None and self.world.is_main and row.key not in self._redo:
            self._redo.add(row.key)
            log.warning("%s at %g (seed %d): %s in %s; running the row again", method, fraction, seed, why,
                        runfolder.PAIRED_DIR)  # fmt: skip
        return why is None

    def ensure(self, seed: int, wanted: list[tuple[type, float]]) -> None:
        """Evaluate the baseline of ``seed`` and each ``(method class, fraction)`` of ``wanted`` not yet stored (or
        stored without per-document sums that add up to it)."""
        todo = [(c, f) for c, f in wanted if not self.done(c.name, f, seed)]
        base_done = self.done("baseline", 0.0, seed)
        if seed in self.cfg.fixed_seeds:
            self.bar.update(len(wanted) - len(todo) + base_done)
        else:
            self.bar.total += len(todo) + (not base_done)
            self.bar.refresh()
        if not todo and base_done:
            return
        batches, selection = self._setup(seed)
        base = self._baseline(seed, batches, base_done)
        base_docs = self.docs.get(runfolder.row_key("baseline", 0.0, seed))
        self.bar.update(not base_done)
        instances = self.instances.setdefault(seed, {})
        for cls, fraction in todo:
            self.bar.set_postfix_str(f"seed {seed} {cls.name} {fraction:.2f}")
            t0 = time.perf_counter()
            n_ablated = selection.n_ablated(fraction)
            if n_ablated == 0:
                top1, ce, n, docs, ld = base.top1, base.ce, base.n_eval, base_docs, base.logit_diff
            else:
                method = instances.get(cls.name) or instances.setdefault(cls.name, cls(self.context(seed, batches)))
                with method.ablate(selection.at(fraction)):
                    m = _evaluate(self.model, batches, self.world, method.on_batch)
                top1, ce, n, docs, ld = m.top1, m.ce, m.n, m.doc_sums(), m.logit_diff
            seconds = time.perf_counter() - t0
            row = ResultRow.measured(
                cls.name, fraction, seed, top1, ce, n, n_ablated, self.n_neurons, seconds, base, logit_diff=ld
            )
            self._store(row, docs)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


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
    from knockout.reporting.run import model_label

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
    page = _quietly(lambda: compare_runs([r.dir for r in results], out / "compare", cfg.decide.fractions, labels))
    return results, page
