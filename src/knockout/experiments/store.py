"""The results of a run folder: one row per (method, fraction, seed), written atomically as each completes.

Layout of a run folder::

    config.json             resolved SweepConfig + model identity + knockout version
    results.jsonl           one JSON object per row (the source of truth)
    results.csv             the same rows as CSV
    stats.safetensors       the statistics used by mean/peak (see knockout.stats)
    selection.safetensors   per seed, the random neuron orders the nested selections come from

Row fields: ``method``, ``fraction``, ``seed``, ``top1``, ``ce``, ``delta_top1``, ``delta_ce`` (change from the
unablated baseline of the same seed), ``n_ablated``, ``n_neurons``, ``n_eval`` (scored targets), ``seconds``.
Each seed also has a ``method="baseline"`` row at fraction 0.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from knockout.errors import KnockoutError

ROW_FIELDS = (
    "method",
    "fraction",
    "seed",
    "top1",
    "ce",
    "delta_top1",
    "delta_ce",
    "n_ablated",
    "n_neurons",
    "n_eval",
    "seconds",
)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def row_key(method: str, fraction: float, seed: int) -> tuple[str, float, int]:
    return (method, round(float(fraction), 10), int(seed))


def read_rows(run_dir: str | Path) -> list[dict]:
    """The rows of a run folder's ``results.jsonl``."""
    path = Path(run_dir) / "results.jsonl"
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
        missing = [f for f in ROW_FIELDS if f not in row] if isinstance(row, dict) else list(ROW_FIELDS)
        if missing:
            raise KnockoutError(f"{path}:{n} lacks {', '.join(missing)}; fix or delete that line")
        rows.append(row)
    return rows


class ResultStore:
    """Rows of one run folder, kept in memory and rewritten atomically after every addition."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.rows: dict[tuple, dict] = {}
        if (self.dir / "results.jsonl").is_file():
            for row in read_rows(self.dir):
                self.rows[row_key(row["method"], row["fraction"], row["seed"])] = row

    def __contains__(self, key: tuple) -> bool:
        return row_key(*key) in self.rows

    def get(self, method: str, fraction: float, seed: int) -> dict | None:
        return self.rows.get(row_key(method, fraction, seed))

    def add(self, row: dict) -> None:
        missing = set(ROW_FIELDS) - set(row)
        if missing:
            raise ValueError(f"row lacks {sorted(missing)}")
        self.rows[row_key(row["method"], row["fraction"], row["seed"])] = row
        self._write()

    def _write(self) -> None:
        rows = list(self.rows.values())
        write_atomic(self.dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.dir / "results.csv", buf.getvalue())
