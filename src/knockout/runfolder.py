"""The run folder: its file names, atomic writes, the stored config and the resume check, the neuron orders, and the
result rows. The sweep writes a run folder through this module and the reports read it through it.

Layout::

    config.json             the resolved SweepConfig + model identity + versions ("resolved")
    results.jsonl           one JSON object per row (the source of truth), see :class:`ResultRow`
    results.csv             the same rows as CSV
    stats.safetensors       the statistics used by mean/peak (see knockout.stats)
    selection.safetensors   per seed, the random neuron orders the nested selections come from
    artifacts/              what methods learned (e.g. learned constants), reused on resume
    paired/seed{s}.safetensors  per row of seed s, per-document sums for paired comparisons ("{method}@{fraction}.n",
                            ".ce_sum", ".correct"; see knockout.reporting.paired)
    report/                 the report (knockout.reporting)

Every file is written through :func:`write_atomic` (a temporary file renamed into place), so a crash never leaves
half a file: a reader sees the old version or the new one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from knockout.errors import KnockoutError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
RESULTS_CSV = "results.csv"
STATS_FILE = "stats.safetensors"
SELECTION_FILE = "selection.safetensors"
ARTIFACTS_DIR = "artifacts"
PAIRED_DIR = "paired"
DOC_FIELDS = ("n", "ce_sum", "correct")
REPORT_DIR = "report"


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file and a rename, so readers never see half a
    file. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- config -------------------------------------------------------------------------------------------------------
def read_config(run_dir: str | os.PathLike) -> dict | None:
    """``config.json`` of a run folder as a dict, ``None`` if there is none; a damaged file is an error."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KnockoutError(f"{str(path)!r} is damaged ({e}); use another --out folder or delete it") from e
    if not isinstance(config, dict):
        raise KnockoutError(f"{str(path)!r} is damaged (not a JSON object); use another --out folder or delete it")
    return config


def write_config(run_dir: str | os.PathLike, config: dict) -> None:
    write_atomic(Path(run_dir) / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def check_resumable(run_dir: str | os.PathLike, fields: dict, ignored_options: Iterable[str] = ()) -> None:
    """Raise if ``run_dir`` holds a run whose results-defining settings differ from ``fields`` (a config's
    :meth:`~knockout.experiments.config.SweepConfig.result_fields`); options in ``ignored_options`` change only
    speed and are not compared."""
    old = read_config(run_dir)
    if old is None:
        return
    ignored = set(ignored_options)
    old["options"] = {k: v for k, v in (old.get("options") or {}).items() if k not in ignored}
    new = json.loads(json.dumps(fields))
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise KnockoutError(
            f"{str(run_dir)!r} holds a run with different settings ({detail}). Use another --out folder, or the "
            "same settings to resume it."
        )


# -- neuron orders ------------------------------------------------------------------------------------------------
def save_selection(run_dir: str | os.PathLike, orders: dict[str, torch.Tensor], mode: str) -> None:
    """Add ``orders`` (:meth:`knockout.ablation.NeuronSelection.state_dict`) to the run's ``selection.safetensors``
    (the record of the chosen neurons)."""
    from safetensors.torch import load_file, save

    path = Path(run_dir) / SELECTION_FILE
    tensors = load_file(str(path)) if path.is_file() else {}
    tensors.update(orders)
    note = "random neuron order per seed; fraction f ablates the first round(f * n) of each order"
    write_atomic(path, save(tensors, metadata={"mode": mode, "note": note}))


# -- per-document sums (paired comparisons) -------------------------------------------------------------------------
def _paired_path(run_dir: str | os.PathLike, seed: int) -> Path:
    return Path(run_dir) / PAIRED_DIR / f"seed{int(seed)}.safetensors"


def save_doc_sums(run_dir: str | os.PathLike, method: str, fraction: float, seed: int, sums: dict) -> None:
    """Add one row's per-document sums (``{"n", "ce_sum", "correct"}``: ``[n_docs]`` arrays, as
    :meth:`knockout.evaluation.Metrics.doc_sums` gives them) to ``paired/seed{seed}.safetensors``."""
    from safetensors.torch import load_file, save

    path = _paired_path(run_dir, seed)
    tensors = load_file(str(path)) if path.is_file() else {}
    key = f"{method}@{round(float(fraction), 10)!r}"
    for name in DOC_FIELDS:
        tensors[f"{key}.{name}"] = torch.as_tensor(sums[name]).contiguous()
    note = "per-document sums of each (method, fraction) row of this seed, for paired comparisons"
    write_atomic(path, save(tensors, metadata={"seed": str(int(seed)), "note": note}))


def read_doc_sums(run_dir: str | os.PathLike) -> dict[tuple[str, float, int], dict]:
    """Every stored row's per-document sums: ``row_key -> {"n", "ce_sum", "correct"}`` (numpy arrays). Rows
    evaluated before these were stored (or by an older knockout) are absent."""
    from safetensors.torch import load_file

    out: dict[tuple[str, float, int], dict] = {}
    folder = Path(run_dir) / PAIRED_DIR
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("seed*.safetensors")):
        try:
            seed = int(path.stem.removeprefix("seed"))
            tensors = load_file(str(path))
        except Exception as e:  # a damaged file loses the paired comparisons only
            raise KnockoutError(f"{str(path)!r} is damaged ({e}); delete it to rebuild the report without it") from e
        for name, t in tensors.items():
            key, field = name.rsplit(".", 1)
            method, fraction = key.rsplit("@", 1)
            out.setdefault(row_key(method, float(fraction), seed), {})[field] = t.numpy()
    return {k: v for k, v in out.items() if all(f in v for f in DOC_FIELDS)}


