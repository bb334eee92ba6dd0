"""The row engine: every row of every run is made here.

A row is (method, neuron set, seed). The neuron set is a fraction of the seed's random order (a sweep, and the sets
``--seeds auto`` adds) or a named component set (``--ablate`` and the units of ``knockout scan``: the row's
``target`` is the set's name and its ``fraction`` the share of the site's neurons the set ablates; ``--keep`` sets,
:mod:`knockout.experiments.circuits`, ablate every neuron outside a circuit).

:class:`RowEngine` is prepared once per run: the method/task check, the statistics, the generator of
``resample-text``, the method contexts, the ``resolved`` record and config.json, the callbacks started and told about
the stored rows, and for ``patch`` the counterfactual batches of the evaluation batches. Then
:meth:`RowEngine.ensure` makes sure rows exist: a row stored with per-document sums that add up to it is kept; any
other is evaluated (its sums stored before the row, so a stored row always has them) and the callbacks are told.
:meth:`RowEngine.store_row` is the one place that stores a row.

Documents on demand (``--decide-max-docs``): a row's documents are the length of its per-document sums. The first
``--decide-max-docs`` evaluation documents are loaded once and batched per planned count
(:func:`knockout.data.tasks.doc_segments`); a new row is evaluated on the first ``--eval-docs`` of them, and
:meth:`RowEngine.grow` grows a stored row (and its seed's baseline) to a planned count by evaluating only the added
segments, so a row is the same however it grew.

Constant methods on a set whose lowest ablated layer is above 0 evaluate only the layers from there on, reusing the
unablated outputs of the layers below, recorded once per set of batches (:mod:`knockout.evaluation.prefix`; the same
logits bit for bit): a scan's units and ``--ablate`` sets, and random sets of ``--selection global`` that leave the
first layers alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from knockout import distributed, runfolder
from knockout.ablation.methods import ConstantAblation, MethodContext, get_method
from knockout.ablation.selection import NeuronSelection
from knockout.components import ComponentSet, component_sets
from knockout.config import Resolved, SweepConfig
from knockout.data.batch import Batch
from knockout.data.packing import scored_fraction
from knockout.data.tasks import (
    SEED_DEPENDENT_TASKS,
    counterfactual_eval_batches,
    doc_segments,
    eval_batches,
    stats_batches,
)
from knockout.devices import model_dtype
from knockout.distributed import World
from knockout.errors import KnockoutError
from knockout.evaluation.evaluate import evaluate
from knockout.evaluation.metrics import Metrics
from knockout.evaluation.prefix import LayerCache, decoder_layers
from knockout.experiments.callbacks import Callbacks, replay
from knockout.experiments.prepare import Prepared, check_stats_source, environment, stats_meta, stats_provenance
from knockout.inference.paired import DocSums
from knockout.loading import DTYPES, LoadedModel, load_model
from knockout.runfolder import ResultRow, ResultStore, doc_sums_disagree, row_key
from knockout.stats import centres
from knockout.stats.running import HistGrid, LayerStats, check_hist_memory, clip_remedy, describe_window
from knockout.stats.statistics import Statistics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NeuronSet:
    """What a row ablates: ``fraction`` of the seed's random order, or the named ``target`` set."""

    fraction: float
    target: ComponentSet | None = None

    @classmethod
    def named(cls, target: ComponentSet) -> NeuronSet:
        return cls(target.fraction, target)

    @property
    def name(self) -> str:
        return self.target.name if self.target is not None else ""


# -- statistics -------------------------------------------------------------------------------------------------------
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


# -- what a run records -----------------------------------------------------------------------------------------------
def run_record(run: Prepared, used: float, stats: Statistics | None = None, targets=None) -> Resolved:
    """What a run resolved, stored as config.json's ``resolved``: task, positions used (``used``: the share of
    computed evaluation positions that are scored), model identity and revision, site modules, device, dtype,
    versions, data identity, where the statistics came from, and the named sets (``targets``)."""
    loaded, model = run.loaded, run.loaded.model
    return Resolved(
        task=loaded.task,
        positions_used={"eval_scored_fraction": round(used, 6), "sort_by_length": run.spec.sort_by_length},
        model_identity=run.identity,
        model_revision={"requested": loaded.revision, "commit": loaded.commit},
        site_modules=[s.name for s in run.sites],
        device=str(loaded.device),
        dtype=str(model_dtype(model)),
        device_map={k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()} or None,
        environment=environment(),
        data_identity=run.data_id,
        statistics=None if stats is None else stats_provenance(stats, run.cfg.stats_path),
        targets=None if targets is None else {t.name: t.record() for t in targets},
        design=run.cfg.design(),
    )


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


