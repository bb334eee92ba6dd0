"""Ablate named neuron sets instead of random fractions: ``knockout sweep --ablate SPEC`` and the units of a scan.

Each seed evaluates the unablated baseline, then every (target, method) pair: the target's neurons
(:class:`knockout.components.ComponentSet`) ablated by the method. A row's ``target`` is the set's name and its
``fraction`` the share of the site's neurons the set ablates; per-document sums are stored with the row, as in a
sweep, so the paired comparison of methods works per target (:mod:`knockout.reporting.targets`). Rows already in the
run folder are skipped, so a killed run resumes with the same values.

The run folder's ``config.json`` records the sets (``resolved.targets``: name -> components, neurons ablated,
fraction and a digest of the neurons); a resumed run whose set of a stored name holds other neurons is refused, so
rows of one name never mix two sets.

Constant methods evaluate only the layers from the target's lowest layer on, reusing the unablated outputs of the
layers below (:mod:`knockout.evaluation.prefix`; the same logits bit for bit, about half the work of a scan).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from knockout import distributed, runfolder
from knockout.ablation.methods import ConstantAblation, MethodContext, get_method
from knockout.components import ComponentSet, component_sets
from knockout.data.batch import Batch
from knockout.data.packing import scored_fraction
from knockout.data.tasks import SEED_DEPENDENT_TASKS, eval_batches, stats_batches
from knockout.errors import KnockoutError
from knockout.evaluation.prefix import LayerCache, decoder_layers
from knockout.experiments.callbacks import Callbacks, replay
from knockout.experiments.prepare import Prepared
from knockout.experiments.runner import _evaluate, load_generator, obtain_stats, run_record
from knockout.runfolder import ResultRow, ResultStore
from knockout.stats.statistics import Statistics

log = logging.getLogger(__name__)


def ablate_sets(run: Prepared) -> list[ComponentSet]:
    """The named sets of the run's ``--ablate`` spec on its sites (ranges checked)."""
    return component_sets(run.cfg.ablate, run.sites)


def check_targets(out: Path, targets: list[ComponentSet]) -> None:
    """Refuse when the run folder recorded a set of the same name with other neurons."""
    old = ((runfolder.read_config(out) or {}).get("resolved") or {}).get("targets") or {}
    changed = [t.name for t in targets if t.name in old and old[t.name].get("digest") != t.digest()]
    if changed:
        name = changed[0]
        raise KnockoutError(
            f"the run in {str(out)!r} ablated another set under the name {name!r} ({old[name].get('components')}, "
            f"now {next(t.spec for t in targets if t.name == name)}): its rows would mix two sets. Rename the set, "
            "use another --out folder, or --restart"
        )


@dataclass
class TargetRun:
    """What :func:`run_targets` set up, for work that follows it (a scan's attribution estimate)."""

    resolved: dict
    """config.json's ``resolved`` record."""
    stats: Statistics | None
    batches: list[Batch]
    """The first seed's evaluation batches."""
    context: Callable[[int, list[Batch]], MethodContext]
    """The method context of a seed and its batches."""


