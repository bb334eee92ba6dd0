"""The settings of a per-component scan (``knockout scan``): which units, the attribution estimate, the report's k.

None of them changes a stored row: a scan's rows are keyed by their unit's name (``L9.H6``, ``L9``, ``L9:0-63``),
so a scan with another unit adds rows of other names instead of mixing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from knockout.components import parse_unit
from knockout.options import OptionGroup, setting


@dataclass(frozen=True)
class ScanOptions(OptionGroup):
    """Settings of ``knockout scan`` (``SweepConfig.scan``); ``unit`` is ``None`` for every other run."""

    prefix: ClassVar[str] = "scan"
    title: ClassVar[str] = "scan"

    unit: str | None = setting(
        None,
        "what to ablate one at a time: head (every attention head), layer (every layer's whole site) or neurons:K "
        "(groups of K consecutive neurons of each layer, for models too wide for single neurons)",
        "scan",
        kind="str",
        flag="--unit",
        affects_results=False,
    )
    attribution: bool = setting(
        False,
        "also compute the attribution-patching estimate of every unit's effect (gradient x (constant - activation), "
        "one forward and backward pass per batch; an estimate, reported beside the exact effects with its "
        "correlation to them)",
        "scan",
        kind="bool",
        flag="--attribution",
        affects_results=False,
    )
    top_k: int = setting(
        10, "units compared between methods in the report (overlap of the top-k)", "scan", kind="int",
        flag="--top-k", affects_results=False,
    )  # fmt: skip

    def __post_init__(self):
        if self.unit is not None:
            self._str("unit")
            parse_unit(self.unit)
        self._bool("attribution")
        self._int("top_k", 1)
