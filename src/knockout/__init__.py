"""knockout: neuron-ablation experiments on the attention pre-out of Hugging Face transformers.

Python API, bottom-up::

    from knockout import find_sites, collect_stats, NeuronSelection, get_method, MethodContext, evaluate
    sites = find_sites(model)                       # one Site per layer: the input of the attention out-projection
    stats = collect_stats(model, sites, batches)    # streaming mean/var/min/max/histogram per neuron
    sel = NeuronSelection([s.width for s in sites], seed=0)
    method = get_method("peak")(MethodContext(model, sites, stats))
    with method.ablate(sel.at(0.5)):                # weights restored on exit
        metrics = evaluate(model, batches)

or the whole experiment: ``knockout.run_sweep(knockout.SweepConfig(model=..., out=...))``, optionally logged to a
tracker (``callbacks=[knockout.MLflowCallback("file:./mlruns")]``); a run's constants for other tools:
``knockout.export_constants(run_dir, "peak", "transformerlens")``. Named components:
``knockout.components("L9.H6,L9.H9", sites)`` gives what ``method.ablate`` takes (docs/components.md). Every public
name: docs/api.md.
"""

from knockout.ablation import METHODS, AblationMethod, MethodContext, NeuronSelection, get_method, register  # noqa: E402
from knockout.components import component_sets, components  # noqa: E402
from knockout.config import SweepConfig  # noqa: E402
from knockout.errors import KnockoutError  # noqa: E402
from knockout.evaluation import Metrics, evaluate  # noqa: E402
from knockout.experiments.callbacks import Callback  # noqa: E402
from knockout.experiments.runner import run_sweep  # noqa: E402
from knockout.export import export_constants  # noqa: E402
from knockout.hooks import capture, edit_preout, fold_constants, replace_with_constants  # noqa: E402
from knockout.loading import load_model  # noqa: E402
from knockout.reporting.results import RunResults, load_run  # noqa: E402
from knockout.sites import MLP_SITE_PATTERNS, SITE_PATTERNS, Site, find_sites  # noqa: E402
from knockout.stats import Statistics, collect_stats  # noqa: E402
from knockout.tracking import MLflowCallback, WandbCallback  # noqa: E402
from knockout.version import __version__  # noqa: E402

__all__ = [
    "METHODS",
    "MLP_SITE_PATTERNS",
    "SITE_PATTERNS",
    "AblationMethod",
    "Callback",
    "KnockoutError",
    "MLflowCallback",
    "MethodContext",
    "Metrics",
    "NeuronSelection",
    "Site",
    "Statistics",
    "SweepConfig",
    "WandbCallback",
    "__version__",
    "capture",
    "collect_stats",
    "component_sets",
    "components",
    "edit_preout",
    "evaluate",
    "export_constants",
    "find_sites",
    "fold_constants",
    "get_method",
    "load_model",
    "register",
    "replace_with_constants",
    "RunResults",
    "load_run",
    "run_sweep",
]
