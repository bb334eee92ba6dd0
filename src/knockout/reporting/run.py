"""A run folder as the reports see it: its settings, record and rows, read from disk only (no model is loaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from knockout.config import Resolved, SweepConfig
from knockout.errors import KnockoutError
from knockout.inference.sequential import DecideOptions
from knockout.reporting.summary import summarize
from knockout.runfolder import RESULTS_FILE, RunFolder, row_key


def model_label(model: str) -> str:
    """A short name of a model for tables, legends and folders: the last part of its name or path, without
    ``.gguf`` (``facebook/opt-1.3b`` -> ``opt-1.3b``)."""
    return model.rstrip("/").replace("\\", "/").split("/")[-1].removesuffix(".gguf")


def run_fractions(run: RunData) -> tuple[float, ...]:
    """Where a run's answer is given by default: its decision fractions (``--decide-fractions``; 0.5 and 0.9)."""
    return tuple(run.config.decide.fractions) if run.config is not None else DecideOptions().fractions


@dataclass
class RunData:
    """The stored results of one run folder, read through :class:`~knockout.runfolder.RunFolder`: the recorded
    settings (``config``, a :class:`~knockout.config.SweepConfig`, ``None`` when the folder has no config.json), what
    the run resolved (``resolved``), results.jsonl's rows as dicts and their Table-2 summary."""

    folder: RunFolder
    rows: list[dict] = field(init=False)
    summary: list[dict] = field(init=False)

    def __post_init__(self):
        self.rows = self.folder.row_dicts()
        self.summary = summarize(self.table_rows) if self.rows else []

    @classmethod
    def load(cls, run_dir: str | Path | RunFolder) -> RunData:
        """The run in ``run_dir`` (a path, or a folder already open), which must hold a results.jsonl."""
        folder = RunFolder.open(run_dir)
        if not folder.has_results:
            raise KnockoutError(
                f"{str(folder.dir / RESULTS_FILE)!r} does not exist; is {str(run_dir)!r} a knockout run folder?"
            )
        return cls(folder)

    @property
    def dir(self) -> Path:
        return self.folder.dir

    @property
    def config(self) -> SweepConfig | None:
        return self.folder.config

    @property
    def resolved(self) -> Resolved:
        return self.folder.resolved

    @property
    def sequential(self) -> bool:
        return self.config is not None and self.config.sequential

    @property
    def table_rows(self) -> list[dict]:
        """The rows Table 2 and the curves summarise: with ``seeds: "auto"``, those of the first look's sets (every
        method has them at every fraction; the sets added at the decision fractions serve the answer)."""
        if not self.sequential:
            return self.rows
        fixed = set(self.fixed_seeds)
        return [r for r in self.rows if int(r["seed"]) in fixed]

    # -- identity ---------------------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        model = self.config.model if self.config is not None else None
        return str(model or self.resolved.identity.get("name") or self.dir.name)

    @property
    def label(self) -> str:
        """A short name for tables and legends: :func:`model_label` of the model (or the folder's name)."""
        return model_label(self.model) or self.dir.name

    # -- expected rows ----------------------------------------------------------------------------------------
    @property
    def methods(self) -> list[str]:
        """Methods in config order, then any others found in the rows (baseline excluded)."""
        found = [r["method"] for r in self.rows if r["method"] != "baseline"]
        return list(dict.fromkeys([*(self.config.methods if self.config else ()), *found]))

    @property
    def fixed_seeds(self) -> list[int]:
        """The seeds config.json asks every method and fraction to run (with ``seeds: "auto"``, the first look's)."""
        return list(self.config.fixed_seeds) if self.config is not None else []

    @property
    def seeds(self) -> list[int]:
        return list(dict.fromkeys([*self.fixed_seeds, *(int(r["seed"]) for r in self.rows)]))

    def expected_keys(self) -> set[tuple] | None:
        """Row keys config.json asks for: every (method, fraction, seed), a method at its ``method_fractions`` if it
        has them, and one baseline per seed (with ``seeds: "auto"``, the first look's seeds: the sets added after it
        depend on the data, and the answer accounts for them; a run of named targets: every method on every target
        of ``resolved.targets``); None without a config."""
        cfg = self.config
        if cfg is None:
            return None
        seeds = self.fixed_seeds
        keys = {row_key("baseline", 0.0, s) for s in seeds}
        targets = self.resolved.targets
        if targets:  # named sets (--ablate) or scan units: each method on each target
            return keys | {
                row_key(m, t["fraction"], s, name) for m in cfg.methods for name, t in targets.items() for s in seeds
            }
        return keys | {row_key(m, f, s) for m in cfg.methods for f in cfg.fractions_of(m) for s in seeds}

    def _have(self) -> set[tuple]:
        return {row_key(r["method"], r["fraction"], r["seed"], r["target"]) for r in self.rows}

    def missing(self) -> list[tuple]:
        """Expected rows not (yet) in results.jsonl, sorted."""
        expected = self.expected_keys()
        if expected is None:
            return []
        return sorted(expected - self._have())

    @property
    def n_present(self) -> int:
        """Expected rows that results.jsonl holds (rows it holds beyond those, e.g. of methods no longer asked for,
        are not counted)."""
        expected = self.expected_keys()
        return len(self.rows) if expected is None else len(expected & self._have())

    @property
    def n_expected(self) -> int | None:
        expected = self.expected_keys()
        return None if expected is None else len(expected)

    def partial_note(self) -> str | None:
        """A sentence for the report when the run is partial (or when its completeness cannot be checked)."""
        if self.n_expected is None:
            return "config.json is missing or incomplete, so whether this run is complete cannot be checked."
        missing = self.missing()
        if not missing:
            return None
        shown = ", ".join(f"{m} at {t or f'{f:g}'} (seed {s})" for m, f, s, t in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        return (
            f"PARTIAL RUN: {self.n_present} of {self.n_expected} expected rows are present "
            f"({len(missing)} missing: {shown}{more}). Means and stds below use only the seeds that finished; "
            "resume the sweep with the same command to complete it."
        )

    # -- files ------------------------------------------------------------------------------------------------
    @property
    def stats_path(self) -> Path | None:
        return self.folder.stats_path

    # -- timings ----------------------------------------------------------------------------------------------
    def timings(self) -> dict:
        """Total seconds over rows, and per method: rows, total and mean seconds per row."""
        per: dict[str, list[float]] = {}
        for r in self.rows:
            per.setdefault(r["method"], []).append(float(r.get("seconds", 0.0)))
        return {
            "total_seconds": sum(sum(v) for v in per.values()),
            "n_rows": len(self.rows),
            "methods": {
                m: {"rows": len(v), "seconds": sum(v), "mean_seconds": sum(v) / len(v)} for m, v in per.items()
            },
        }