def check_targets(folder: runfolder.RunFolder, targets: list[ComponentSet]) -> None:
    """Refuse when the run folder recorded a set of the same name with other neurons."""
    old = folder.resolved.targets or {}
    changed = [t.name for t in targets if t.name in old and (old[t.name] or {}).get("digest") != t.digest()]
    if changed:
        name = changed[0]
        raise KnockoutError(
            f"the run in {str(folder.dir)!r} ablated another set under the name {name!r} "
            f"({(old[name] or {}).get('components')}, now {next(t.spec for t in targets if t.name == name)}): its "
            "rows would mix two sets. Rename the set, use another --out folder, or --restart"
        )


def _evaluate(model: torch.nn.Module, batches: list[Batch], world: World, on_batch=None) -> Metrics:
    """:func:`evaluate` on every batch, keeping per-document sums; in a distributed run on this rank's share,
    all-reduced, with the per-document sums of all ranks gathered in batch order (every rank holds them all)."""
    if world.distributed:
        return distributed.evaluate_sharded(model, batches, on_batch=on_batch, per_doc=True)
    return evaluate(model, batches, on_batch=on_batch, per_doc=True)


# -- the engine -------------------------------------------------------------------------------------------------------
class RowEngine:
    """Makes the rows of one prepared run (see the module docstring).

    ``targets``: the named sets of an ``--ablate`` run or a scan (recorded in ``resolved.targets``; a stored set of
    the same name with other neurons is refused). ``planned``: the rows (with one baseline per seed) the progress bar
    starts with; rows of other seeds add to it as they are asked for. Under ``torchrun`` every rank evaluates its
    share and holds every row; rank 0 alone writes and tells the callbacks."""

    def __init__(
        self,
        run: Prepared,
        progress: bool = True,
        notify: Callbacks | None = None,
        targets: list[ComponentSet] | None = None,
        planned: Sequence[int] = (),
        rows_per_seed: int = 0,
        desc: str = "sweep",
    ):
        cfg, loaded, world = run.cfg, run.loaded, run.world
        self.run, self.cfg, self.world, self.model = run, cfg, world, loaded.model
        self.out = Path(cfg.out)
        self.classes = [get_method(m) for m in cfg.methods]
        for cls in self.classes:
            if loaded.task not in cls.tasks:
                raise KnockoutError(f"method {cls.name!r} does not apply to {loaded.task} models")
        folder = run.folder if run.folder is not None else runfolder.RunFolder(self.out)
        if targets is not None:
            if not targets:
                raise KnockoutError("no component sets to ablate")
            check_targets(folder, targets)
        self.first_seed = cfg.fixed_seeds[0]
        # documents on demand (--decide-max-docs): the planned document counts and each count's batches, whose first
        # segment is the first documents' (eval_batches'), tokenized once with the others
        self.doc_counts = cfg.decide.plan(eval_docs=cfg.eval_docs).docs if cfg.sequential else ()
        self.segments = doc_segments(run.spec, run.inputs, self.doc_counts) if self.doc_counts else None
        self.first_batches = self.segments[0] if self.segments else eval_batches(run.spec, run.inputs, self.first_seed)
        used = scored_fraction(self.first_batches) if loaded.task != "image" else 1.0
        if world.is_main:
            log.info(
                "evaluation: %.1f%% of the computed positions are scored targets%s",
                100 * used,
                " (batches sorted by length)" if run.spec.sort_by_length else "",
            )
        self.stats, save_stats = None, False
        if any(c.needs_stats for c in self.classes):
            self.stats, save_stats = obtain_stats(run, progress)
        self.store = ResultStore(folder, read_only=not world.is_main)
        self.docs = dict(folder.stored_sums)  # a resumed run's, read once
        self._redo: set[tuple] = set()  # rows whose stored sums disagree with them (warned once)
        self.n_neurons = sum(s.width for s in run.sites)
        self.generator = load_generator(cfg, loaded)
        self.train = stats_batches(run.spec, run.inputs) if any(c.needs_train_batches for c in self.classes) else ()
        # patch: each evaluation batch's counterfactual batch, built once (the same for every seed: task prompts)
        needs_cf = any(getattr(c, "needs_counterfactuals", False) for c in self.classes)
        self.counterfactuals = counterfactual_eval_batches(run.spec, run.inputs) if needs_cf else ()
        self.progress = progress
        # built before the first file is written: a method refusing its settings fails here
        self.instances = {self.first_seed: {c.name: c(self.context(self.first_seed, self.first_batches))
                                            for c in self.classes}}  # fmt: skip
        self._batches: dict[int, list[Batch]] = {self.first_seed: self.first_batches}
        self._selection: tuple[int, NeuronSelection] | None = None
        constant = any(issubclass(c, ConstantAblation) for c in self.classes)
        self.layers = decoder_layers(self.model, run.sites) if constant and self._may_skip(targets) else None
        self.cache: LayerCache | None = None
        self.cache_batches: list[Batch] | None = None
        self.resolved = run_record(run, used, self.stats, targets)
        distributed.barrier()  # every rank has read the folder's state; rank 0 may now write
        config = json.loads(json.dumps({**cfg.to_dict(), "resolved": self.resolved.to_dict()}))  # as stored
        if world.is_main:
            runfolder.write_config(self.out, config)
            if save_stats:
                self.stats.save(self.out / runfolder.STATS_FILE)
        self.notify = notify or Callbacks()
        self.notify.start(config)
        replay(list(self.store.rows.values()), self.docs, self.notify)  # a resumed run's stored rows first
        self.planned = set(planned)
        self.bar = tqdm(total=len(self.planned) * (1 + rows_per_seed), desc=desc, unit="row", disable=not progress)

    def _may_skip(self, targets: list[ComponentSet] | None) -> bool:
        """Whether a neuron set of this run can leave its first layers alone (where reusing them pays)."""
        return targets is not None or self.cfg.selection in ("global", "heads-global")

    def context(self, seed: int, batches: list[Batch]) -> MethodContext:
        """The method context of ``seed`` evaluated on ``batches``."""
        run, cfg = self.run, self.cfg
        if self.segments is not None:  # every batch a row may be evaluated on (resampling's fixed input spans them)
            batches = [b for segment in self.segments for b in segment]
        return MethodContext(
            self.model, run.sites, self.stats, seed, run.loaded.task, run.loaded.processor, batches,
            optimal=cfg.optimal, resample=cfg.resample, image=cfg.image, generator=self.generator,
            train_batches=self.train, artifacts=self.out / runfolder.ARTIFACTS_DIR, world=self.world,
            progress=self.progress, counterfactual_batches=self.counterfactuals,
        )  # fmt: skip

    # -- stored rows ------------------------------------------------------------------------------------------------
    def done(self, method: str, fraction: float, seed: int, target: str = "") -> bool:
        """The row is stored with per-document sums that add up to it (else it is evaluated again)."""
        row = self.store.get(method, fraction, seed, target)
        if row is None:
            return False
        why = doc_sums_disagree(row, self.docs.get(row.key))
        if why is not None and self.world.is_main and row.key not in self._redo:
            self._redo.add(row.key)
            log.warning("%s at %s (seed %d): %s in %s; running the row again", method, target or f"{fraction:g}",
                        seed, why, runfolder.PAIRED_DIR)  # fmt: skip
        return why is None

    def sums(self, fraction: float, methods: list[str]) -> dict[str, list[DocSums]]:
        """Per method, the per-document sums of its rows at ``fraction`` for seeds 0, 1, ... (as long as they are
        consecutive and add up to their rows)."""
        out: dict[str, list[DocSums]] = {}
        for m in methods:
            found, seed = [], 0
            while self.done(m, fraction, seed):
                sums = self.docs[row_key(m, fraction, seed)]
                found.append(DocSums(**{f: sums[f] for f in runfolder.DOC_FIELDS}))
                seed += 1
            out[m] = found
        return out

    def store_row(self, row: ResultRow, docs: dict | None) -> None:
        """Store ``row`` with its per-document sums (first, so a stored row always has them), then tell the
        callbacks: every row of every run passes here."""
        if docs is not None:
            self.docs[row.key] = docs
            if self.world.is_main:
                runfolder.save_doc_sums(self.out, row.method, row.fraction, row.seed, docs, row.target)
        self.store.add(row)
        self.notify.row(row, docs)

    # -- per seed ---------------------------------------------------------------------------------------------------
    def batches(self, seed: int) -> list[Batch]:
        if seed not in self._batches:
            same = self.run.loaded.task not in SEED_DEPENDENT_TASKS
            self._batches = {self.first_seed: self.first_batches}  # one other seed's batches at a time
            self._batches[seed] = self.first_batches if same else eval_batches(self.run.spec, self.run.inputs, seed)
        return self._batches[seed]

    def selection(self, seed: int) -> NeuronSelection:
        """The random neuron order of ``seed`` (recorded in the run folder the first time)."""
        if self._selection is None or self._selection[0] != seed:
            selection = NeuronSelection.for_sites(self.run.sites, seed, self.cfg.selection)
            if self.world.is_main:
                runfolder.save_selection(self.out, selection.state_dict(), selection.mode)
            self._selection = (seed, selection)
        return self._selection[1]

    def _neurons(self, seed: int, s: NeuronSet) -> list[torch.Tensor]:
        return list(s.target.neurons) if s.target is not None else self.selection(seed).at(s.fraction)

    def _baseline(self, seed: int, batches: list[Batch], done: bool, record: bool) -> ResultRow:
        """The unablated row of ``seed`` (``done``: stored and intact), evaluated while recording the layer cache
        when ``record``. Where the evaluation inputs do not depend on the seed it is the first seed's (the same
        model on the same batches), stored again under this seed without evaluating."""
        base = self.store.get("baseline", 0.0, seed) if done else None
        if base is None and not record and batches is self.first_batches and seed != self.first_seed:
            first_docs = self.docs.get(row_key("baseline", 0.0, self.first_seed))
            if self.done("baseline", 0.0, self.first_seed) and first_docs is not None:
                first = self.store.get("baseline", 0.0, self.first_seed)
                base = dataclasses.replace(first, seed=seed, seconds=0.0)
                self.store_row(base, first_docs)
        if base is None or record:
            t0 = time.perf_counter()
            with self.cache.record() if record else nullcontext():
                m = _evaluate(self.model, batches, self.world, self.cache.on_batch() if record else None)
            if record:
                self.cache_batches = batches
            if base is None:
                seconds = time.perf_counter() - t0
                base = ResultRow.measured(
                    "baseline", 0.0, seed, m.top1, m.ce, m.n, 0, self.n_neurons, seconds, logit_diff=m.logit_diff
                )
                self.store_row(base, m.doc_sums())
        return base

    def ensure(self, seed: int, wanted: list[tuple[type, NeuronSet]], n_docs: int | None = None) -> None:
        """Make sure the baseline of ``seed`` and each ``(method class, neuron set)`` of ``wanted`` are stored with
        per-document sums that add up to them, evaluating those that are not (on the first documents). ``n_docs``
        (documents on demand, one of the planned counts): grow every one of them that has fewer documents to
        ``n_docs`` (:meth:`grow`)."""
        self._ensure_first(seed, wanted)
        if n_docs is not None:
            self.grow(seed, wanted, n_docs)

    def _ensure_first(self, seed: int, wanted: list[tuple[type, NeuronSet]]) -> None:
        todo = [(c, s) for c, s in wanted if not self.done(c.name, s.fraction, seed, s.name)]
        base_done = self.done("baseline", 0.0, seed)
        if seed in self.planned:
            self.bar.update(len(wanted) - len(todo) + base_done)
        else:
            self.bar.total += len(todo) + (not base_done)
            self.bar.refresh()
        if not todo and base_done:
            return
        batches = self.batches(seed)
        lowest = {(c, s): self._lowest(seed, c, s) for c, s in todo}
        need = {low - 1 for low in lowest.values() if low > 0}  # the layer outputs the rows reuse
        record = bool(need) and (self.cache_batches is not batches or not need <= set(self.cache.needed))
        if record:
            self.cache = LayerCache(self.layers, sorted(need))
            self.cache_batches = None
        base = self._baseline(seed, batches, base_done, record)
        # the baseline on these rows' documents (it may have grown to more: documents on demand)
        base, base_docs = _within(base, self.docs.get(base.key), sum(b.size for b in batches))
        self.bar.update(not base_done)
        instances = self.instances.setdefault(seed, {})
        for cls, s in todo:
            self.bar.set_postfix_str(f"seed {seed} {cls.name} {s.name or f'{s.fraction:.2f}'}")
            t0 = time.perf_counter()
            neurons = self._neurons(seed, s)
            n_ablated = sum(int(t.numel()) for t in neurons)
            if n_ablated == 0:
                top1, ce, n, docs, ld = base.top1, base.ce, base.n_eval, base_docs, base.logit_diff
            else:
                method = instances.get(cls.name) or instances.setdefault(cls.name, cls(self.context(seed, batches)))
                low = lowest[(cls, s)]
                below = self.cache.skip_below(low) if low > 0 else nullcontext()
                on_batch = self.cache.on_batch(method.on_batch) if low > 0 else method.on_batch
                with method.ablate(neurons), below:
                    m = _evaluate(self.model, batches, self.world, on_batch)
                top1, ce, n, docs, ld = m.top1, m.ce, m.n, m.doc_sums(), m.logit_diff
            seconds = time.perf_counter() - t0
            row = ResultRow.measured(
                cls.name, s.fraction, seed, top1, ce, n, n_ablated, self.n_neurons, seconds, base, target=s.name,
                logit_diff=ld,
            )  # fmt: skip
            self.store_row(row, docs)
            self.bar.update(1)

    # -- documents on demand ----------------------------------------------------------------------------------------
    def grow(self, seed: int, wanted: list[tuple[type, NeuronSet]], n_docs: int) -> None:
        """Grow the stored rows of ``seed`` (its baseline and ``wanted``) that have fewer than ``n_docs`` documents to
        the first ``n_docs``: only the added documents are evaluated, their per-document sums appended, and the row
        stored again under its key with its metrics from the concatenated sums (delta against the baseline on the
        same documents; seconds added up). Rows that have them already are left alone."""
        if self.segments is None or n_docs not in self.doc_counts:
            raise KnockoutError(f"rows grow only to a planned document count ({list(self.doc_counts)}), not {n_docs}")
        keys = [(c, s) for c, s in wanted if _n_docs(self.docs[row_key(c.name, s.fraction, seed, s.name)]) < n_docs]
        base = self.store.get("baseline", 0.0, seed)
        base_short = _n_docs(self.docs[base.key]) < n_docs
        if not keys and not base_short:
            return
        self.bar.total += len(keys) + base_short
        self.bar.refresh()
        if base_short:
            base = self._grow_baseline(seed, n_docs)
            self.bar.update(1)
        base_n, base_docs = _within(base, self.docs[base.key], n_docs)
        instances = self.instances.setdefault(seed, {})
        for cls, s in keys:
            self.bar.set_postfix_str(f"seed {seed} {cls.name} {s.name or f'{s.fraction:.2f}'} to {n_docs} documents")
            row = self.store.get(cls.name, s.fraction, seed, s.name)
            docs = self.docs[row.key]
            have = _n_docs(docs)
            t0 = time.perf_counter()
            if row.n_ablated == 0:
                added = {f: v[have:n_docs] for f, v in base_docs.items()}
            else:
                method = instances.get(cls.name) or instances.setdefault(
                    cls.name, cls(self.context(seed, self.batches(seed)))
                )
                batches, offset = self._added(have, n_docs)
                with method.ablate(self._neurons(seed, s)):
                    m = _evaluate(self.model, batches, self.world, _shifted(method.on_batch, offset))
                added = m.doc_sums()
            grown = _joined(docs, added)
            self.store_row(_from_sums(row, grown, row.seconds + time.perf_counter() - t0, base_n), grown)
            self.bar.update(1)

    def _grow_baseline(self, seed: int, n_docs: int) -> ResultRow:
        """The baseline of ``seed`` grown to ``n_docs`` documents (the first seed's added sums where the evaluation
        inputs do not depend on the seed and it has them, else evaluated)."""
        base = self.store.get("baseline", 0.0, seed)
        docs = self.docs[base.key]
        have = _n_docs(docs)
        first = self.docs.get(row_key("baseline", 0.0, self.first_seed))
        same = seed != self.first_seed and self.run.loaded.task not in SEED_DEPENDENT_TASKS
        t0 = time.perf_counter()
        if same and first is not None and _n_docs(first) >= n_docs and self.done("baseline", 0.0, self.first_seed):
            added, seconds = {f: v[have:n_docs] for f, v in first.items()}, base.seconds  # the same model and inputs
        else:
            batches, _ = self._added(have, n_docs)
            added = _evaluate(self.model, batches, self.world).doc_sums()
            seconds = base.seconds + time.perf_counter() - t0
        grown = _joined(docs, added)
        row = _from_sums(base, grown, seconds, None)
        self.store_row(row, grown)
        return row

    def _added(self, have: int, n_docs: int) -> tuple[list[Batch], int]:
        """The batches of documents ``[have, n_docs)`` (both planned counts) and the index of their first batch among
        all the batches of the first ``n_docs`` (what an input-dependent method seeds its draws by)."""
        if have not in self.doc_counts:
            raise KnockoutError(
                f"a stored row has {have} documents, not a planned count ({list(self.doc_counts)}); --restart the run"
            )
        i, j = self.doc_counts.index(have), self.doc_counts.index(n_docs)
        batches = [b for segment in self.segments[i + 1 : j + 1] for b in segment]
        return batches, sum(len(segment) for segment in self.segments[: i + 1])

    def _lowest(self, seed: int, cls: type, s: NeuronSet) -> int:
        """The lowest layer ``s`` ablates when the layers below it can be reused for ``cls`` (else 0): constant
        methods only (a weight edit leaves the layers below alone; ``patch`` and resampling run their own forward
        passes in ``on_batch``)."""
        if self.layers is None or not issubclass(cls, ConstantAblation):
            return 0
        layers = [i for i, t in enumerate(self._neurons(seed, s)) if t.numel()]
        return layers[0] if layers else 0

    def close(self) -> None:
        """The end of the run's rows: rank 0's files are complete when this returns on any rank."""
        self.bar.close()
        distributed.barrier()


