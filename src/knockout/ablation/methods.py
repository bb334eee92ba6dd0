"""Ablation methods and their registry.

A method turns "these neurons" into a scoped change of the model. Constant methods (zero, mean, peak) fold their
per-neuron constant into W_O (see :func:`knockout.hooks.fold_constants`), which costs nothing per forward pass.
Input-dependent methods (resampling) hook the pre-out and get told about each batch through :meth:`on_batch`.

Register a new method with ``@register("name")``; the sweep, the CLI and the reports pick it up by name. Names
are what users type (``zero``, ``mean``, ``peak``, ``resample-chars`` ...); registering a name twice raises.

A family of methods that take a parameter is registered once with ``@register_parametrised("base")`` on a factory;
users type ``base@param`` (``peak@0.05``, ``peak@fd``) and :func:`get_method` parses it, in one place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from knockout.ablation.options import OptimalOptions, ResampleOptions
from knockout.data.batch import Batch
from knockout.data.images import ImageOptions
from knockout.distributed import World, single
from knockout.errors import KnockoutError
from knockout.hooks import fold_constants
from knockout.loading import TASKS, LoadedModel
from knockout.sites import Site
from knockout.stats.statistics import Statistics


@dataclass
class MethodContext:
    """What a method may use: the model and its sites, the statistics, the seed and the data of the run."""

    model: torch.nn.Module
    sites: Sequence[Site]
    stats: Statistics | None = None
    seed: int = 0
    task: str = "causal"
    processor: Any = None
    """The model's tokenizer (text models) or image processor (image models; ``None`` if it has none)."""
    eval_batches: Sequence[Batch] = ()
    """The seed's evaluation batches (resampling aligns its random inputs with them)."""
    optimal: OptimalOptions = field(default_factory=OptimalOptions)
    """``optimal``'s settings."""
    resample: ResampleOptions = field(default_factory=ResampleOptions)
    """The resampling methods' settings."""
    image: ImageOptions = field(default_factory=ImageOptions)
    """Image normalisation for models without an image processor (``resample-pixels``)."""
    generator: LoadedModel | None = None
    """``resample-text``'s causal LM when it is not the model itself (``ResampleOptions.model``)."""
    train_batches: Sequence[Batch] = ()
    """Batches of the collection split (never the evaluation split), for methods that learn their values."""
    artifacts: Path | None = None
    """A folder where a method may keep what it learned (in a run folder, so a resumed run reuses it)."""
    world: World = field(default_factory=single)
    """This process's place in a distributed run (rank 0 writes files); a single process by default."""
    progress: bool = True
    """Whether a method's long work (``optimal``'s training) may show a progress bar."""
    counterfactual_batches: Sequence[Batch] = ()
    """Per evaluation batch (same index), the inputs of its prompts' counterfactuals, aligned row by row and position
    by position (``patch``; :func:`knockout.data.tasks.counterfactual_eval_batches`). Empty: the data has none."""


class AblationMethod(ABC):
    """Base class. Subclasses set ``name`` (by :func:`register`), ``needs_stats`` and ``tasks``."""

    name: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = False
    #: Whether the method learns from the collection split (the sweep then builds :attr:`MethodContext.train_batches`).
    needs_train_batches: ClassVar[bool] = False
    #: Whether the method reads the evaluation prompts' counterfactuals (the sweep then builds
    #: :attr:`MethodContext.counterfactual_batches`).
    needs_counterfactuals: ClassVar[bool] = False
    tasks: ClassVar[tuple[str, ...]] = TASKS
    #: Whether ``methods="all"`` includes this method (expensive or experimental methods are asked for by name).
    in_all: ClassVar[bool] = True
    #: Whether the method is a bound the others are measured against (``optimal``: the best any constant can do),
    #: not a contender in the answer's decisions.
    is_bound: ClassVar[bool] = False

    @classmethod
    def applies(cls, task: str, resample: ResampleOptions | None = None) -> bool:
        """Whether this method can run on a ``task`` model with these resampling settings (used to expand
        "all")."""
        return task in cls.tasks

    def __init__(self, ctx: MethodContext):
        if self.needs_stats and ctx.stats is None:
            raise KnockoutError(f"method {self.name!r} needs statistics; collect them with `knockout stats`")
        if ctx.task not in self.tasks:
            raise KnockoutError(f"method {self.name!r} does not apply to {ctx.task} models (only {self.tasks})")
        self.ctx = ctx

    @abstractmethod
    def ablate(self, neurons: Sequence[torch.Tensor]):
        """Context manager: inside it, ``neurons[l]`` (indices into layer l's pre-out) are ablated."""

    def on_batch(self, index: int, batch: Batch) -> None:
        """Called by :func:`knockout.evaluation.evaluate` before the forward pass on evaluation batch ``index``."""


