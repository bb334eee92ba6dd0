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
                            see knockout.inference.paired)
    report/                 the report (knockout.reporting)

Every file is written through :func:`write_atomic` (a temporary file with a unique name, renamed into place), so a
crash never leaves half a file: a reader sees the old version or the new one. A full disk ends the write with a
:class:`KnockoutError` and leaves no temporary file.

One writer at a time: a sweep holds :class:`RunLock` (an OS file lock on ``.knockout.lock`` inside the folder, which
records the holder's PID) from its first check of the folder to its end; a second writer is refused, naming that PID.
The OS releases the lock when the holder dies. Readers (reports, comparisons) never take it.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import functools
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

from knockout.config import Resolved, SweepConfig, result_settings
from knockout.errors import KnockoutError
from knockout.files import (  # noqa: F401 - the run folder's writers use them through this module too
    CHECKSUM_KEY,
    HELD,
    load_artifact,
    load_checked,
    save_checked,
    write_atomic,
    write_error,
)
from knockout.inference.sequential import DecideOptions

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
LOCK_FILE = ".knockout.lock"
ATTRIBUTION_FILE = "attribution.json"


# -- one writer per run folder ------------------------------------------------------------------------------------
_HELD = HELD  # run folder -> this process's RunLock of it (files.write_atomic checks them)


class RunLock:
    """The writer's lock of a run folder: ``fcntl.flock`` on ``dir/.knockout.lock``, which holds the writer's PID.

    Held from :meth:`acquire` to :meth:`release` (or the process's end: the OS drops it). The holder removes the file
    when it releases it, so a finished run leaves none; an acquirer checks that the file it locked is still the one at
    the path (it retries otherwise), which keeps that removal safe. A folder created only to hold the lock is removed
    again when nothing else was written into it (a run refused after the lock leaves no empty folder).
    """

    def __init__(self, run_dir: Path, fd: int, created: bool):
        self.dir, self.fd, self.created = run_dir, fd, created
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> RunLock:
        """Lock ``run_dir`` (created if missing) for this process; re-entrant within one process. Raises
        :class:`KnockoutError` naming the holder's PID when another process holds it. Where the OS has no
        ``flock`` (Windows), the lock file is written but not locked, with a warning."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            fcntl = None
            log.warning("this platform has no file locks: knockout cannot keep a second process out of a run folder")

        run_dir = Path(run_dir).absolute()
        held = _HELD.get(run_dir)
        if held is not None:
            return held
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(run_dir / LOCK_FILE, e) from e
        path = run_dir / LOCK_FILE
        for _ in range(100):  # retried only when the holder removed the file between our open and our lock
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:  # a link: knockout's own lock file never is one
                    raise KnockoutError(
                        f"{str(path)!r} is a link, not knockout's lock file: knockout never writes through a link "
                        "in a run folder. Remove it, or use another --out folder"
                    ) from None
                raise write_error(path, e) from e
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise write_error(path, e) from e
                raise KnockoutError(
                    f"{str(run_dir)!r} is being written by another knockout process (PID {_holder(path)}): one "
                    "writer at a time. Wait for it to finish (or stop it), or use another --out folder"
                ) from None
            st = os.fstat(fd)
            try:
                same = os.stat(path)
                same = (same.st_dev, same.st_ino) == (st.st_dev, st.st_ino)
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed it after we opened it: lock the new one
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as e:
                os.close(fd)
                raise write_error(path, e) from e
            lock = _HELD[run_dir] = cls(run_dir, fd, created)
            try:
                check_closed(run_dir)
            except KnockoutError:
                lock.release()
                raise
            _remove_stale_temporaries(run_dir)
            return lock
        raise KnockoutError(f"could not lock {str(run_dir)!r}: its lock file keeps changing")

    @property
    def path(self) -> Path:
        return self.dir / LOCK_FILE

    def still_held(self) -> bool:
        """Whether the lock file at the folder's path is still the one this lock holds (the folder was not moved
        away or replaced)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident

    def moved_to(self, new_dir: Path) -> None:
        """The folder (and its lock file) was renamed to ``new_dir`` by this process."""
        _HELD.pop(self.dir, None)
        self.dir = Path(new_dir).absolute()
        _HELD[self.dir] = self

    def release(self) -> None:
        """Remove the lock file (if it is still ours), unlock, and remove the folder if this lock created it and it
        is empty."""
        if _HELD.get(self.dir) is self:
            del _HELD[self.dir]
        if self.fd < 0:
            return
        try:
            if self.still_held():
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)  # unlocks
        self.fd = -1
        if self.created:
            try:
                self.dir.rmdir()  # only if empty
            except OSError:
                pass