def _shifted(on_batch, offset: int):
    """``on_batch`` told each batch's index among all the batches of the row's documents (``offset`` + its index
    among the added ones): an input-dependent method draws the same inputs for a batch however the row was grown."""
    return lambda index, batch: on_batch(offset + index, batch)


def _n_docs(sums: dict) -> int:
    return len(sums["n"])


def _joined(sums: dict, added: dict) -> dict:
    """Per-document sums of the documents of ``sums`` followed by those of ``added``."""
    return {f: np.concatenate([np.asarray(sums[f]), np.asarray(added[f])]) for f in runfolder.DOC_FIELDS}


def _from_sums(row: ResultRow, sums: dict, seconds: float, baseline: ResultRow | None) -> ResultRow:
    """``row`` with its metrics from per-document ``sums`` (top-1 = correct / n, CE = ce_sum / n, summed over the
    documents) and its changes from ``baseline`` (``None``: it is the baseline)."""
    n = int(np.sum(sums["n"]))
    top1, ce = int(np.sum(sums["correct"])) / n, float(np.sum(sums["ce_sum"])) / n
    return ResultRow.measured(
        row.method, row.fraction, row.seed, top1, ce, n, row.n_ablated, row.n_neurons, seconds, baseline,
        target=row.target,
    )  # fmt: skip


