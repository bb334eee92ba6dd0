"""Nested random neuron selection.

For a seed, each fraction ``f`` ablates ``round(f * N)`` neurons (round half up), ``f = 1.0`` ablates all ``N`` of
them, and the set for a larger fraction contains the set for a smaller one: the neurons are the first ``k`` of a
fixed random order. (The authors' code drew ``int(f * d_model)`` per layer, so its "100%" left some neurons alive.)

Modes:
- ``per-layer`` (the paper's): an independent random order per layer, the same count ``round(f * width)`` in
  every layer;
- ``global``: one random order over all neurons of all layers, ``round(f * total)`` in all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from knockout.errors import KnockoutError

MODES = ("per-layer", "global")


def validate_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """Check that fractions are numbers in [0, 1]; return them sorted and without duplicates."""
    if not fractions:
        raise KnockoutError("give at least one fraction to ablate, e.g. 0,0.5,1")
    out = []
    for f in fractions:
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not math.isfinite(f) or not 0 <= f <= 1:
            raise KnockoutError(f"fractions must be numbers between 0 and 1 (0.5 = half the neurons), got {f!r}")
        out.append(float(f))
    return tuple(sorted(set(out)))


def count_for(fraction: float, n: int) -> int:
    """Number of neurons ablated at ``fraction`` of ``n``: ``floor(fraction * n + 0.5)``, exactly ``n`` at 1.0."""
    return n if fraction >= 1.0 else min(n, math.floor(fraction * n + 0.5))


class NeuronSelection:
    """The random order of neurons for one seed; :meth:`at` gives the (nested) ablated set for a fraction."""

    def __init__(self, widths: Sequence[int], seed: int, mode: str = "per-layer"):
        if mode not in MODES:
            raise KnockoutError(f"selection mode must be one of {MODES}, got {mode!r}")
        self.widths, self.seed, self.mode = list(widths), seed, mode
        g = torch.Generator().manual_seed(seed)
        if mode == "per-layer":
            self.orders = [torch.randperm(w, generator=g) for w in self.widths]
        else:
            self.orders = [torch.randperm(sum(self.widths), generator=g)]

    @property
    def n_neurons(self) -> int:
        return sum(self.widths)

    def n_ablated(self, fraction: float) -> int:
        if self.mode == "per-layer":
            return sum(count_for(fraction, w) for w in self.widths)
        return count_for(fraction, self.n_neurons)

    def at(self, fraction: float) -> list[torch.Tensor]:
        """Per layer, the sorted indices of the neurons ablated at ``fraction``."""
        if self.mode == "per-layer":
            return [o[: count_for(fraction, w)].sort().values for o, w in zip(self.orders, self.widths)]
        chosen = self.orders[0][: count_for(fraction, self.n_neurons)]
        starts = torch.tensor([0, *self.widths]).cumsum(0)
        return [(chosen[(chosen >= lo) & (chosen < hi)] - lo).sort().values for lo, hi in zip(starts[:-1], starts[1:])]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The random orders, enough to rebuild every fraction's set (saved beside the results)."""
        if self.mode == "per-layer":
            return {f"seed{self.seed}.layer{i}": o for i, o in enumerate(self.orders)}
        return {f"seed{self.seed}.global": self.orders[0]}
