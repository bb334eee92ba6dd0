"""The sweep: methods x fractions x seeds -> one results row each, resumable.

This module orchestrates; the run folder's files are written through :mod:`knockout.runfolder`, the batches are
built by :mod:`knockout.data.tasks`, and the methods come from the registry in :mod:`knockout.ablation`.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from knockout import distributed, runfolder
from knockout.ablation.methods import MethodContext, get_method
from knockout.ablation.selection import NeuronSelection
from knockout.data.batch import Batch
from knockout.data.packing import scored_fraction
from knockout.data.tasks import SEED_DEPENDENT_TASKS, DataSpec, ModelInputs, eval_batches, probe_inputs, stats_batches
from knockout.devices import model_dtype
from knockout.errors import KnockoutError
from knockout.evaluation.evaluate import evaluate
from knockout.evaluation.metrics import Metrics
from knockout.experiments.config import SweepConfig
from knockout.hooks import preout_length
from knockout.loading import DTYPES, LoadedModel, load_model, model_identity
from knockout.runfolder import ResultRow, ResultStore
from knockout.sites import Site, find_sites, text_config
from knockout.stats import centres
from knockout.stats.running import LayerStats, check_hist_memory
from knockout.stats.statistics import Statistics
from knockout.version import __version__

log = logging.getLogger(__name__)


def environment() -> dict:
    import transformers

    return {
        "knockout": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def check_max_length(max_length: int, model: torch.nn.Module, task: str) -> None:
    """Refuse a ``max_length`` beyond a text model's position embeddings (it would fail mid-run)."""
    if task == "image":
        return
    config = text_config(model.config)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # their positions start after the padding index
    if limit and max_length > limit:
        raise KnockoutError(f"--max-length {max_length} exceeds the model's {limit} positions; use at most {limit}")


def stats_meta(spec: DataSpec, identity: dict) -> dict[str, str]:
    """The metadata saved with statistics: the model's identity and how the collection set was made."""
    return {
        "model": json.dumps(identity),
        "data": spec.source,
        "stats_tokens": str(spec.stats_tokens),
        "max_length": str(spec.max_length),
        "stats_skip_first": str(spec.stats_skip_first),
    }


def model_inputs(loaded: LoadedModel, sites: list[Site], spec: DataSpec) -> ModelInputs:
    """What the batch builders need to know about ``loaded`` (for image models, the pre-out length is measured on
    one collection image)."""
    config = loaded.model.config
    probe = probe_inputs(spec, loaded.task, loaded.processor, config)
    seq = None if probe is None else preout_length(loaded.model, sites, probe)
    return ModelInputs(loaded.task, loaded.processor, config, seq)


def collect_run_stats(
    loaded: LoadedModel,
    sites: list[Site],
    spec: DataSpec,
    inputs: ModelInputs,
    eps: float,
    limit: float,
    identity: dict,
    progress: bool = True,
) -> Statistics:
    """Statistics of ``loaded``'s pre-out on the collection split of ``spec`` (``knockout stats`` and sweeps).

    Under ``torchrun`` each rank collects its share of the batches and the shares are all-reduced
    (:func:`knockout.distributed.collect_stats_sharded`): every rank returns the statistics of all batches."""
    batches = stats_batches(spec, inputs)
    if inputs.task != "image":
        log.info("statistics: %.1f%% of the computed positions are counted", 100 * scored_fraction(batches, "valid"))
    return distributed.collect_stats_sharded(
        loaded.model, sites, batches, eps=eps, limit=limit, meta=stats_meta(spec, identity),
        progress=progress and distributed.is_main(),
    )  # fmt: skip


def obtain_stats(
    cfg: SweepConfig,
    loaded: LoadedModel,
    sites: list[Site],
    identity: dict,
    out: Path,
    inputs: ModelInputs,
    progress: bool = True,
) -> tuple[Statistics, bool]:
    """The run's statistics: the run folder's own if present (and of this model), else loaded from
    ``cfg.stats_path`` or collected. Returns them and whether they still have to be saved to the run folder."""
    path = out / runfolder.STATS_FILE
    source = path if path.is_file() else (Path(cfg.stats_path) if cfg.stats_path else None)
    if source is not None:
        stats = Statistics.load(source)
        stats.check_model(identity, source=f"statistics in {str(source)!r}")
        if (stats.eps, stats.limit) != (cfg.eps, cfg.hist_limit):
            raise KnockoutError(
                f"statistics in {str(source)!r} use eps={stats.eps}, hist limit={stats.limit}; "
                f"pass --eps {stats.eps} --hist-limit {stats.limit} or recollect them"
            )
        log.info("using statistics from %s (%d tokens)", source, stats.n_tokens)
    else:
        spec = cfg.data_spec()
        stats = collect_run_stats(loaded, sites, spec, inputs, cfg.eps, cfg.hist_limit, identity, progress)
    stats.check_finite(f"statistics in {str(source)!r}" if source is not None else "the collected statistics")
    for i, layer in enumerate(stats.layers):
        if layer.clipped_fraction > 1e-3:
            log.warning(
                "layer %d: %.2f%% of activations lie outside ±%g and are left out of the peak; raise --hist-limit",
                i,
                100 * layer.clipped_fraction,
                stats.limit,
            )
        warn_clipped_neurons(i, layer)
    return stats, source != path


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


