"""The sweep: methods x fractions x seeds -> one results row each, resumable."""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import knockout
from knockout.ablation.methods import MethodContext, get_method
from knockout.ablation.selection import NeuronSelection
from knockout.data.tasks import SEED_DEPENDENT_TASKS, eval_batches, stats_batches
from knockout.errors import KnockoutError
from knockout.evaluation.evaluate import evaluate
from knockout.experiments.config import SweepConfig
from knockout.experiments.store import ResultStore
from knockout.loading import LoadedModel, load_model, model_identity
from knockout.sites import Site, find_sites
from knockout.stats.collect import collect_stats
from knockout.stats.statistics import Statistics

log = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"


def check_resumable(cfg: SweepConfig, out: Path) -> None:
    """Raise if ``out`` holds a run whose results-defining settings differ from ``cfg``."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KnockoutError(f"{str(path)!r} is damaged ({e}); use another --out folder or delete it") from e
    old["options"] = {k: v for k, v in (old.get("options") or {}).items() if k not in SweepConfig.SPEED_OPTIONS}
    new = json.loads(json.dumps(cfg.result_fields()))
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise KnockoutError(
            f"{str(out)!r} holds a run with different settings ({detail}). Use another --out folder, or the same "
            "settings to resume it."
        )


def environment() -> dict:
    import transformers

    return {
        "knockout": knockout.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def check_max_length(cfg: SweepConfig, model: torch.nn.Module, task: str) -> None:
    """Refuse a ``max_length`` beyond a text model's position embeddings (it would fail mid-run)."""
    if task == "image":
        return
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # their positions start after the padding index
    if limit and cfg.max_length > limit:
        raise KnockoutError(f"--max-length {cfg.max_length} exceeds the model's {limit} positions; use at most {limit}")


def stats_meta(cfg: SweepConfig, identity: dict) -> dict[str, str]:
    """The metadata saved with statistics: the model's identity and how the collection set was made."""
    return {
        "model": json.dumps(identity),
        "data": cfg.data,
        "stats_tokens": str(cfg.stats_tokens),
        "max_length": str(cfg.max_length),
        "stats_skip_first": str(cfg.stats_skip_first),
    }


def obtain_stats(
    cfg: SweepConfig, loaded: LoadedModel, sites: list[Site], identity: dict, out: Path, progress: bool = True
) -> tuple[Statistics, bool]:
    """The run's statistics: the run folder's own if present (and of this model), else loaded from
    ``cfg.stats_path`` or collected. Returns them and whether they still have to be saved to the run folder."""
    path = out / STATS_FILE
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
        stats = collect_stats(
            loaded.model,
            sites,
            stats_batches(cfg, loaded),
            cfg.eps,
            cfg.hist_limit,
            meta=stats_meta(cfg, identity),
            progress=progress,
        )
    for i, layer in enumerate(stats.layers):
        if layer.clipped_fraction > 1e-3:
            log.warning(
                "layer %d: %.2f%% of activations lie outside ±%g and are left out of the peak; raise --hist-limit",
                i,
                100 * layer.clipped_fraction,
                stats.limit,
            )
    return stats, source != path


