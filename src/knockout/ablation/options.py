"""The settings of the methods that take any: ``optimal`` (:class:`OptimalOptions`) and the resampling methods
(:class:`ResampleOptions`). Each group validates itself when it is made (before a model is loaded); the sweep's
config holds one of each (``SweepConfig.optimal``, ``SweepConfig.resample``) and hands them to the methods through
:class:`~knockout.ablation.methods.MethodContext`."""

from __future__ import annotations

from dataclasses import dataclass

from knockout.ablation.random_inputs import DEFAULT_PROMPT
from knockout.options import OptionGroup, setting


@dataclass(frozen=True)
class OptimalOptions(OptionGroup):
    """How ``optimal`` learns its constants (see :mod:`knockout.ablation.optimal`)."""

    prefix = "optimal"
    title = "optimal (learned constants; knockout.ablation.optimal)"

    steps: int = setting(100, "Adam steps per neuron set", "optimal", kind="int")
    lr: float = setting(0.02, "learning rate, in units of each neuron's std", "optimal", kind="float")
    batch_size: int | None = setting(
        None, "collection rows per step (default: the collection batches as they are)", "optimal", kind="int"
    )
    tokens: int | None = setting(
        None, "scored collection targets trained on (default: all of the collection split)", "optimal", kind="int"
    )

    def __post_init__(self):
        self._int("steps", 0)
        self._positive("lr")
        self._int("batch_size", 1, optional=True)
        self._int("tokens", 1, optional=True)


@dataclass(frozen=True)
class ResampleOptions(OptionGroup):
    """How the resampling methods draw and use their random inputs (see :mod:`knockout.ablation.resample`)."""

    prefix = "resample"
    title = "resampling"

    model: str | None = setting(
        None,
        "causal LM that writes resample-text's text (default: the model itself; required for masked LMs)",
        "resampling",
        kind="str",
    )
    prompt: str = setting(DEFAULT_PROMPT, "prompt of resample-text's generation", "resampling", kind="str")
    fixed: bool = setting(
        False,
        "the paper's protocol: one fixed random input per seed for every evaluation input",
        "resampling",
        kind="bool",
    )
    cache: bool = setting(
        True,
        "keep random-input activations across fractions (--no-resample-cache recomputes them for every fraction)",
        "resampling",
        kind="bool",
        affects_results=False,
    )

    def __post_init__(self):
        self._str("model", optional=True)
        self._str("prompt")
        self._bool("fixed")
        self._bool("cache")
