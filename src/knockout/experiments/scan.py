"""Per-component scans: ablate each unit (head, layer or group of neurons) alone, with each method.

``knockout scan --unit head`` evaluates, per seed, the unablated baseline and then every unit of
:func:`knockout.components.scan_units` with every method, one row each (``target`` = the unit's name, e.g.
``L9.H6``), through the row engine, as ``--ablate`` sweeps (:func:`knockout.experiments.engine.run_targets`):
a killed scan resumes where it stopped, to the same values. With ``--attribution`` it also writes the attribution-
patching estimate of every unit's effect for every constant method (:mod:`knockout.evaluation.attribution`) to
``attribution.json``. The report (:mod:`knockout.reporting.scan`) compares the methods' rankings of the units.

Defaults (:func:`scan_config`, what ``knockout scan`` starts from; every flag overrides them): the methods zero,
mean and peak; seed 0; 8 evaluation prompts of task data (``--data ioi``) or 128 tokens of text in sequences of 32;
4096 statistics tokens. A scan's cost is (units x methods + 1) evaluations of the evaluation set, roughly halved by
reusing the unablated layers below each unit (:mod:`knockout.evaluation.prefix`); these defaults size a scan of
SmolLM2-135M's 270 heads (810 evaluations) under ten minutes on two shared CPU cores (docs/components.md has the
measurements).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from knockout import distributed, runfolder
from knockout.ablation.methods import ConstantAblation, get_method
from knockout.components import ComponentSet, scan_units
from knockout.config import SweepConfig, default, merge_settings
from knockout.errors import KnockoutError
from knockout.evaluation.attribution import attribution_sums, estimate, metric_name
from knockout.experiments.engine import RowEngine, run_targets
from knockout.experiments.prepare import Prepared, prepare
from knockout.loading import LoadedModel, resolve_device

log = logging.getLogger(__name__)

#: The settings ``knockout scan`` starts from (see the module docstring); ``eval_tokens`` depends on the data.
SCAN_DEFAULTS: dict = {
    "methods": ("zero", "mean", "peak"),
    "stats_tokens": 4096,
    "out": "runs/scan",
    "scan": {"unit": "head"},
}
#: A scan's evaluation set when none is given: 8 prompts of task data (one scored position each for ioi: about
#: 135 tokens on SmolLM2), or 128 tokens of text in sequences of at most 32 tokens (4 documents, so that every unit's
#: effect has a standard error).
SCAN_EVAL_PROMPTS = 8
SCAN_EVAL_TOKENS = 128
SCAN_TEXT_MAX_LENGTH = 32


def scan_config(**settings) -> SweepConfig:
    """A scan's config: :data:`SCAN_DEFAULTS` with ``settings`` on top; without ``eval_tokens``,
    :data:`SCAN_EVAL_PROMPTS` prompts of task data, or :data:`SCAN_EVAL_TOKENS` tokens of text (in sequences of
    :data:`SCAN_TEXT_MAX_LENGTH` unless ``max_length`` is given)."""
    from knockout.data.prompts import is_task_source

    values = merge_settings(SCAN_DEFAULTS, settings)
    task = is_task_source(values.get("data") or default("data"))
    if values.get("eval_tokens") is None:
        values["eval_tokens"] = SCAN_EVAL_PROMPTS if task else SCAN_EVAL_TOKENS
        if not task and values.get("max_length") is None:
            values["max_length"] = SCAN_TEXT_MAX_LENGTH
    return SweepConfig.from_dict(values)


def run_scan(cfg: SweepConfig, progress: bool = True, loaded: LoadedModel | None = None, restart: bool = False) -> Path:
    """Run (or resume) the scan of ``cfg`` (``cfg.scan.unit`` set); returns the run folder. ``loaded``: the model of
    ``cfg`` when the caller has it loaded already; ``restart``: move an existing folder aside first."""
    if cfg.scan.unit is None:
        raise KnockoutError("a scan needs a unit: --unit head, layer or neurons:K")
    with distributed.process_group(resolve_device(cfg.device)):
        try:
            run = prepare(cfg, distributed.world(), restart=restart, loaded=loaded)
            units = scan_units(run.sites, cfg.scan.unit)
            done = run_targets(run, units, progress and run.world.is_main)
            if cfg.scan.attribution:
                write_attribution(run, units, done)
            distributed.barrier()
        finally:
            runfolder.unlock_run(cfg.out)  # the run folder's lock, taken by rank 0 in prepare
    return Path(cfg.out)


def write_attribution(run: Prepared, units: list[ComponentSet], done: RowEngine) -> dict | None:
    """The attribution estimate of every unit for every constant method of the scan, on the first seed's batches,
    written to ``attribution.json`` (kept when it already covers them); returns its contents."""
    cfg, out = run.cfg, Path(run.cfg.out)
    methods = [m for m in cfg.methods if issubclass(get_method(m), ConstantAblation)]
    skipped = [m for m in cfg.methods if m not in methods]
    if skipped:
        log.warning("attribution estimates only constant methods; not %s", ", ".join(skipped))
    if not methods:
        return None
    old = runfolder.RunFolder(out).attribution()
    if old is not None and all(u.name in old["estimates"].get(m, {}) for m in methods for u in units):
        return old
    t0 = time.perf_counter()
    sums = attribution_sums(run.loaded.model, run.sites, done.first_batches)
    seed = cfg.seeds[0]
    estimates = {}
    for m in methods:
        constants = get_method(m)(done.context(seed, done.first_batches)).constants()
        estimates[m] = {u.name: estimate(sums, constants, u.neurons) for u in units}
    record = {
        "note": "attribution-patching ESTIMATE of each unit's effect (first order in constant - activation); "
        "not an exact ablation",
        "metric": metric_name(done.first_batches),
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 3),
        "estimates": estimates,
    }
    if run.world.is_main:
        runfolder.write_attribution(out, record)
    log.info("attribution estimate: %d units x %d methods in %.1f s", len(units), len(methods), record["seconds"])
    return record
