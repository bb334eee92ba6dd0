"""The sweep: methods x fractions x seeds -> one results row each, resumable; and a statistics-only run.

This module orchestrates; both runs start with :func:`knockout.experiments.prepare.prepare` (checks, model, sites,
inputs), the run folder's files are written through :mod:`knockout.runfolder`, the batches are built by
:mod:`knockout.data.tasks`, and the methods come from the registry in :mod:`knockout.ablation`.
"""

from __future__ import annotations

import logging
import time
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
from knockout.experiments.config import SweepConfig
from knockout.experiments.prepare import Prepared, environment, prepare, stats_meta
from knockout.loading import DTYPES, LoadedModel, load_model, resolve_device
from knockout.runfolder import ResultRow, ResultStore
from knockout.stats import centres
from knockout.stats.running import LayerStats, check_hist_memory
from knockout.stats.statistics import Statistics

log = logging.getLogger(__name__)


def collect_run_stats(run: Prepared, progress: bool = True) -> Statistics:
    """Statistics of the model's sites on the collection split of ``run`` (``knockout stats`` and sweeps).

    Under ``torchrun`` each rank collects its share of the batches and the shares are all-reduced
    (:func:`knockout.distributed.collect_stats_sharded`): every rank returns the statistics of all batches."""
    cfg = run.cfg
    check_hist_memory([s.width for s in run.sites], cfg.eps, cfg.hist_limit)
    batches = stats_batches(run.spec, run.inputs)
    if run.inputs.task != "image":
        log.info("statistics: %.1f%% of the computed positions are counted", 100 * scored_fraction(batches, "valid"))
    meta = stats_meta(run.spec, run.identity)
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
        stats.check_model(run.identity, source=f"statistics in {str(source)!r}")
        if (stats.eps, stats.limit) != (cfg.eps, cfg.hist_limit):
            raise KnockoutError(
                f"statistics in {str(source)!r} use eps={stats.eps}, hist limit={stats.limit}; "
                f"pass --eps {stats.eps} --hist-limit {stats.limit} or recollect them"
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
                "layer %d: %.2f%% of activations lie outside ±%g and are left out of the peak; raise --hist-limit",
                i,
                100 * layer.clipped_fraction,
                stats.limit,
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
        "peak@EPS) is taken over the values inside the window only; their median counts the clipped values. "
        "Raise --hist-limit",
        layer_index,
        len(bad),
        100 * threshold,
        layer.limit,
        listed,
        f" and {len(bad) - shown} more" if len(bad) > shown else "",
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
    generator = load_model(spec, task="causal", dtype=dtype_name, device=str(loaded.device))
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
    """One line about collected statistics: size, largest peak-mean gap, clipped share and point-mass peaks."""
    gap = max(float((s.peak() - s.mean).abs().max()) for s in stats.layers)
    clipped = max(s.clipped_fraction for s in stats.layers)
    n_pm = sum(int(centres.point_mass(s).sum()) for s in stats.layers)
    return (
        f"{len(stats)} layers x {stats.widths[0]} neurons, {stats.n_tokens} tokens, "
        f"largest |peak - mean| {gap:.4f}, clipped {100 * clipped:.3f}%, "
        f"point-mass peaks {n_pm} ({100 * n_pm / max(sum(stats.widths), 1):.2f}% of neurons)"
    )


def run_sweep(
    cfg: SweepConfig,
    progress: bool = True,
    loaded: LoadedModel | None = None,
    restart: bool = False,
) -> Path:
    """Run (or resume) the sweep of ``cfg``; returns the run folder.

    For each seed: the unablated baseline, then for each method and fraction the ablated evaluation. Rows already
    in the folder's results are skipped, so re-running the same command resumes an interrupted run. ``restart``
    moves an existing run folder aside (``<out>.old-<timestamp>``) and starts afresh. ``loaded``: the model of
    ``cfg`` when the caller has it loaded already.

    Launched with ``torchrun`` (``WORLD_SIZE`` > 1) it runs data-parallel: every rank loads the model, reads the same
    resume state and builds the same batches; statistics and every evaluation are sharded over the ranks and
    all-reduced, so all ranks hold the same rows (and per-document sums); only rank 0 writes files. A barrier
    separates the reading of the existing run folder from the first write.
    """
    if cfg.scan.unit is not None:
        raise KnockoutError("this config is a scan's (scan.unit is set); run it with `knockout scan` (run_scan)")
    with distributed.process_group(resolve_device(cfg.device)):
        run = prepare(cfg, distributed.world(), restart=restart, loaded=loaded)
        if cfg.ablate is not None:  # named component sets instead of random fractions
            from knockout.experiments.targets import ablate_sets, run_targets

            run_targets(run, ablate_sets(run), progress and run.world.is_main)
        else:
            _sweep(run, progress and run.world.is_main)
        return Path(cfg.out)


def run_record(run: Prepared, used: float) -> dict:
    """What a run resolved, stored as config.json's ``resolved``: task, positions used (``used``: the share of
    computed evaluation positions that are scored), model identity, device, dtype, versions and data identity."""
    model = run.loaded.model
    return {
        "task": run.loaded.task,
        "positions_used": {"eval_scored_fraction": round(used, 6), "sort_by_length": run.spec.sort_by_length},
        "model_identity": run.identity,
        "device": str(run.loaded.device),
        "dtype": str(model_dtype(model)),
        "device_map": {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()} or None,
        "environment": environment(),
        "data_identity": run.data_id,
    }


def _sweep(run: Prepared, progress: bool) -> None:
    """The rows of a prepared run (see :func:`run_sweep`)."""
    cfg, loaded, world, sites = run.cfg, run.loaded, run.world, run.sites
    main = world.is_main
    out = Path(cfg.out)
    model = loaded.model
    classes = [get_method(m) for m in cfg.methods]
    for cls in classes:
        if loaded.task not in cls.tasks:
            raise KnockoutError(f"method {cls.name!r} does not apply to {loaded.task} models")
    spec, inputs = run.spec, run.inputs
    first_batches = eval_batches(spec, inputs, cfg.seeds[0])
    used = scored_fraction(first_batches) if loaded.task != "image" else 1.0
    if main:
        log.info(
            "evaluation: %.1f%% of the computed positions are scored targets%s",
            100 * used,
            " (batches sorted by length)" if spec.sort_by_length else "",
        )
    stats, save_stats = None, False
    if any(c.needs_stats for c in classes):
        stats, save_stats = obtain_stats(run, progress)
    generator = load_generator(cfg, loaded)
    train = stats_batches(spec, inputs) if any(c.needs_train_batches for c in classes) else ()

    def context(seed: int, batches: list[Batch]) -> MethodContext:
        return MethodContext(
            model, sites, stats, seed, loaded.task, loaded.processor, batches, optimal=cfg.optimal,
            resample=cfg.resample, image=cfg.image, generator=generator, train_batches=train,
            artifacts=out / runfolder.ARTIFACTS_DIR, world=world,
        )  # fmt: skip

    first_instances = {cls.name: cls(context(cfg.seeds[0], first_batches)) for cls in classes}
    resolved = run_record(run, used)
    store = ResultStore(out, read_only=not main)
    distributed.barrier()  # every rank has read the folder's state; rank 0 may now write
    if main:
        runfolder.write_config(out, {**cfg.to_dict(), "resolved": resolved})
        if save_stats:
            stats.save(out / runfolder.STATS_FILE)
    widths = [s.width for s in sites]
    n_neurons = sum(widths)
    per_seed = 1 + sum(len(cfg.fractions_of(c.name)) for c in classes)
    bar = tqdm(total=len(cfg.seeds) * per_seed, desc="sweep", unit="row", disable=not progress)
    stored_docs = runfolder.read_doc_sums(out, runfolder.ALL_DOC_FIELDS)  # a resumed run's, read once
    for seed in cfg.seeds:
        todo = [(c, f) for c in classes for f in cfg.fractions_of(c.name) if (c.name, f, seed) not in store]
        if ("baseline", 0.0, seed) in store and not todo:
            bar.update(per_seed)
            continue
        same_inputs = seed == cfg.seeds[0] or loaded.task not in SEED_DEPENDENT_TASKS
        batches = first_batches if same_inputs else eval_batches(spec, inputs, seed)
        selection = NeuronSelection.for_sites(sites, seed, cfg.selection)
        if main:
            runfolder.save_selection(out, selection.state_dict(), selection.mode)
        base = store.get("baseline", 0.0, seed)
        base_docs = stored_docs.get(runfolder.row_key("baseline", 0.0, seed))
        if base is None:
            t0 = time.perf_counter()
            m = _evaluate(model, batches, world)
            seconds = time.perf_counter() - t0
            base = ResultRow.measured(
                "baseline", 0.0, seed, m.top1, m.ce, m.n, 0, n_neurons, seconds, logit_diff=m.logit_diff
            )
            base_docs = m.doc_sums()
            if main:
                runfolder.save_doc_sums(out, "baseline", 0.0, seed, base_docs)
            store.add(base)
        bar.update(per_seed - len(todo))
        instances = first_instances if seed == cfg.seeds[0] else {}
        for cls, fraction in todo:
            bar.set_postfix_str(f"seed {seed} {cls.name} {fraction:.2f}")
            t0 = time.perf_counter()
            n_ablated = selection.n_ablated(fraction)
            if n_ablated == 0:
                top1, ce, n, docs, ld = base.top1, base.ce, base.n_eval, base_docs, base.logit_diff
            else:
                method = instances.get(cls.name) or instances.setdefault(cls.name, cls(context(seed, batches)))
                with method.ablate(selection.at(fraction)):
                    m = _evaluate(model, batches, world, method.on_batch)
                top1, ce, n, docs, ld = m.top1, m.ce, m.n, m.doc_sums(), m.logit_diff
            seconds = time.perf_counter() - t0
            if main and docs is not None:  # before the row, so a stored row always has its sums
                runfolder.save_doc_sums(out, cls.name, fraction, seed, docs)
            row = ResultRow.measured(
                cls.name, fraction, seed, top1, ce, n, n_ablated, n_neurons, seconds, base, logit_diff=ld
            )
            store.add(row)
            bar.update(1)
    bar.close()
    distributed.barrier()  # rank 0's files are complete when run_sweep returns on any rank