def _evaluate(model: torch.nn.Module, batches: list[Batch], on_batch=None) -> Metrics:
    """:func:`evaluate` on every batch, keeping per-document sums; in a distributed run on this rank's share,
    all-reduced, with the per-document sums of all ranks gathered in batch order (every rank holds them all)."""
    if distributed.world()[1] > 1:
        return distributed.evaluate_sharded(model, batches, on_batch=on_batch, per_doc=True)
    return evaluate(model, batches, on_batch=on_batch, per_doc=True)


def load_generator(cfg: SweepConfig, loaded: LoadedModel) -> LoadedModel | None:
    """The causal LM that writes ``resample-text``'s text when it is not the model itself (option
    ``resample_model``), loaded on the model's device and in its dtype; ``None`` otherwise."""
    spec = cfg.options.get("resample_model")
    if spec is None or "resample-text" not in cfg.methods:
        return None
    dtype = model_dtype(loaded.model)
    dtype_name = next((k for k, v in DTYPES.items() if v == dtype), "auto")
    generator = load_model(str(spec), task="causal", dtype=dtype_name, device=str(loaded.device))
    if generator.task != "causal":
        raise KnockoutError(f"resample_model must be a causal LM, got a {generator.task} model")
    return generator


def preflight(cfg: SweepConfig, restart: bool = False) -> dict:
    """The checks that need no model, run before it is loaded: ``--out`` is a writable folder, the data exists
    (its identity is returned: :func:`knockout.data.text.data_identity`), and an existing run folder is intact and
    holds a run of the same settings and data. ``restart``: move an existing run folder aside first."""
    from knockout.data.text import check_source, data_identity

    out = Path(cfg.out)
    runfolder.check_out(out)
    data_id = data_identity(cfg.data)
    check_source(cfg.data)
    if restart and (moved := runfolder.move_aside(out)) is not None:
        log.warning("--restart: moved the old run folder to %s", moved)
    runfolder.check_integrity(out)
    early = cfg.result_fields()
    if cfg.task == "auto":  # not known before the model is loaded
        early.pop("task")
    runfolder.check_resumable(out, early, SweepConfig.SPEED_OPTIONS, SweepConfig.defaults())
    runfolder.check_data(out, data_id)
    return data_id


def run_sweep(
    cfg: SweepConfig,
    progress: bool = True,
    loaded: LoadedModel | None = None,
    restart: bool = False,
    data_identity: dict | None = None,
) -> Path:
    """Run (or resume) the sweep of ``cfg``; returns the run folder.

    For each seed: the unablated baseline, then for each method and fraction the ablated evaluation. Rows already
    in the folder's results are skipped, so re-running the same command resumes an interrupted run. ``restart``
    moves an existing run folder aside (``<out>.old-<timestamp>``) and starts afresh. ``data_identity``: what
    :func:`preflight` returned when the caller already ran it (the CLI does, before loading the model); its checks,
    which hash the data, are then not repeated.

    Launched with ``torchrun`` (``WORLD_SIZE`` > 1) it runs data-parallel: see :func:`_run_sweep`.
    """
    with distributed.process_group(_launch_device(cfg)):
        return _run_sweep(cfg, progress, loaded, restart, data_identity)


def _launch_device(cfg: SweepConfig) -> torch.device:
    """The device whose tensors the process group communicates (it picks gloo for CPU, nccl for CUDA)."""
    from knockout.loading import resolve_device

    return resolve_device(cfg.device)


