"""The run folder: its file names, atomic writes, the stored config and the resume check, the neuron orders, and the
result rows. The sweep writes a run folder through this module and the reports read it through it.

Layout::

    config.json             the resolved SweepConfig + model identity + versions ("resolved")
    results.jsonl           one JSON object per row (the source of truth), see :class:`ResultRow`
    results.csv             the same rows as CSV
    stats.safetensors       the statistics used by mean/peak (see knockout.stats)
    selection.safetensors   per seed, the random neuron orders the nested selections come from
    artifacts/              what methods learned (e.g. learned constants), reused on resume
    attribution.json        a scan's attribution-patching estimates (``knockout scan --attribution``)
    paired/seed{s}.safetensors  per row of seed s, per-document sums for paired comparisons ("{method}@{fraction}.n",
                            ".ce_sum", ".correct", and ".ld_sum" for task prompts with a correct and an
                            incorrect answer; "{method}@{fraction}#{target}..." for a row of a named target;
                            see knockout.reporting.paired)
    report/                 the report (knockout.reporting)

Every file is written through :func:`write_atomic` (a temporary file renamed into place), so a crash never leaves
half a file: a reader sees the old version or the new one.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from knockout.errors import KnockoutError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
RESULTS_CSV = "results.csv"
STATS_FILE = "stats.safetensors"
SELECTION_FILE = "selection.safetensors"
ARTIFACTS_DIR = "artifacts"
PAIRED_DIR = "paired"
DOC_FIELDS = ("n", "ce_sum", "correct")
EXTRA_DOC_FIELDS = ("ld_sum",)  # stored when a row has it (task prompts with a correct and an incorrect answer)
ALL_DOC_FIELDS = DOC_FIELDS + EXTRA_DOC_FIELDS
TARGET_SEP = "#"
REPORT_DIR = "report"
ATTRIBUTION_FILE = "attribution.json"


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


def check_out(run_dir: str | os.PathLike) -> None:
    """Raise unless ``run_dir`` is an existing folder or can be created, and can be written (checked before a
    model is loaded, so a bad ``--out`` costs nothing). Creates nothing."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise KnockoutError(f"--out {str(path)!r} is a file, not a folder; give a folder name")
    parent = path
    while not parent.exists():  # the nearest existing ancestor is where the folder would be created
        parent = parent.parent
    if not parent.is_dir():
        raise KnockoutError(f"--out {str(path)!r} cannot be created: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KnockoutError(f"--out {str(path)!r} is not writable ({str(parent)!r} denies writing); use another folder")


def move_aside(run_dir: str | os.PathLike) -> Path | None:
    """Rename an existing ``run_dir`` to ``<run_dir>.old-<UTC timestamp>`` (``--restart``); returns the new name,
    or ``None`` if there was nothing to move."""
    path = Path(run_dir)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
    os.replace(path, target)
    return target


def check_data(run_dir: str | os.PathLike, identity: dict) -> None:
    """Raise if ``run_dir``'s config records data other than ``identity`` (:func:`knockout.data.text.data_identity`
    or its image counterpart)."""
    old = read_config(run_dir)
    if old is None:
        return
    recorded = (old.get("resolved") or {}).get("data_identity")
    if recorded != identity:
        recorded = recorded if isinstance(recorded, dict) else {}
        keys = [k for k in identity if recorded.get(k) != identity.get(k)]
        detail = "; ".join(f"{k}: {recorded.get(k)!r} -> {identity.get(k)!r}" for k in keys)
        raise KnockoutError(
            f"the data differs from the data of the run in {str(run_dir)!r} ({detail}): its rows would mix two data "
            "sets. Restore the data, use another --out folder, or --restart to start over."
        )


def check_integrity(run_dir: str | os.PathLike) -> None:
    """Read an existing run folder's results and neuron orders, so that a damaged file is named (with what to do)
    before anything runs. The statistics file is checked when it is loaded."""
    path = Path(run_dir)
    if (path / RESULTS_FILE).is_file():
        read_rows(path)
    if (path / SELECTION_FILE).is_file():
        load_selection(path)


# -- checksums ----------------------------------------------------------------------------------------------------
CHECKSUM_KEY = "sha256"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over ``tensors`` in name order: each name, dtype, shape and raw bytes (stored in a safetensors file's
    metadata and checked on load, so damaged tensor data is found)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def verify_checksum(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, remedy: str) -> None:
    """Raise if ``meta``'s checksum is missing or does not match ``tensors`` (read from ``path``)."""
    expected = meta.get(CHECKSUM_KEY)
    if expected is None or tensors_sha256(tensors) != expected:
        raise KnockoutError(f"{str(path)!r} is damaged (its checksum does not match its data); {remedy}")


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


def check_same_settings(run_dir: str | os.PathLike, stored: dict, fields: dict) -> None:
    """Raise if the results-defining settings ``stored`` in ``run_dir``'s config.json differ from ``fields`` (both
    from :func:`knockout.experiments.config.result_settings`), naming each difference."""
    old = json.loads(json.dumps(stored))
    new = json.loads(json.dumps(fields))
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise KnockoutError(
            f"{str(run_dir)!r} holds a run with different settings ({detail}). Use another --out folder, the "
            "same settings to resume it, or --restart to move it aside and start over."
        )


# -- neuron orders ------------------------------------------------------------------------------------------------
def save_selection(run_dir: str | os.PathLike, orders: dict[str, torch.Tensor], mode: str) -> None:
    """Add ``orders`` (:meth:`knockout.ablation.NeuronSelection.state_dict`) to the run's ``selection.safetensors``
    (the record of the chosen neurons)."""
    from safetensors.torch import save

    path = Path(run_dir) / SELECTION_FILE
    tensors = load_selection(run_dir) if path.is_file() else {}
    tensors.update(orders)
    note = "random neuron order per seed; fraction f ablates the first round(f * n) of each order"
    meta = {"mode": mode, "note": note, CHECKSUM_KEY: tensors_sha256(tensors)}
    write_atomic(path, save(tensors, metadata=meta))


def load_selection(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The neuron orders stored in a run folder's ``selection.safetensors``, checked against their checksum."""
    from safetensors import safe_open

    path = Path(run_dir) / SELECTION_FILE
    remedy = f"delete {str(path)!r} (the orders are recomputed from the seeds) and re-run"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise KnockoutError(f"{str(path)!r} is damaged ({type(e).__name__}: {e}); {remedy}") from e
    verify_checksum(path, tensors, meta, remedy)
    return tensors


# -- per-document sums (paired comparisons) -------------------------------------------------------------------------
def _paired_path(run_dir: str | os.PathLike, seed: int) -> Path:
    return Path(run_dir) / PAIRED_DIR / f"seed{int(seed)}.safetensors"


def save_doc_sums(
    run_dir: str | os.PathLike, method: str, fraction: float, seed: int, sums: dict, target: str = ""
) -> None:
    """Add one row's per-document sums (``{"n", "ce_sum", "correct"}``: ``[n_docs]`` arrays, as
    :meth:`knockout.evaluation.Metrics.doc_sums` gives them) to ``paired/seed{seed}.safetensors``."""
    from safetensors.torch import load_file, save

    path = _paired_path(run_dir, seed)
    tensors = load_file(str(path)) if path.is_file() else {}
    key = f"{method}@{fraction_key(fraction)!r}" + (f"{TARGET_SEP}{target}" if target else "")
    for name in (*DOC_FIELDS, *(f for f in EXTRA_DOC_FIELDS if f in sums)):
        tensors[f"{key}.{name}"] = torch.as_tensor(sums[name]).contiguous()
    note = "per-document sums of each (method, fraction) row of this seed, for paired comparisons"
    write_atomic(path, save(tensors, metadata={"seed": str(int(seed)), "note": note}))


def read_doc_sums(
    run_dir: str | os.PathLike, fields: tuple[str, ...] = DOC_FIELDS
) -> dict[tuple[str, float, int, str], dict]:
    """Every stored row's per-document sums: ``row_key -> {"n", "ce_sum", "correct"}`` (numpy arrays). ``fields``
    may add ``"ld_sum"`` (the summed logit differences of task prompts), present only in rows that have it."""
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
            key, _, target = key.partition(TARGET_SEP)
            method, fraction = key.rsplit("@", 1)
            out.setdefault(row_key(method, float(fraction), seed, target), {})[field] = t.numpy()
    return {k: {f: v[f] for f in fields if f in v} for k, v in out.items() if all(f in v for f in DOC_FIELDS)}


# -- a scan's attribution estimates ------------------------------------------------------------------------------------
def write_attribution(run_dir: str | os.PathLike, record: dict) -> None:
    """Write a scan's attribution estimates (``{"metric", "seed", "seconds", "estimates": {method: {unit: value}}}``,
    see :func:`knockout.experiments.scan.write_attribution`)."""
    write_atomic(Path(run_dir) / ATTRIBUTION_FILE, json.dumps(record, indent=1) + "\n")


def read_attribution(run_dir: str | os.PathLike) -> dict | None:
    """A scan's attribution estimates, or ``None`` when it has none; a damaged file is an error."""
    path = Path(run_dir) / ATTRIBUTION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KnockoutError(f"{str(path)!r} is damaged ({e}); delete it (the scan recomputes it)") from e
    if not isinstance(data, dict) or not isinstance(data.get("estimates"), dict):
        raise KnockoutError(f"{str(path)!r} is damaged; delete it (the scan recomputes it)")
    return data


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
    target: str = ""
    """What was ablated when it is not a random fraction of the neurons: the name of a component set (``--ablate``)
    or of one unit of a scan (``L9.H6``); empty for the random nested sets of a sweep."""
    logit_diff: float | None = None
    """Task prompts with a correct and an incorrect answer: mean ``logit[correct] - logit[incorrect]`` (then
    ``top1`` is the share of prompts where the correct logit is the larger, and ``ce`` the correct token's
    cross-entropy). ``None`` (and absent from results.jsonl) for every other evaluation."""
    delta_logit_diff: float | None = None
    """Change of ``logit_diff`` from the baseline of the same seed."""

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
        target: str = "",
        logit_diff: float | None = None,
    ) -> ResultRow:
        """A row with its changes from ``baseline`` (``None``: this row is the baseline, changes 0)."""
        delta_ld = None
        if logit_diff is not None:
            delta_ld = 0.0 if baseline is None or baseline.logit_diff is None else logit_diff - baseline.logit_diff
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
            target=target,
            logit_diff=logit_diff,
            delta_logit_diff=delta_ld,
        )

    @property
    def key(self) -> tuple[str, float, int, str]:
        return row_key(self.method, self.fraction, self.seed, self.target)

    def as_dict(self) -> dict[str, Any]:
        """The row's fields; an optional metric that was not measured (``None``) is left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k in OPTIONAL_FIELDS and v is None)}

    @classmethod
    def from_dict(cls, row: dict, where: str = "row") -> ResultRow:
        required = [f for f in ROW_FIELDS if f not in OPTIONAL_FIELDS]
        missing = [f for f in required if f not in row] if isinstance(row, dict) else required
        if missing:
            raise KnockoutError(f"{where} lacks {', '.join(missing)}; fix or delete that line")
        return cls(**{f: row[f] for f in ROW_FIELDS if f in row})


ROW_FIELDS = tuple(f.name for f in dataclasses.fields(ResultRow))
#: Metrics only some evaluations have (task prompts with a correct and an incorrect answer); rows without them, and
#: results files written before they existed, read as ``None``.
OPTIONAL_FIELDS = ("logit_diff", "delta_logit_diff")


def fraction_key(fraction: float) -> float:
    """A fraction as rows are keyed by it: rounded to 10 decimals, so 0.1 * 3 and 0.3 are the same row."""
    return round(float(fraction), 10)


def row_key(method: str, fraction: float, seed: int, target: str = "") -> tuple[str, float, int, str]:
    """The key of a row: ``(method, fraction_key(fraction), seed, target)``."""
    return (method, fraction_key(fraction), int(seed), target)


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
    run_dir, rows = Path(run_dir), list(rows)
    write_atomic(run_dir / RESULTS_FILE, "".join(json.dumps(r.as_dict()) + "\n" for r in rows))
    write_atomic(run_dir / RESULTS_CSV, _csv_text(rows))


def _csv_text(rows: Iterable[ResultRow]) -> str:
    """The rows as CSV; the optional metrics' columns only when some row has them."""
    rows = list(rows)
    fields = [f for f in ROW_FIELDS if f not in OPTIONAL_FIELDS or any(getattr(r, f) is not None for r in rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.as_dict() for r in rows)
    return buf.getvalue()


class ResultStore:
    """The rows of one run folder, kept in memory and rewritten atomically after every addition.

    ``read_only``: keep rows in memory and write nothing (distributed ranks other than 0). A writable store repairs
    results.csv when a crash between the two files left it behind results.jsonl."""

    def __init__(self, run_dir: str | os.PathLike, read_only: bool = False):
        self.dir = Path(run_dir)
        self.read_only = read_only
        self.rows: dict[tuple, ResultRow] = {}
        if (self.dir / RESULTS_FILE).is_file():
            for row in read_rows(self.dir):
                parsed = ResultRow.from_dict(row)
                self.rows[parsed.key] = parsed
            csv_path = self.dir / RESULTS_CSV
            stale = not csv_path.is_file() or csv_path.read_text(encoding="utf-8") != _csv_text(self.rows.values())
            if stale and not read_only:
                write_rows(self.dir, self.rows.values())

    def __contains__(self, key: tuple) -> bool:
        return row_key(*key) in self.rows

    def get(self, method: str, fraction: float, seed: int, target: str = "") -> ResultRow | None:
        return self.rows.get(row_key(method, fraction, seed, target))

    def add(self, row: ResultRow) -> None:
        """Store ``row``; a NaN or infinite metric is an error, never a stored row (it is not valid JSON either)."""
        metrics = ("top1", "ce", "delta_top1", "delta_ce", *OPTIONAL_FIELDS)
        bad = [f for f in metrics if getattr(row, f) is not None and not math.isfinite(getattr(row, f))]
        if bad:
            raise KnockoutError(
                f"{row.method} at fraction {row.fraction} (seed {row.seed}) gave {bad[0]} = {getattr(row, bad[0])}: "
                "the model produced NaN or infinite logits (try --dtype float32, or check the statistics and "
                "model weights); the row was not stored"
            )
        self.rows[row.key] = row
        if not self.read_only:
            write_rows(self.dir, self.rows.values())