def run_sweep(cfg: SweepConfig, progress: bool = True, loaded: LoadedModel | None = None) -> Path:
    """Run (or resume) the sweep of ``cfg``; returns the run folder.

    For each seed: the unablated baseline, then for each method and fraction the ablated evaluation. Rows already
    in the folder's results are skipped, so re-running the same command resumes an interrupted run.
    """
    out = Path(cfg.out)
    check_resumable(cfg, out)
    loaded = loaded or load_model(cfg.model, cfg.gguf_file, cfg.task, cfg.dtype, cfg.device)
    if cfg.task not in ("auto", loaded.task):
        raise KnockoutError(f"config task {cfg.task!r} does not match the loaded model's task {loaded.task!r}")
    model = loaded.model
    sites = find_sites(model, cfg.site_module, cfg.n_heads)
    identity = model_identity(cfg.model, model, sites)
    classes = [get_method(m) for m in cfg.methods]
    for cls in classes:
        if loaded.task not in cls.tasks:
            raise KnockoutError(f"method {cls.name!r} does not apply to {loaded.task} models")
    # Everything that can fail on bad input happens before the first file is written.
    check_max_length(cfg, model, loaded.task)
    first_batches = eval_batches(cfg, loaded, cfg.seeds[0])
    stats, save_stats = None, False
    if any(c.needs_stats for c in classes):
        stats, save_stats = obtain_stats(cfg, loaded, sites, identity, out, progress)

    def context(seed: int, batches) -> MethodContext:
        return MethodContext(model, sites, stats, seed, loaded.task, loaded.processor, batches, cfg.options)

    first_instances = {cls.name: cls(context(cfg.seeds[0], first_batches)) for cls in classes}
    out.mkdir(parents=True, exist_ok=True)
    resolved = {
        "task": loaded.task,
        "model_identity": identity,
        "device": str(loaded.device),
        "dtype": str(next(model.parameters()).dtype),
        "environment": environment(),
    }
    cfg.save(out / "config.json", extra={"resolved": resolved})

    if save_stats:
        stats.save(out / STATS_FILE)
    store = ResultStore(out)
    widths = [s.width for s in sites]
    total = len(cfg.seeds) * (1 + len(classes) * len(cfg.fractions))
    bar = tqdm(total=total, desc="sweep", unit="row", disable=not progress)
    for seed in cfg.seeds:
        todo = [(c, f) for c in classes for f in cfg.fractions if (c.name, f, seed) not in store]
        if ("baseline", 0.0, seed) in store and not todo:
            bar.update(1 + len(classes) * len(cfg.fractions))
            continue
        same_inputs = seed == cfg.seeds[0] or loaded.task not in SEED_DEPENDENT_TASKS
        batches = first_batches if same_inputs else eval_batches(cfg, loaded, seed)
        selection = NeuronSelection(widths, seed, cfg.selection)
        save_selection(out, selection)
        base = store.get("baseline", 0.0, seed)
        if base is None:
            t0 = time.perf_counter()
            m = evaluate(model, batches)
            base = _row("baseline", 0.0, seed, m.top1, m.ce, None, 0, sum(widths), m.n, time.perf_counter() - t0)
            store.add(base)
        bar.update(1 + len(classes) * len(cfg.fractions) - len(todo))
        method_ctx = context(seed, batches)
        instances = first_instances if seed == cfg.seeds[0] else {}
        for cls, fraction in todo:
            bar.set_postfix_str(f"seed {seed} {cls.name} {fraction:.2f}")
            t0 = time.perf_counter()
            n_ablated = selection.n_ablated(fraction)
            if n_ablated == 0:
                top1, ce, n = base["top1"], base["ce"], base["n_eval"]
            else:
                method = instances.get(cls.name) or instances.setdefault(cls.name, cls(method_ctx))
                with method.ablate(selection.at(fraction)):
                    m = evaluate(model, batches, on_batch=method.on_batch)
                top1, ce, n = m.top1, m.ce, m.n
            store.add(
                _row(cls.name, fraction, seed, top1, ce, base, n_ablated, sum(widths), n, time.perf_counter() - t0)
            )
            bar.update(1)
    bar.close()
    return out


def save_selection(out: Path, selection: NeuronSelection) -> None:
    """Add ``selection``'s random orders to ``out/selection.safetensors`` (the record of the chosen neurons)."""
    path = out / "selection.safetensors"
    tensors = load_file(str(path)) if path.is_file() else {}
    tensors.update(selection.state_dict())
    note = "random neuron order per seed; fraction f ablates the first round(f * n) of each order"
    tmp = path.with_name(".selection.safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"mode": selection.mode, "note": note})
    tmp.replace(path)


def _row(method, fraction, seed, top1, ce, base, n_ablated, n_neurons, n_eval, seconds) -> dict:
    return {
        "method": method,
        "fraction": fraction,
        "seed": seed,
        "top1": top1,
        "ce": ce,
        "delta_top1": 0.0 if base is None else top1 - base["top1"],
        "delta_ce": 0.0 if base is None else ce - base["ce"],
        "n_ablated": n_ablated,
        "n_neurons": n_neurons,
        "n_eval": n_eval,
        "seconds": round(seconds, 4),
    }