def _run_sweep(
    cfg: SweepConfig, progress: bool, loaded: LoadedModel | None, restart: bool, data_id: dict | None
) -> Path:
    """:func:`run_sweep` once the process group (if any) is joined.

    Distributed (torchrun): every rank loads the model, reads the same resume state and builds the same batches;
    statistics and every evaluation are sharded over the ranks and all-reduced, so all ranks hold the same rows
    (and per-document sums); only rank 0 writes files. A barrier separates the reading of the existing run folder
    from the first write.
    """
    main = distributed.is_main()
    progress = progress and main
    out = Path(cfg.out)
    if data_id is None:
        if main:  # rank 0 alone may move an old run folder aside (--restart); the others check what it left
            data_id = preflight(cfg, restart)
        distributed.barrier()
        if not main:
            data_id = preflight(cfg)
    loaded = loaded or load_model(cfg.model, cfg.gguf_file, cfg.task, cfg.dtype, cfg.device, cfg.device_map)
    cfg = cfg.for_task(loaded.task)
    runfolder.check_resumable(out, cfg.result_fields(), SweepConfig.SPEED_OPTIONS, SweepConfig.defaults())
    model = loaded.model
    sites = find_sites(model, cfg.site_module, cfg.n_heads, cfg.site)
    identity = model_identity(cfg.model, model, sites)
    classes = [get_method(m) for m in cfg.methods]
    for cls in classes:
        if loaded.task not in cls.tasks:
            raise KnockoutError(f"method {cls.name!r} does not apply to {loaded.task} models")
    # Everything that can fail on bad input happens before the first file is written.
    check_max_length(cfg.max_length, model, loaded.task)
    if any(c.needs_stats for c in classes):
        check_hist_memory([s.width for s in sites], cfg.eps, cfg.hist_limit)
    spec = cfg.data_spec()
    inputs = model_inputs(loaded, sites, spec)
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
        stats, save_stats = obtain_stats(cfg, loaded, sites, identity, out, inputs, progress)
    generator = load_generator(cfg, loaded)
    train = stats_batches(spec, inputs) if any(c.needs_train_batches for c in classes) else ()

    def context(seed: int, batches: list[Batch]) -> MethodContext:
        return MethodContext(
            model, sites, stats, seed, loaded.task, loaded.processor, batches, cfg.options, generator=generator,
            train_batches=train, artifacts=out / runfolder.ARTIFACTS_DIR,
        )  # fmt: skip

    first_instances = {cls.name: cls(context(cfg.seeds[0], first_batches)) for cls in classes}
    resolved = {
        "task": loaded.task,
        "positions_used": {"eval_scored_fraction": round(used, 6), "sort_by_length": spec.sort_by_length},
        "model_identity": identity,
        "device": str(loaded.device),
        "dtype": str(model_dtype(model)),
        "device_map": {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()} or None,
        "environment": environment(),
        "data_identity": data_id,
    }
    store = ResultStore(out) if main else ResultStore(out, read_only=True)
    distributed.barrier()  # every rank has read the folder's state; rank 0 may now write
    if main:
        runfolder.write_config(out, {**cfg.to_dict(), "resolved": resolved})
        if save_stats:
            stats.save(out / runfolder.STATS_FILE)
    widths = [s.width for s in sites]
    n_neurons = sum(widths)
    per_seed = 1 + sum(len(cfg.fractions_of(c.name)) for c in classes)
    bar = tqdm(total=len(cfg.seeds) * per_seed, desc="sweep", unit="row", disable=not progress)
    stored_docs = runfolder.read_doc_sums(out)  # the per-document sums of a resumed run, read once
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
            m = _evaluate(model, batches)
            base = ResultRow.measured("baseline", 0.0, seed, m.top1, m.ce, m.n, 0, n_neurons, time.perf_counter() - t0)
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
                top1, ce, n, docs = base.top1, base.ce, base.n_eval, base_docs
            else:
                method = instances.get(cls.name) or instances.setdefault(cls.name, cls(context(seed, batches)))
                with method.ablate(selection.at(fraction)):
                    m = _evaluate(model, batches, method.on_batch)
                top1, ce, n, docs = m.top1, m.ce, m.n, m.doc_sums()
            seconds = time.perf_counter() - t0
            if main and docs is not None:  # before the row, so a stored row always has its sums unless it predates them
                runfolder.save_doc_sums(out, cls.name, fraction, seed, docs)
            store.add(ResultRow.measured(cls.name, fraction, seed, top1, ce, n, n_ablated, n_neurons, seconds, base))
            bar.update(1)
    bar.close()
    distributed.barrier()  # rank 0's files are complete when run_sweep returns on any rank
    return out
