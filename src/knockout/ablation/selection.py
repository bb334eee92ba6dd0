"""Nested random neuron selection.

For a seed, each fraction ``f`` ablates ``round(f * N)`` neurons (round half up), ``f = 1.0`` ablates all ``N`` of
them, and the set for a larger fraction contains the set for a smaller one: the neurons are the first ``k`` of a
fixed random order. (The authors' code drew ``int(f * d_model)`` per layer, so its "100%" left some neurons alive.)

Modes:
- ``per-layer`` (the paper's): an independent random order per layer, the same count ``round(f * width)`` in
  every layer;
- ``global``: one random order over all neurons of all layers, ``round(f * total)`` in all;
- ``heads-per-layer``: whole attention heads (every neuron ``head * d_head + j`` of a chosen head), an independent
  random order of heads per layer, ``round(f * n_heads)`` heads in every layer;
- ``heads-global``: whole heads, one random order over all heads of all layers, ``round(f * total_heads)`` in all.

Head modes need the head structure (``n_heads`` per layer; ``d_head = width // n_heads``), e.g. from
:meth:`NeuronSelection.for_sites`. They are nested and reach every head at 1.0 as neuron selection does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from knockout.errors import KnockoutError

MODES = ("per-layer", "global", "heads-per-layer", "heads-global")
HEAD_MODES = ("heads-per-layer", "heads-global")


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


def _split(chosen: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Global indices ``chosen`` into ``sum(sizes)`` items -> per block, sorted indices local to that block."""
    starts = torch.tensor([0, *sizes]).cumsum(0)
    return [(chosen[(chosen >= lo) & (chosen < hi)] - lo).sort().values for lo, hi in zip(starts[:-1], starts[1:])]


class NeuronSelection:
    """The random order of neurons (or of heads, in the head modes) for one seed; :meth:`at` gives the (nested)
    ablated set of neurons for a fraction.

    ``n_heads``: heads per layer (one int for all layers, or one per layer), needed by the head modes only; the
    neuron modes ignore it, so their orders depend on ``widths``, ``seed`` and ``mode`` alone.
    """

    def __init__(
        self, widths: Sequence[int], seed: int, mode: str = "per-layer", n_heads: int | Sequence[int] | None = None
    ):
        if mode not in MODES:
            raise KnockoutError(f"selection mode must be one of {MODES}, got {mode!r}")
        self.widths, self.seed, self.mode = list(widths), seed, mode
        self.n_heads: list[int] | None = None
        if n_heads is not None:
            heads = [n_heads] * len(self.widths) if isinstance(n_heads, int) else [int(h) for h in n_heads]
            if len(heads) != len(self.widths):
                raise KnockoutError(f"n_heads has {len(heads)} entries for {len(self.widths)} layers")
            for w, h in zip(self.widths, heads):
                if h <= 0 or w % h:
                    raise KnockoutError(f"a layer of {w} neurons cannot be split into {h} heads")
            self.n_heads = heads
        g = torch.Generator().manual_seed(seed)
        if mode == "per-layer":
            self.orders = [torch.randperm(w, generator=g) for w in self.widths]
        elif mode == "global":
            self.orders = [torch.randperm(sum(self.widths), generator=g)]
        else:
            if self.n_heads is None:
                raise KnockoutError(f"selection {mode!r} chooses whole heads and needs the number of heads per layer")
            if mode == "heads-per-layer":
                self.orders = [torch.randperm(h, generator=g) for h in self.n_heads]
            else:
                self.orders = [torch.randperm(sum(self.n_heads), generator=g)]

    @classmethod
    def for_sites(cls, sites: Sequence, seed: int, mode: str = "per-layer") -> NeuronSelection:
        """The selection for ``sites`` (:class:`knockout.sites.Site`), with their head structure. Head modes are
        refused on sites without heads (the MLP site)."""
        if mode in HEAD_MODES and any(getattr(s, "kind", "attention") != "attention" for s in sites):
            raise KnockoutError(
                f"selection {mode!r} chooses whole attention heads, but the {sites[0].kind} site has no heads; "
                "use --selection per-layer or global"
            )
        return cls([s.width for s in sites], seed, mode, n_heads=[s.n_heads for s in sites])

    @property
    def n_neurons(self) -> int:
        return sum(self.widths)

    @property
    def d_heads(self) -> list[int]:
        """Neurons per head in each layer (head modes)."""
        return [w // h for w, h in zip(self.widths, self.n_heads)]

    def n_ablated(self, fraction: float) -> int:
        if self.mode == "per-layer":
            return sum(count_for(fraction, w) for w in self.widths)
        if self.mode == "global":
            return count_for(fraction, self.n_neurons)
        return sum(len(h) * d for h, d in zip(self.heads_at(fraction), self.d_heads))

    def heads_at(self, fraction: float) -> list[torch.Tensor]:
        """Head modes: per layer, the sorted indices of the heads ablated at ``fraction``."""
        if self.mode == "heads-per-layer":
            return [o[: count_for(fraction, h)].sort().values for o, h in zip(self.orders, self.n_heads)]
        if self.mode == "heads-global":
            return _split(self.orders[0][: count_for(fraction, sum(self.n_heads))], self.n_heads)
        raise KnockoutError(f"selection {self.mode!r} chooses neurons, not heads")

    def at(self, fraction: float) -> list[torch.Tensor]:
        """Per layer, the sorted indices of the neurons ablated at ``fraction``."""
        if self.mode == "per-layer":
            return [o[: count_for(fraction, w)].sort().values for o, w in zip(self.orders, self.widths)]
        if self.mode == "global":
            return _split(self.orders[0][: count_for(fraction, self.n_neurons)], self.widths)
        # whole heads: neuron head * d_head + j for every j < d_head; sorted because the heads are
        return [
            (heads[:, None] * d + torch.arange(d)).flatten() for heads, d in zip(self.heads_at(fraction), self.d_heads)
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The random orders, enough to rebuild every fraction's set (saved beside the results). Head modes store
        orders of heads (``seed{s}.heads.layer{i}`` / ``seed{s}.heads.global``)."""
        if self.mode == "per-layer":
            return {f"seed{self.seed}.layer{i}": o for i, o in enumerate(self.orders)}
        if self.mode == "global":
            return {f"seed{self.seed}.global": self.orders[0]}
        if self.mode == "heads-per-layer":
            return {f"seed{self.seed}.heads.layer{i}": o for i, o in enumerate(self.orders)}
        return {f"seed{self.seed}.heads.global": self.orders[0]}