def lock_run(run_dir: str | os.PathLike) -> RunLock:
    """:meth:`RunLock.acquire`: make this process the one writer of ``run_dir``."""
    return RunLock.acquire(run_dir)


def unlock_run(run_dir: str | os.PathLike) -> None:
    """Release this process's lock of ``run_dir`` if it holds one."""
    lock = _HELD.get(Path(run_dir).absolute())
    if lock is not None:
        lock.release()


def _holder(path: Path) -> str:
    """The PID recorded in a lock file (read a few times: the holder writes it just after locking)."""
    for _ in range(20):
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.05)
    return "unknown"


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Remove temporary files a killed writer left (``.NAME....tmp``): with the lock held, no one else writes them.
    The report folder is left alone (a report may be being written without the lock)."""
    for sub in (run_dir, run_dir / PAIRED_DIR, run_dir / ARTIFACTS_DIR):
        if not sub.is_dir() or sub.is_symlink():
            continue
        found = sub.rglob(".*.tmp") if sub.name == ARTIFACTS_DIR else sub.glob(".*.tmp")
        for tmp in found:
            try:
                if not tmp.is_symlink() and tmp.resolve().is_relative_to(run_dir.resolve()):
                    tmp.unlink()
            except OSError:
                pass


def outside_links(run_dir: str | os.PathLike) -> list[str]:
    """The entries of ``run_dir`` (at any depth; links are not followed) that are symbolic links to something
    outside it, relative to it, sorted."""
    root, found = Path(run_dir).resolve(), []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                found.append(str(entry.relative_to(run_dir)))
    return sorted(found)


def check_closed(run_dir: str | os.PathLike, what: str = "writes") -> None:
    """Raise unless ``run_dir`` is a closed world: no link in it points outside it (a shared folder could otherwise
    make a run write, delete or lock files elsewhere)."""
    links = outside_links(run_dir) if Path(run_dir).is_dir() else []
    if links:
        shown = ", ".join(links[:5]) + (f" and {len(links) - 5} more" if len(links) > 5 else "")
        raise KnockoutError(
            f"{str(run_dir)!r} holds links that point outside it ({shown}): knockout never {what} through them. "
            "Remove the links (or copy what they point to into the folder), or use another folder"
        )


def inside(run_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path``, checked to lie in ``run_dir`` once links are resolved (a folder of the run that is a link to
    elsewhere is refused): where knockout writes a run's report or export."""
    path = Path(path)
    if path.is_symlink() or not path.resolve().is_relative_to(Path(run_dir).resolve()):
        raise KnockoutError(
            f"{str(path)!r} is a link to {str(path.resolve())!r}, outside the run folder: knockout never writes "
            "through a link in a run folder. Remove the link, or give --out a folder of your own"
        )
    return path


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
    or ``None`` if there was nothing to move (no folder, or one holding only this process's lock file).

    When this process holds the folder's lock, the lock moves with the folder, a fresh lock is taken on a new, empty
    ``run_dir``, and then the moved one is released: no other writer can slip in between."""
    path = Path(run_dir)
    if not path.exists() or all(p.name == LOCK_FILE for p in path.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
    held = _HELD.get(path.absolute())
    os.replace(path, target)
    if held is not None:
        held.moved_to(target)
        held.created = False
        try:
            RunLock.acquire(path)
        finally:
            held.release()
    return target


def check_data(folder: RunFolder, identity: dict) -> None:
    """Raise if ``folder``'s config records data other than ``identity`` (:func:`knockout.data.text.data_identity`
    or its image counterpart)."""
    if not folder.has_config:
        return
    recorded = folder.resolved.data_identity
    if recorded is not None and ("counterfactuals" not in recorded or "counterfactuals" not in identity):
        # the counterfactuals' generator matters to patch's rows only: a run may add patch, or resume without it
        recorded = {k: v for k, v in recorded.items() if k != "counterfactuals"}
        identity = {k: v for k, v in identity.items() if k != "counterfactuals"}
    if recorded != identity:
        recorded = recorded or {}
        keys = [k for k in identity if recorded.get(k) != identity.get(k)]
        detail = "; ".join(f"{k}: {recorded.get(k)!r} -> {identity.get(k)!r}" for k in keys)
        raise KnockoutError(
            f"the data differs from the data of the run in {str(folder.dir)!r} ({detail}): its rows would mix two "
            "data sets. Restore the data, use another --out folder, or --restart to start over."
        )


def check_model(folder: RunFolder, fingerprint: dict) -> None:
    """Raise if ``folder``'s config records a model whose weights differ from ``fingerprint``
    (:mod:`knockout.fingerprint`). A fingerprint made differently (the files of a folder against the tensors of a
    model passed from Python) cannot be compared: accepted with a warning, and this run's is recorded."""
    from knockout.fingerprint import describe, same_model

    if not folder.has_config:
        return
    recorded = folder.resolved.identity.get("fingerprint")
    same = same_model(recorded, fingerprint)
    if same is False:
        raise KnockoutError(
            f"the model's weights differ from those of the run in {str(folder.dir)!r} (fingerprint "
            f"{describe(recorded)} -> {describe(fingerprint)}): its rows would mix two models. Restore the model, "
            "use another --out folder, or --restart to start over."
        )
    if same is None:
        log.warning(
            "%s records no comparable model fingerprint (%s; now %s): the weights cannot be checked against its "
            "rows; this run records them",
            folder.dir,
            describe(recorded),
            describe(fingerprint),
        )


