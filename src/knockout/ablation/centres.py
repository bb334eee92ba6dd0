"""Constant methods whose constant is another centre of the neuron's distribution (see :mod:`knockout.stats.centres`).

* ``median``: the median of all values, from the histogram (within ``eps`` of the sample median).
* ``mode``: the maximum of a Gaussian kernel density estimate with Silverman's bandwidth (no bin width).
* ``peak-smooth``: the maximum of the histogram smoothed with a Gaussian kernel of half Silverman's bandwidth (at
  least 2 eps), refined between bins: the peak, made stable against rounding of the activations (``peak`` takes
  the lowest of exactly tied bins, as ``numpy.argmax``, so one value crossing a bin edge can move it far).
* ``peak-nopm``: the peak after removing point masses (a modal bin that is a thin spike, not the top of a bulk).
* ``peak@EPS``: the peak with another bin width, one row per width, re-binned from the stored histogram:
  ``peak@0.05`` (absolute width, rounded to a multiple of the stored eps), ``peak@fd`` (Freedman–Diaconis per
  neuron, ``2 IQR N^(-1/3)``), ``peak@0.5std`` / ``peak@0.5iqr`` (relative to each neuron's std, or IQR / 1.34).
  ``peak@<stored eps>`` equals ``peak`` exactly.

None of these ever ablates to NaN: a neuron whose centre is undefined (e.g. its median lies outside the histogram
window) makes the method raise a :class:`KnockoutError` naming the layer and the neuron.

None is in ``methods="all"`` (:attr:`~knockout.ablation.methods.AblationMethod.in_all`): ask for them by name,
e.g. ``--methods zero,mean,peak,peak-smooth,median,mode,peak-nopm,peak@0.05,peak@fd``.
"""

from __future__ import annotations

import logging
import math
import re
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from knockout.ablation.methods import ConstantAblation, register, register_parametrised
from knockout.errors import KnockoutError
from knockout.stats import centres
from knockout.stats.running import LayerStats

log = logging.getLogger(__name__)

#: What to do about a centre the histogram window leaves undefined.
WIDEN = "raise --hist-limit, or use auto (which a larger --eps widens)"

#: How many undefined neurons an error message lists.
MAX_LISTED = 5


def check_defined(method: str, values: list[torch.Tensor], why: str) -> list[torch.Tensor]:
    """``values`` (per layer ``[width]``) unchanged, or a :class:`KnockoutError` naming the layers and neurons where
    a value is NaN or infinite, and ``why``."""
    bad = [(layer, int(i)) for layer, v in enumerate(values) for i in torch.nonzero(~torch.isfinite(v)).flatten()]
    if bad:
        listed = ", ".join(f"layer {layer} neuron {i}" for layer, i in bad[:MAX_LISTED])
        more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise KnockoutError(f"method {method!r} has no value for {len(bad)} neurons ({listed}{more}): {why}")
    return values


class CentreAblation(ConstantAblation):
    """A constant method computing one centre per layer from the statistics; subclasses define :meth:`centre`."""

    needs_stats = True
    #: Asked for by name: ``all`` (the demo and the paper's presets) stays zero, mean, peak and resampling, so those
    #: runs and their timings do not change; ``--methods all,median`` is refused, so list them explicitly.
    in_all = False
    #: Why a centre can be undefined (NaN), for the error message.
    undefined: ClassVar[str] = f"every value of the neuron lies outside the histogram window; {WIDEN}"

    @abstractmethod
    def centre(self, stats: LayerStats) -> torch.Tensor:
        """``[width]`` centre of every neuron of one layer (float64; NaN where it is undefined)."""

    def constants(self) -> list[torch.Tensor]:
        values = [self.centre(layer).float() for layer in self.ctx.stats.layers]
        return check_defined(self.name, values, self.undefined)


@register("median")
class MedianAblation(CentreAblation):
    """z_i := median of z_i over the collection set (from the histogram, within eps)."""

    undefined = f"its median lies outside the histogram window (half its values clipped); {WIDEN}"

    def centre(self, stats):
        return centres.median(stats)


@register("mode")
class ModeAblation(CentreAblation):
    """z_i := maximum of a kernel density estimate of z_i (Silverman bandwidth; no bin width)."""

    def centre(self, stats):
        return centres.mode(stats)


@register("peak-smooth")
class PeakSmoothAblation(CentreAblation):
    """z_i := peak of z_i's histogram lightly smoothed (Gaussian kernel, half Silverman's width, at least 2 eps),
    to sub-bin precision: a peak that rounding of the activations cannot move."""

    def centre(self, stats):
        return centres.peak_smooth(stats)


