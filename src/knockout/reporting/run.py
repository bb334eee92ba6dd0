"""A run folder as the reports see it: config.json and results.jsonl, read from disk only (no model is loaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from knockout import runfolder
from knockout.errors import KnockoutError
from knockout.reporting.summary import summarize
from knockout.runfolder import read_rows, row_key


def model_label(model: str) -> str:
    """A short name of a model for tables, legends and folders: the last part of its name or path, without
    ``.gguf`` (``facebook/opt-1.3b`` -> ``opt-1.3b``)."""
    return model.rstrip("/").replace("\\", "/").split("/")[-1].removesuffix(".gguf")


@dataclass
class RunData:
    """The stored results of one run folder.

    ``config`` is config.json (SweepConfig fields plus ``resolved``), or ``{}`` when the folder has none; ``rows``
    are results.jsonl's rows.
    """

    dir: Path
    config: dict
    rows: list[dict]
    summary: list[dict] = field(init=False)

    def __post_init__(self):
        self.summary = summarize(self.table_rows) if self.rows else []

    @property
    def table_rows(self) -> list[dict]:
        """The rows Table 2 and the curves summarise: with ``seeds: "auto"``, those of the first look's sets (every
        method has them at every fraction; the sets added at the decision fractions serve the answer)."""
        if self.config.get("seeds") != "auto":
            return self.rows
        fixed = set(self.fixed_seeds)
        return [r for r in self.rows if int(r["seed"]) in fixed]

    @classmethod
    def load(cls, run_dir: str | Path) -> RunData:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise KnockoutError(f"{str(run_dir)!r} is not a folder; give a knockout run folder (with results.jsonl)")
        rows = read_rows(run_dir)
        return cls(run_dir, runfolder.read_config(run_dir) or {}, rows)

    # -- identity ---------------------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return str(self.config.get("model") or self.resolved.get("model_identity", {}).get("name") or self.dir.name)

    @property
    def label(self) -> str:
        """A short name for tables and legends: :func:`model_label` of the model (or the folder's name)."""
        return model_label(self.model) or self.dir.name

    @property
    def resolved(self) -> dict:
        return self.config.get("resolved") or {}

    # -- expected rows ----------------------------------------------------------------------------------------
    @property
    def methods(self) -> list[str]:
        """Methods in config order, then any others found in the rows (baseline excluded)."""
        found = [r["method"] for r in self.rows if r["method"] != "baseline"]
        return list(dict.fromkeys([*self.config.get("methods", []), *found]))

    @property
    def fixed_seeds(self) -> list[int]:
        """The seeds config.json asks every method and fraction to run (with ``seeds: "auto"``, the first look's)."""
        seeds = self.config.get("seeds", [])
        if seeds == "auto":
            return list(range(int((self.config.get("decide") or {}).get("first", 3))))
        return [int(s) for s in seeds]

    @property
    def seeds(self) -> list[int]:
        return list(dict.fromkeys([*self.fixed_seeds, *(int(r["seed"]) for r in self.rows)]))

    def expected_keys(self) -> set[tuple] | None:
        """Row keys config.json asks for: every (method, fraction, seed), a method at its ``method_fractions`` if it
        has them, and one baseline per seed (with ``seeds: "auto"``, the first look's seeds: the sets added after it
        depend on the data, and the answer accounts for them; a run of named targets: every method on every target
        of ``resolved.targets``); None without a config."""
        cfg = self.config
        if not all(k in cfg for k in ("methods", "fractions", "seeds")):
            return None
        seeds = self.fixed_seeds
        keys = {row_key("baseline", 0.0, s) for s in seeds}
        targets = self.resolved.get("targets")
        if targets:  # named sets (--ablate) or scan units: each method on each target
            return keys | {
                row_key(m, t["fraction"], s, name) for m in cfg["methods"] for name, t in targets.items()
                for s in seeds
            }  # fmt: skip
        per_method = cfg.get("method_fractions") or {}
        keys |= {row_key(m, f, s) for m in cfg["methods"] for f in per_method.get(m, cfg["fractions"]) for s in seeds}
        return keys

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
        path = self.dir / runfolder.STATS_FILE
        return path if path.is_file() else None

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