# -- config -------------------------------------------------------------------------------------------------------
def write_config(run_dir: str | os.PathLike, config: dict) -> None:
    write_atomic(Path(run_dir) / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def check_same_settings(folder: RunFolder, fields: dict) -> None:
    """Raise if the results-defining settings stored in ``folder``'s config.json differ from ``fields`` (both
    from :func:`knockout.config.result_settings`), naming each difference."""
    stored = folder.result_settings()
    if stored is None:
        return
    run_dir = folder.dir
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
    path = Path(run_dir) / SELECTION_FILE
    tensors = load_selection(run_dir) if path.is_file() else {}
    tensors.update(orders)
    note = "random neuron order per seed; fraction f ablates the first round(f * n) of each order"
    save_checked(path, tensors, {"mode": mode, "note": note})


def load_selection(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The neuron orders stored in a run folder's ``selection.safetensors``, checked against their checksum."""
    path = Path(run_dir) / SELECTION_FILE
    return load_checked(path, f"delete {str(path)!r} (the orders are recomputed from the seeds) and re-run")[0]


# -- per-document sums (paired comparisons) -------------------------------------------------------------------------
def _paired_path(run_dir: str | os.PathLike, seed: int) -> Path:
    return Path(run_dir) / PAIRED_DIR / f"seed{int(seed)}.safetensors"


def _doc_key(method: str, fraction: float, target: str = "") -> str:
    return f"{method}@{fraction_key(fraction)!r}" + (f"{TARGET_SEP}{target}" if target else "")


def save_doc_sums(
    run_dir: str | os.PathLike, method: str, fraction: float, seed: int, sums: dict, target: str = ""
) -> None:
    """Add one row's per-document sums (``{"n", "ce_sum", "correct"}``: ``[n_docs]`` arrays, as
    :meth:`knockout.evaluation.Metrics.doc_sums` gives them) to ``paired/seed{seed}.safetensors`` (with a checksum)."""
    path = _paired_path(run_dir, seed)
    tensors = _load_paired(path) if path.is_file() else {}
    key = _doc_key(method, fraction, target)
    for name in (*DOC_FIELDS, *(f for f in EXTRA_DOC_FIELDS if f in sums)):
        tensors[f"{key}.{name}"] = torch.as_tensor(sums[name]).contiguous()
    note = "per-document sums of each (method, fraction) row of this seed, for paired comparisons"
    save_checked(path, tensors, {"seed": str(int(seed)), "note": note})


def _load_paired(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one ``paired/`` file, checked against its checksum."""
    remedy = (
        f"delete {str(path)!r}: the next run of the same sweep command recomputes the sums of its rows (a report "
        "made without it leaves that seed out of the paired comparison)"
    )
    return load_checked(path, remedy)[0]


# -- a scan's attribution estimates ------------------------------------------------------------------------------------
def write_attribution(run_dir: str | os.PathLike, record: dict) -> None:
    """Write a scan's attribution estimates (``{"metric", "seed", "seconds", "estimates": {method: {unit: value}}}``,
    see :func:`knockout.experiments.scan.write_attribution`)."""
    write_atomic(Path(run_dir) / ATTRIBUTION_FILE, json.dumps(record, indent=1) + "\n")


def doc_sums_disagree(row: ResultRow | dict, sums: dict | None) -> str | None:
    """Why a row's per-document ``sums`` do not belong to it (``None`` when they do): their totals must be the row's
    scored targets, top-1 and CE (the CE up to float rounding: the row sums per batch in float32 precision)."""
    if sums is None:
        return "no per-document sums"
    r = row if isinstance(row, dict) else row.as_dict()
    try:
        n = int(sums["n"].sum())
        correct = int(sums["correct"].sum())
        ce = float(sums["ce_sum"].sum())
    except (KeyError, TypeError, ValueError):
        return "unreadable per-document sums"
    if n != int(r["n_eval"]):
        return f"their targets add up to {n}, the row has {r['n_eval']}"
    if n == 0:
        return None
    if abs(correct / n - float(r["top1"])) > 1e-9:
        return f"their top-1 is {correct / n:.6g}, the row's {r['top1']:.6g}"
    if not math.isclose(ce / n, float(r["ce"]), rel_tol=1e-5, abs_tol=1e-6):
        return f"their CE is {ce / n:.6g}, the row's {r['ce']:.6g}"
    return None


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
#: Metrics only some evaluations have (task prompts with a correct and an incorrect answer); rows without them read as
#: ``None``.
OPTIONAL_FIELDS = ("logit_diff", "delta_logit_diff")


def fraction_key(fraction: float) -> float:
    """A fraction as rows are keyed by it: rounded to 10 decimals, so 0.1 * 3 and 0.3 are the same row."""
    return round(float(fraction), 10)


def row_key(method: str, fraction: float, seed: int, target: str = "") -> tuple[str, float, int, str]:
    """The key of a row: ``(method, fraction_key(fraction), seed, target)``."""
    return (method, fraction_key(fraction), int(seed), target)


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

    def __init__(self, folder: RunFolder | str | os.PathLike, read_only: bool = False):
        folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
        self.dir = folder.dir
        self.read_only = read_only
        self.rows: dict[tuple, ResultRow] = {r.key: r for r in folder.rows}
        if folder.has_results:
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


def model_label(model: str) -> str:
    """A short name of a model for tables, legends and folders: the last part of its name or path, without
    ``.gguf`` (``facebook/opt-1.3b`` -> ``opt-1.3b``)."""
    return model.rstrip("/").replace("\\", "/").split("/")[-1].removesuffix(".gguf")


# -- the reader -------------------------------------------------------------------------------------------------------
class RunFolder:
    """A run folder as it is stored: the one reader of its files (sweeps resuming it, reports, comparisons, export).

    - :attr:`config`: the recorded settings as a :class:`~knockout.config.SweepConfig` (``None`` without config.json)
      and :attr:`resolved`, the typed record of what the run resolved (:class:`~knockout.config.Resolved`): a report
      reads the run's own values, never today's defaults;
    - :attr:`rows`: results.jsonl's rows (:class:`ResultRow`);
    - :attr:`doc_sums`: per row, its per-document sums, *checked*: sums that do not add up to their row are not the
      row's (:func:`doc_sums_disagree`), so they are left out and the row is in :attr:`unusable` with the reason (a
      sweep evaluates such a row again; a report names it);
    - :meth:`selection`, :meth:`attribution`, :meth:`artifact`: the other files, each checked (checksums).

    Reading never writes and never takes the folder's lock. Each file is read once, on first use.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self._raw = None
        self._row_dicts: list[dict] | None = None
        path = self.dir / CONFIG_FILE
        if path.is_file():
            try:
                self._raw = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise KnockoutError(f"{str(path)!r} is damaged ({e}); use another --out folder or delete it") from e
            if not isinstance(self._raw, dict):
                raise KnockoutError(
                    f"{str(path)!r} is damaged (not a JSON object); use another --out folder or delete it"
                )

    def __fspath__(self) -> str:  # path-like: Path(folder) is the run folder
        return str(self.dir)

    @classmethod
    def open(cls, run_dir: str | os.PathLike | RunFolder) -> RunFolder:
        """The run folder ``run_dir``, which must exist (a report or comparison reads one); a ``RunFolder`` as is."""
        if isinstance(run_dir, RunFolder):
            return run_dir
        if not Path(run_dir).is_dir():
            raise KnockoutError(f"{str(run_dir)!r} is not a folder; give a knockout run folder (with results.jsonl)")
        return cls(run_dir)

    # -- settings -----------------------------------------------------------------------------------------------
    @property
    def has_config(self) -> bool:
        return self._raw is not None

    @functools.cached_property
    def config(self) -> SweepConfig | None:
        """The settings config.json recorded (:meth:`~knockout.config.SweepConfig.from_record`)."""
        if self._raw is None:
            return None
        try:
            return SweepConfig.from_record(self._raw)
        except KnockoutError as e:
            raise KnockoutError(
                f"{str(self.dir / CONFIG_FILE)!r} does not hold a run's settings ({e}); use another folder, or delete "
                "the file"
            ) from e

    @functools.cached_property
    def resolved(self) -> Resolved:
        try:
            return Resolved.from_dict(None if self._raw is None else self._raw.get("resolved"))
        except KnockoutError as e:
            where = str(self.dir / CONFIG_FILE)
            raise KnockoutError(f"{where!r} is damaged ({e}); delete it or use another folder") from e

    def result_settings(self) -> dict | None:
        """The stored settings that define results (:func:`~knockout.config.result_settings`), as stored."""
        return None if self._raw is None else result_settings(self._raw)

    @property
    def is_scan(self) -> bool:
        return self.config is not None and self.config.scan.unit is not None

    # -- rows and sums ------------------------------------------------------------------------------------------
    @property
    def has_results(self) -> bool:
        return (self.dir / RESULTS_FILE).is_file()

    @functools.cached_property
    def rows(self) -> list[ResultRow]:
        """results.jsonl's rows (none when the file does not exist yet), each checked to have every field."""
        path, rows = self.dir / RESULTS_FILE, []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines() if self.has_results else [], 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise KnockoutError(f"{path}:{n} is not valid JSON ({e}); fix or delete that line") from e
            rows.append(ResultRow.from_dict(row, where=f"{path}:{n}"))
        return rows

    def row_dicts(self) -> list[dict]:
        """:attr:`rows` as dicts (:meth:`ResultRow.as_dict`), made once: the reports read them as such."""
        if self._row_dicts is None:
            self._row_dicts = [r.as_dict() for r in self.rows]
        return self._row_dicts

    @functools.cached_property
    def stored_sums(self) -> dict[tuple[str, float, int, str], dict]:
        """Every row's per-document sums in ``paired/`` (each file checked against its checksum), whether or not a
        row owns them: ``row_key -> {"n", "ce_sum", "correct"[, "ld_sum"]}`` (numpy arrays; ``ld_sum``, the summed
        logit differences of task prompts, only in rows that have it). See :func:`doc_sums_disagree`."""
        out: dict[tuple[str, float, int, str], dict] = {}
        folder = self.dir / PAIRED_DIR
        for path in sorted(folder.glob("seed*.safetensors")) if folder.is_dir() else []:
            try:
                seed = int(path.stem.removeprefix("seed"))
            except ValueError:
                continue  # not a file of knockout's
            for name, t in _load_paired(path).items():
                try:
                    key, field = name.rsplit(".", 1)
                    key, _, target = key.partition(TARGET_SEP)
                    method, fraction = key.rsplit("@", 1)
                    k = row_key(method, float(fraction), seed, target)
                except ValueError as e:
                    raise KnockoutError(f"{str(path)!r} holds an unknown entry {name!r}; delete the file") from e
                out.setdefault(k, {})[field] = t.numpy()
        return {k: v for k, v in out.items() if all(f in v for f in DOC_FIELDS)}

    @functools.cached_property
    def unusable(self) -> dict[tuple[str, float, int, str], str]:
        """Row key -> why the row's per-document sums cannot be used (missing, or not adding up to the row)."""
        out = {}
        for row in self.rows:
            why = doc_sums_disagree(row, self.stored_sums.get(row.key))
            if why is not None:
                out[row.key] = why
        return out

    @functools.cached_property
    def doc_sums(self) -> dict[tuple[str, float, int, str], dict]:
        """Row key -> the row's per-document sums (``n``, ``ce_sum``, ``correct`` and, where stored, ``ld_sum``),
        for the rows whose sums add up to them."""
        return {r.key: self.stored_sums[r.key] for r in self.rows if r.key not in self.unusable}

    def unusable_note(self) -> str | None:
        """A sentence naming the rows whose per-document sums are unusable (left out of paired comparisons)."""
        bad = [(k, why) for k, why in self.unusable.items() if k in self.stored_sums]
        if not bad:
            return None
        shown = "; ".join(f"{m} at {t or f'{f:g}'} (seed {s}): {why}" for (m, f, s, t), why in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        return (
            f"{len(bad)} row(s) have per-document sums in {PAIRED_DIR}/ that do not belong to them ({shown}{more}); "
            "they are left out of the paired comparisons. Re-run the same command to evaluate them again."
        )

    # -- what the reports read -----------------------------------------------------------------------------------
    @classmethod
    def with_results(cls, run_dir: str | os.PathLike | RunFolder) -> RunFolder:
        """:meth:`open`, for a report: the folder must hold a results.jsonl."""
        folder = cls.open(run_dir)
        if not folder.has_results:
            raise KnockoutError(
                f"{str(folder.dir / RESULTS_FILE)!r} does not exist; is {str(run_dir)!r} a knockout run folder?"
            )
        return folder

    @property
    def sequential(self) -> bool:
        return self.config is not None and self.config.sequential

    @property
    def fixed_seeds(self) -> list[int]:
        """The seeds config.json asks every method and fraction to run (with ``seeds: "auto"``, the first look's)."""
        return list(self.config.fixed_seeds) if self.config is not None else []

    @property
    def seeds(self) -> list[int]:
        return list(dict.fromkeys([*self.fixed_seeds, *(r.seed for r in self.rows)]))

    @property
    def fractions(self) -> tuple[float, ...]:
        """Where the run's answer is given by default: its decision fractions (``--decide-fractions``)."""
        return tuple((self.config.decide if self.config is not None else DecideOptions()).fractions)

    def table_rows(self) -> list[dict]:
        """The rows Table 2 and the curves summarise (as dicts): with ``seeds: "auto"``, those of the first look's
        sets (every method has them at every fraction; the sets added at the decision fractions serve the answer)."""
        fixed = set(self.fixed_seeds)
        return [r for r in self.row_dicts() if not self.sequential or r["seed"] in fixed]

    @property
    def model(self) -> str:
        model = self.config.model if self.config is not None else None
        return str(model or self.resolved.identity.get("name") or self.dir.name)

    @property
    def label(self) -> str:
        """A short name for tables and legends: :func:`model_label` of the model (or the folder's name)."""
        return model_label(self.model) or self.dir.name

    @property
    def methods(self) -> list[str]:
        """Methods in config order, then any others found in the rows (baseline excluded)."""
        found = [r.method for r in self.rows if r.method != "baseline"]
        return list(dict.fromkeys([*(self.config.methods if self.config else ()), *found]))

    @functools.cached_property
    def _present(self) -> set[tuple]:
        return {r.key for r in self.rows}

    @functools.cached_property
    def _expected(self) -> set[tuple] | None:
        return self.expected_keys()

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
        if self.resolved.targets:  # named sets (--ablate) or scan units: each method on each target
            targets = self.resolved.targets.items()
            return keys | {
                row_key(m, t["fraction"], s, name) for m in cfg.methods for name, t in targets for s in seeds
            }
        return keys | {row_key(m, f, s) for m in cfg.methods for f in cfg.fractions_of(m) for s in seeds}

    def missing(self) -> list[tuple]:
        """Expected rows not (yet) in results.jsonl, sorted."""
        return [] if self._expected is None else sorted(self._expected - self._present)

    @property
    def n_present(self) -> int:
        """Expected rows that results.jsonl holds (rows it holds beyond those, e.g. of methods no longer asked for,
        are not counted)."""
        return len(self.rows) if self._expected is None else len(self._expected & self._present)

    @property
    def n_expected(self) -> int | None:
        return None if self._expected is None else len(self._expected)

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

    def timings(self) -> dict:
        """Total seconds over rows, and per method: rows, total and mean seconds per row."""
        per: dict[str, list[float]] = {}
        for r in self.rows:
            per.setdefault(r.method, []).append(float(r.seconds))
        return {
            "total_seconds": sum(sum(v) for v in per.values()),
            "n_rows": len(self.rows),
            "methods": {
                m: {"rows": len(v), "seconds": sum(v), "mean_seconds": sum(v) / len(v)} for m, v in per.items()
            },
        }

    # -- other files --------------------------------------------------------------------------------------------
    @property
    def stats_path(self) -> Path | None:
        path = self.dir / STATS_FILE
        return path if path.is_file() else None

    def selection(self) -> dict[str, torch.Tensor]:
        """The stored neuron orders (``{}`` when there are none), checked."""
        return load_selection(self.dir) if (self.dir / SELECTION_FILE).is_file() else {}

    def attribution(self) -> dict | None:
        """A scan's attribution estimates, or ``None`` when it has none; a damaged file is an error."""
        path = self.dir / ATTRIBUTION_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KnockoutError(f"{str(path)!r} is damaged ({e}); delete it (the scan recomputes it)") from e
        if not isinstance(data, dict) or not isinstance(data.get("estimates"), dict):
            raise KnockoutError(f"{str(path)!r} is damaged; delete it (the scan recomputes it)")
        return data

    def artifact(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The tensors of an ``artifacts/`` file of this folder, checked (:func:`knockout.files.load_artifact`)."""
        return load_artifact(path)

    def artifact_metadata(self, method: str) -> list[dict[str, str]]:
        """The metadata of each of ``method``'s files in ``artifacts/METHOD/`` (in name order), each file checked."""
        folder = self.dir / ARTIFACTS_DIR / method
        paths = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        return [load_checked(p, f"delete {str(p)!r} (it is learned again) and re-run")[1] for p in paths]

    def check_integrity(self) -> None:
        """Read every stored file, so that a damaged one is named (with what to do) before anything runs: the
        config, results, neuron orders, per-document sums and learned constants (the statistics file is checked
        when it is loaded)."""
        self.config, self.resolved, self.rows, self.stored_sums  # noqa: B018 - read to check
        self.selection()
        for artifact in sorted((self.dir / ARTIFACTS_DIR).rglob("*.safetensors")):
            self.artifact(artifact)