# -- result rows --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResultRow:
    """One evaluation of a run: a method at a fraction for a seed (``method="baseline"`` at 0: unablated)."""

    method: str
    fraction: float
    seed: int
    top1: float
    """Top-1 accuracy, a fraction in [0, 1]."""
    ce: float
    """Mean cross-entropy in nats."""
    delta_top1: float
    """Change from the unablated baseline of the same seed."""
    delta_ce: float
    n_ablated: int
    n_neurons: int
    n_eval: int
    """Scored targets."""
    seconds: float

    @classmethod
    def measured(
        cls,
        method: str,
        fraction: float,
        seed: int,
        top1: float,
        ce: float,
        n_eval: int,
        n_ablated: int,
        n_neurons: int,
        seconds: float,
        baseline: ResultRow | None = None,
    ) -> ResultRow:
        """A row with its changes from ``baseline`` (``None``: this row is the baseline, changes 0)."""
        return cls(
            method=method,
            fraction=fraction,
            seed=seed,
            top1=top1,
            ce=ce,
            delta_top1=0.0 if baseline is None else top1 - baseline.top1,
            delta_ce=0.0 if baseline is None else ce - baseline.ce,
            n_ablated=n_ablated,
            n_neurons=n_neurons,
            n_eval=n_eval,
            seconds=round(seconds, 4),
        )

    @property
    def key(self) -> tuple[str, float, int]:
        return row_key(self.method, self.fraction, self.seed)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict, where: str = "row") -> ResultRow:
        missing = [f for f in ROW_FIELDS if f not in row] if isinstance(row, dict) else list(ROW_FIELDS)
        if missing:
            raise KnockoutError(f"{where} lacks {', '.join(missing)}; fix or delete that line")
        return cls(**{f: row[f] for f in ROW_FIELDS})


ROW_FIELDS = tuple(f.name for f in dataclasses.fields(ResultRow))


def row_key(method: str, fraction: float, seed: int) -> tuple[str, float, int]:
    return (method, round(float(fraction), 10), int(seed))


def read_rows(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run folder's ``results.jsonl``, as dicts (checked to have every :class:`ResultRow` field)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise KnockoutError(f"{str(path)!r} does not exist; is {str(run_dir)!r} a knockout run folder?")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise KnockoutError(f"{path}:{n} is not valid JSON ({e}); fix or delete that line") from e
        rows.append(ResultRow.from_dict(row, where=f"{path}:{n}").as_dict())
    return rows


def write_rows(run_dir: str | os.PathLike, rows: Iterable[ResultRow]) -> None:
    """Write ``results.jsonl`` and ``results.csv`` (each atomically)."""
    run_dir, rows = Path(run_dir), [r.as_dict() for r in rows]
    write_atomic(run_dir / RESULTS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(run_dir / RESULTS_CSV, buf.getvalue())


class ResultStore:
    """The rows of one run folder, kept in memory and rewritten atomically after every addition."""

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self.rows: dict[tuple, ResultRow] = {}
        if (self.dir / RESULTS_FILE).is_file():
            for row in read_rows(self.dir):
                self.rows[row_key(row["method"], row["fraction"], row["seed"])] = ResultRow.from_dict(row)

    def __contains__(self, key: tuple) -> bool:
        return row_key(*key) in self.rows

    def get(self, method: str, fraction: float, seed: int) -> ResultRow | None:
        return self.rows.get(row_key(method, fraction, seed))

    def add(self, row: ResultRow) -> None:
        self.rows[row.key] = row
        write_rows(self.dir, self.rows.values())