@register("peak-nopm")
class PeakWithoutPointMassesAblation(CentreAblation):
    """z_i := peak of z_i after removing point masses (thin spikes such as a repeated first-token value)."""

    def centre(self, stats):
        return centres.peak_without_point_masses(stats)


# -- peak@EPS -------------------------------------------------------------------------------------------------
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_EPS_RE = re.compile(rf"^(?P<value>{_NUMBER})(?P<unit>std|iqr)?$")


@dataclass(frozen=True)
class EpsChoice:
    """How ``peak@PARAM`` chooses each neuron's bin width: ``kind`` is ``"abs"`` (``value`` is the width),
    ``"fd"`` (Freedman–Diaconis; ``value`` unused), ``"std"`` or ``"iqr"`` (``value`` times the neuron's spread)."""

    kind: str
    value: float = math.nan

    @property
    def label(self) -> str:
        """Human-readable, e.g. ``0.05``, ``Freedman–Diaconis``, ``0.5 × std``."""
        if self.kind == "abs":
            return f"{self.value:g}"
        if self.kind == "fd":
            return "Freedman–Diaconis"
        return f"{self.value:g} × {'std' if self.kind == 'std' else 'IQR/1.34'}"

    def widths(self, stats: LayerStats) -> torch.Tensor | float:
        """The requested width per neuron (a float for ``abs``, else ``[width]``). A neuron whose spread is 0 (a
        constant neuron, or more than half its values in one stored bin for ``fd``/``iqr``) gets the stored eps."""
        if self.kind == "abs":
            return self.value
        w = centres.fd_eps(stats) if self.kind == "fd" else centres.relative_eps(stats, self.value, self.kind)
        return torch.where(w == 0, stats.eps, w)


def parse_eps(param: str) -> EpsChoice:
    """The :class:`EpsChoice` of ``peak@param``: ``0.05`` / ``5e-2`` (absolute), ``fd``, ``0.5std``, ``0.5iqr``.
    Raises one :class:`KnockoutError` saying what is accepted for anything else."""
    text = param.strip().lower()
    if text == "fd":
        return EpsChoice("fd")
    match = _EPS_RE.match(text)
    value = float(match["value"]) if match else math.nan
    if not (match and math.isfinite(value) and value > 0):
        raise KnockoutError(
            f"bad bin width {param!r} in 'peak@{param}': give a positive absolute width (peak@0.05), 'fd' for "
            "Freedman–Diaconis per neuron (peak@fd), or a multiple of each neuron's spread (peak@0.5std, peak@0.5iqr)"
        )
    return EpsChoice(match["unit"] or "abs", value)


class PeakAtAblation(CentreAblation):
    """z_i := peak of z_i for another bin width (``peak@0.05``, ``peak@fd``, ``peak@0.5std``)."""

    eps_choice: ClassVar[EpsChoice] = EpsChoice("abs", 0.01)

    @property
    def undefined(self) -> str:
        if self.eps_choice.kind in ("fd", "iqr"):
            return f"a quartile lies outside the histogram window, so its bin width is unknown; {WIDEN}"
        return CentreAblation.undefined

    def constants(self) -> list[torch.Tensor]:
        choice = self.eps_choice
        if choice.kind == "abs" and self.ctx.stats.layers:
            layer = self.ctx.stats.layers[0]  # every layer has the same grid
            used = float(centres.snapped_eps(layer, choice.value)[0])
            if not math.isclose(used, choice.value, rel_tol=1e-9):
                log.warning("%s: %g is not a multiple of the stored eps %g; using bins of %g", self.name,
                            choice.value, layer.eps, used)  # fmt: skip
        return super().constants()

    def centre(self, stats):
        return centres.peak_at(stats, self.eps_choice.widths(stats))


@register_parametrised("peak")
def peak_at(param: str, name: str) -> type[PeakAtAblation]:
    """peak with bins of width EPS: absolute (peak@0.05), per neuron fd (Freedman–Diaconis), 0.5std or 0.5iqr.
    (needs statistics)

    The factory of the ``peak@EPS`` family: the class of ``name`` = ``peak@param``."""
    choice = parse_eps(param)
    doc = f"z_i := peak of z_i with bins of width {choice.label} (re-binned from the stored histogram)."
    return type("PeakAt", (PeakAtAblation,), {"eps_choice": choice, "__doc__": doc, "__module__": __name__})
