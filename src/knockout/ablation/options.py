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
    """How ``optimal`` learns its constants (see :mod:`knockout.ablation.optimal`). The defaults train each neuron
    set for a few seconds on a CPU (docs/design.md); the answer flags a set whose constants end above a contender on
    the evaluation split."""

    prefix = "optimal"
    title = "optimal (learned constants; knockout.ablation.optimal)"

    steps: int = setting(8, "Adam steps per neuron set", "optimal", kind="int")
    lr: float = setting(0.06, "learning rate, in units of each neuron's std", "optimal", kind="float")
    batch_size: int = setting(2, "collection rows (sequences, or images) per step", "optimal", kind="int")
    train_length: int | None = setting(
        64,
        "text: train and choose on the first N tokens of each collection row (shorter rows: more documents per "
        "second); null: whole rows",
        "optimal",
        kind="int",
    )
    tokens: int | None = setting(
        None,
        "scored collection targets trained on (default: steps x batch-size rows, so that no row is seen twice)",
        "optimal",
        kind="int",
    )
    held_out_tokens: int = setting(
        250,
        "scored targets of the collection split held out of training (every fourth row): the constants are chosen on "
        "them (learned, or zero, mean or peak if better)",
        "optimal",
        kind="int",
    )
    eval_every: int = setting(
        0, "also score the held-out part every N steps, stop once it got worse and keep the best (0: the end only)",
        "optimal", kind="int",
    )  # fmt: skip
    max_shift: float | None = setting(
        1.0,
        "keep every constant within this many of its neuron's stds of its mean (regularisation toward the mean; "
        "null: no limit)",
        "optimal",
        kind="float",
    )

    def __post_init__(self):
        self._int("steps", 0)
        self._positive("lr")
        self._int("batch_size", 1)
        self._int("train_length", 2, optional=True)
        self._int("tokens", 1, optional=True)
        self._int("held_out_tokens", 1)
        self._int("eval_every", 0)
        if self.max_shift is not None:
            self._positive("max_shift")


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