def _within(row: ResultRow, sums: dict | None, n_docs: int) -> tuple[ResultRow, dict | None]:
    """``row`` and its ``sums`` on its first ``n_docs`` documents (themselves when it has no more)."""
    if sums is None or _n_docs(sums) <= n_docs:
        return row, sums
    cut = {f: sums[f][:n_docs] for f in runfolder.DOC_FIELDS}
    return _from_sums(row, cut, row.seconds, None), cut


def ablate_sets(run: Prepared) -> list[ComponentSet]:
    """The named sets of the run's ``--ablate`` spec on its sites (ranges checked)."""
    return component_sets(run.cfg.ablate, run.sites)


def run_targets(
    run: Prepared, targets: list[ComponentSet], progress: bool = True, notify: Callbacks | None = None
) -> RowEngine:
    """Every method of ``run.cfg`` on every named set of ``targets``, per seed (``--ablate`` runs and scans); returns
    the engine (its statistics, first batches and method contexts serve a scan's attribution estimate)."""
    classes = [get_method(m) for m in run.cfg.methods]
    engine = RowEngine(run, progress, notify, targets, run.cfg.seeds, len(classes) * len(targets), "targets")
    for seed in run.cfg.seeds:
        engine.ensure(seed, [(c, NeuronSet.named(t)) for t in targets for c in classes])
    engine.close()
    return engine
