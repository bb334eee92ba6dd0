"""Experiment configuration: one frozen dataclass, validated on creation, saved beside the results as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from knockout.ablation.selection import MODES, validate_fractions
from knockout.errors import KnockoutError
from knockout.stats.running import DEFAULT_EPS, DEFAULT_LIMIT, check_hist_params

DEFAULT_FRACTIONS = tuple(round(0.1 * i, 10) for i in range(11))


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep. Fields that change results are compared when a run is resumed."""

    model: str
    """Hub name (``facebook/opt-1.3b``), local folder, ``.gguf`` file, or a built-in name (``smollm2-135m``)."""
    out: str = "runs/sweep"
    """Output folder: config.json, results.jsonl/csv, stats.safetensors, selection.safetensors."""
    data: str = "wiki"
    """Text source: ``wiki`` (built-in), a local .txt/.jsonl/.json file, or a Hugging Face datasets name."""
    methods: tuple[str, ...] = ("zero", "mean", "peak")
    """Ablation methods, by registry name."""
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    """Fractions of neurons to ablate; nested per seed."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the neuron selection (and of masks and random inputs, where used)."""
    eval_tokens: int = 4096
    """Exact number of scored targets in the evaluation set."""
    stats_tokens: int = 16384
    """Number of (non-padding) tokens in the statistics collection set."""
    stats_skip_first: int = 0
    """Text models: leave the first this many positions of every collection sequence out of the statistics. The
    pre-out at position 0 of a causal LM is a function of the first token alone, so documents that start alike put
    point masses into the histogram that a fine eps can pick as the peak (see docs/design.md)."""
    max_length: int = 128
    """Longest sequence, in tokens; longer documents are cut."""
    batch_size: int = 8
    """Sequences per forward pass."""
    eps: float = DEFAULT_EPS
    """Histogram bin width for the peak."""
    hist_limit: float = DEFAULT_LIMIT
    """Histogram window is [-hist_limit, hist_limit); values outside are counted but left out of the peak."""
    selection: str = "per-layer"
    """``per-layer`` (same count in every layer, as the paper) or ``global``."""
    task: str = "auto"
    """``auto`` (from the model's config), ``causal``, ``masked`` or ``image``."""
    gguf_file: str | None = None
    """GGUF file name inside the model folder, if the weights are a GGUF file."""
    site_module: str | None = None
    """Explicit out-projection path with ``{i}`` for the layer, for architectures not in the site table."""
    n_heads: int | None = None
    """Override the number of attention heads read from the config."""
    stats_path: str | None = None
    """Reuse statistics from this file (must be of the same model) instead of collecting them."""
    device: str = "auto"
    dtype: str = "auto"
    options: dict = field(default_factory=dict)
    """Method- and task-specific options (e.g. resampling settings); saved with the config."""

    def __post_init__(self):
        object.__setattr__(self, "fractions", validate_fractions(tuple(self.fractions)))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.methods:
            raise KnockoutError("give at least one ablation method")
        if len(set(self.methods)) != len(self.methods):
            raise KnockoutError(f"methods are repeated: {self.methods}")
        if not self.seeds:
            raise KnockoutError("give at least one seed")
        for name in ("eval_tokens", "stats_tokens", "max_length", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise KnockoutError(f"{name} must be a positive integer, got {value!r}")
        check_hist_params(self.eps, self.hist_limit)
        if not isinstance(self.stats_skip_first, int) or not 0 <= self.stats_skip_first < self.max_length:
            raise KnockoutError(
                f"stats_skip_first must be an integer from 0 to max_length - 1, got {self.stats_skip_first!r}"
            )
        if self.selection not in MODES:
            raise KnockoutError(f"selection must be one of {MODES}, got {self.selection!r}")
        from knockout.ablation.methods import get_method

        for m in self.methods:
            get_method(m)

    # Fields a resumed run may change without invalidating stored rows: which rows exist, and where it runs.
    # batch_size is not among them: resampling draws one random input per evaluation batch.
    RESUMABLE_FIELDS = ("methods", "fractions", "seeds", "out", "device", "stats_path")
    # Options that change only speed, not results.
    SPEED_OPTIONS = ("resample_cache",)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        from knockout.experiments.store import write_atomic

        write_atomic(Path(path), json.dumps({**self.to_dict(), **(extra or {})}, indent=2) + "\n")

    def result_fields(self) -> dict:
        """The fields whose change makes stored results incomparable."""
        fields = {k: v for k, v in self.to_dict().items() if k not in self.RESUMABLE_FIELDS}
        fields["options"] = {k: v for k, v in self.options.items() if k not in self.SPEED_OPTIONS}
        return fields