class ConstantAblation(AblationMethod):
    """Replace each chosen neuron by a per-neuron constant, folded into W_O."""

    @abstractmethod
    def constants(self) -> list[torch.Tensor]:
        """Per layer, a ``[width]`` tensor of replacement values."""

    @contextmanager
    def ablate(self, neurons: Sequence[torch.Tensor]) -> Iterator[None]:
        if not hasattr(self, "_constants"):
            self._constants = self.constants()
        with fold_constants(self.ctx.sites, neurons, self._constants):
            yield


METHODS: dict[str, type[AblationMethod]] = {}
#: Families of methods with a parameter: ``base`` -> factory(param, name) returning the class of ``base@param``.
#: A factory raises :class:`KnockoutError` for a parameter it cannot read. Its classes are not in :data:`METHODS`.
PARAMETRISED: dict[str, Callable[[str, str], type[AblationMethod]]] = {}
_VARIANTS: dict[str, type[AblationMethod]] = {}
PARAM_SEP = "@"


def register(name: str):
    """Class decorator adding an :class:`AblationMethod` to :data:`METHODS` under ``name``."""

    def deco(cls: type[AblationMethod]) -> type[AblationMethod]:
        if name in METHODS:
            raise ValueError(f"ablation method {name!r} is already registered (by {METHODS[name].__qualname__})")
        if PARAM_SEP in name:
            raise ValueError(f"{name!r}: '{PARAM_SEP}' separates a parameter; use register_parametrised for a family")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def register_parametrised(base: str):
    """Decorator adding a factory ``(param, name) -> class`` to :data:`PARAMETRISED`: ``base@param`` names then
    resolve through it. ``base`` may also be a plain method (``peak`` and ``peak@0.05``); registering a family twice
    raises."""

    def deco(factory: Callable[[str, str], type[AblationMethod]]):
        if base in PARAMETRISED:
            raise ValueError(f"parametrised ablation method {base!r}@... is already registered")
        if PARAM_SEP in base:
            raise ValueError(f"{base!r}: a family's base name cannot contain '{PARAM_SEP}'")
        PARAMETRISED[base] = factory
        return factory

    return deco


def _unknown(name: str) -> KnockoutError:
    families = ", ".join(f"{b}{PARAM_SEP}..." for b in PARAMETRISED)
    known = ", ".join(METHODS) + (f"; with a parameter: {families}" if families else "")
    return KnockoutError(f"unknown ablation method {name!r}; known: {known}")


def get_method(name: str) -> type[AblationMethod]:
    """The class of method ``name``: a registered name, or ``base@param`` of a :func:`register_parametrised` family
    (the class is built once per name; its ``name`` is ``name`` as given)."""
    if name in METHODS:
        return METHODS[name]
    if name in _VARIANTS:
        return _VARIANTS[name]
    base, sep, param = name.partition(PARAM_SEP)
    if not sep:
        raise _unknown(name)
    if base not in PARAMETRISED:
        if base in METHODS:
            raise KnockoutError(f"ablation method {base!r} takes no parameter (got {name!r})")
        raise _unknown(name)
    cls = PARAMETRISED[base](param, name)
    cls.name = name
    _VARIANTS[name] = cls
    return cls


def methods_for(task: str, resample: ResampleOptions | None = None) -> list[str]:
    """Names of the registered methods that ``methods="all"`` runs on ``task`` with the ``resample`` settings (those
    that apply and are :attr:`AblationMethod.in_all`), in registration order."""
    return [n for n, cls in METHODS.items() if cls.in_all and cls.applies(task, resample)]


@register("zero")
class ZeroAblation(ConstantAblation):
    """z_i := 0."""

    def constants(self):
        return [torch.zeros(s.width) for s in self.ctx.sites]


@register("mean")
class MeanAblation(ConstantAblation):
    """z_i := mean of z_i over the collection set."""

    needs_stats = True

    def constants(self):
        return self.ctx.stats.means()


@register("peak")
class PeakAblation(ConstantAblation):
    """z_i := centre of the most populated eps-bin of z_i over the collection set (the mode).

    (In the variant of the authors' code that their run script imports, "peak" called the mean function.)
    """

    needs_stats = True

    def constants(self):
        return self.ctx.stats.peaks()