def run_targets(
    run: Prepared, targets: list[ComponentSet], progress: bool = True, notify: Callbacks | None = None
) -> TargetRun:
    """Evaluate every method of ``run.cfg`` on every target, per seed (see the module docstring). ``notify``: the
    callbacks told about the start, every row (stored ones first) and, by the caller, the end, as a sweep's."""
    cfg, loaded, world, sites = run.cfg, run.loaded, run.world, run.sites
    main, out, model = world.is_main, Path(cfg.out), loaded.model
    if not targets:
        raise KnockoutError("no component sets to ablate")
    classes = [get_method(m) for m in cfg.methods]
    for cls in classes:
        if loaded.task not in cls.tasks:
            raise KnockoutError(f"method {cls.name!r} does not apply to {loaded.task} models")
    check_targets(out, targets)
    spec, inputs = run.spec, run.inputs
    first_batches = eval_batches(spec, inputs, cfg.seeds[0])
    used = scored_fraction(first_batches) if loaded.task != "image" else 1.0
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

    resolved = {**run_record(run, used, stats), "targets": {t.name: t.record() for t in targets}}
    store = ResultStore(out, read_only=not main)
    distributed.barrier()  # every rank has read the folder's state; rank 0 may now write
    config = json.loads(json.dumps({**cfg.to_dict(), "resolved": resolved}))  # JSON types, as config.json holds
    if main:
        runfolder.write_config(out, config)
        if save_stats:
            stats.save(out / runfolder.STATS_FILE)
    notify = notify or Callbacks()
    notify.start(config)
    replay(list(store.rows.values()), runfolder.read_doc_sums(out) if notify else {}, notify)
    n_neurons = sum(s.width for s in sites)
    layers = decoder_layers(model, sites) if any(issubclass(c, ConstantAblation) for c in classes) else None
    per_seed = 1 + len(classes) * len(targets)
    bar = tqdm(total=len(cfg.seeds) * per_seed, desc="targets", unit="row", disable=not progress)
    cache, cache_batches = None, None
    for seed in cfg.seeds:
        todo = [(t, c) for t in targets for c in classes if (c.name, t.fraction, seed, t.name) not in store]
        if ("baseline", 0.0, seed) in store and not todo:
            bar.update(per_seed)
            continue
        same_inputs = seed == cfg.seeds[0] or loaded.task not in SEED_DEPENDENT_TASKS
        batches = first_batches if same_inputs else eval_batches(spec, inputs, seed)
        # the unablated outputs below each target's lowest layer, recorded once per set of batches
        wanted = layers is not None and any(issubclass(c, ConstantAblation) and t.layers[0] > 0 for t, c in todo)
        record = wanted and cache_batches is not batches
        if record:
            cache = LayerCache(layers, [t.layers[0] - 1 for t in targets if t.layers[0] > 0])
        base = store.get("baseline", 0.0, seed)
        if base is None or record:
            t0 = time.perf_counter()
            with cache.record() if record else nullcontext():
                m = _evaluate(model, batches, world, cache.on_batch() if record else None)
            cache_batches = batches if record else cache_batches
            if base is None:
                seconds = time.perf_counter() - t0
                base = ResultRow.measured(
                    "baseline", 0.0, seed, m.top1, m.ce, m.n, 0, n_neurons, seconds, logit_diff=m.logit_diff
                )
                sums = m.doc_sums()
                if main:
                    runfolder.save_doc_sums(out, "baseline", 0.0, seed, sums)
                store.add(base)
                notify.row(base, sums)
        bar.update(per_seed - len(todo))
        instances = {}
        for target, cls in todo:
            bar.set_postfix_str(f"seed {seed} {target.name} {cls.name}")
            t0 = time.perf_counter()
            method = instances.get(cls.name) or instances.setdefault(cls.name, cls(context(seed, batches)))
            skip = cache is not None and cache_batches is batches and issubclass(cls, ConstantAblation)
            below = cache.skip_below(target.layers[0]) if skip else nullcontext()
            on_batch = cache.on_batch(method.on_batch) if skip else method.on_batch
            with method.ablate(list(target.neurons)), below:
                m = _evaluate(model, batches, world, on_batch)
            seconds = time.perf_counter() - t0
            sums = m.doc_sums()
            if main:  # before the row, so a stored row always has its sums
                runfolder.save_doc_sums(out, cls.name, target.fraction, seed, sums, target.name)
            row = ResultRow.measured(
                cls.name, target.fraction, seed, m.top1, m.ce, m.n, target.n_ablated, n_neurons, seconds, base,
                target=target.name, logit_diff=m.logit_diff,
            )  # fmt: skip
            store.add(row)
            notify.row(row, sums)
            bar.update(1)
    bar.close()
    distributed.barrier()  # rank 0's files are complete when the run returns on any rank
    return TargetRun(resolved, stats, first_batches, context)
