"""Experiment trackers: a sweep logged to MLflow or Weights & Biases (``knockout sweep --mlflow URI`` /
``--wandb PROJECT``; Python: ``run_sweep(cfg, callbacks=[MLflowCallback(uri)])``). See docs/tracking.md.

Both log the same things, from the :class:`~knockout.experiments.callbacks.Callback` events:

- **params**: the resolved config (``config.json``: settings and the ``resolved`` record), flattened to dotted keys
  (:func:`flatten_config`: ``optimal.steps``, ``resolved.model_identity.name``; for MLflow, characters it does not
  allow in names become ``_``, and values are strings, JSON for non-strings);
- **metrics**, one step per row, the step being the row's index in ``results.jsonl``: ``top1``, ``ce``,
  ``delta_top1`` and ``delta_ce`` under ``{metric}/{method}/{fraction}`` (:func:`metric_name`, e.g.
  ``ce/peak/0.5``), and the row's ``seed``;
- **artifacts** at the end: ``config.json``, ``results.jsonl``, ``results.csv`` and the ``report/`` folder.

The clients are optional (``pip install 'knockout[tracking]'``: ``mlflow-skinny``, ``wandb``) and imported only when
a tracker is made.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import urllib.parse
from pathlib import Path

from knockout.errors import KnockoutError
from knockout.experiments.callbacks import Callback
from knockout.runfolder import ResultRow, fraction_key

log = logging.getLogger(__name__)

#: The metrics logged per row (fields of :class:`~knockout.runfolder.ResultRow`).
ROW_METRICS = ("top1", "ce", "delta_top1", "delta_ce")
#: MLflow's longest parameter value (longer values are cut, ending in "...").
MAX_PARAM_LENGTH = 6000
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")
WANDB_MODES = ("offline", "online", "disabled")
#: Seconds the check of a tracking server waits for it to accept a connection (once, before the model loads).
CONNECT_TIMEOUT_S = 3.0
#: Folders that hold no tracking store (kernel and device file systems).
SYSTEM_DIRS = ("/proc", "/sys", "/dev")


def flatten_config(config: dict, prefix: str = "") -> dict:
    """``config`` (nested dicts) as one level of dotted keys: ``{"optimal": {"steps": 5}}`` ->
    ``{"optimal.steps": 5}``. Other values (lists, numbers, strings, ``None``) are kept as they are."""
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


def param_text(value) -> str:
    """A parameter's value as MLflow stores it: strings as they are, everything else as JSON."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def metric_name(metric: str, row: ResultRow) -> str:
    """``{metric}/{method}/{fraction}`` (``ce/peak/0.5``), with ``:{target}`` after the fraction for a row of a
    named target. Characters MLflow does not allow in names (anything but letters, digits and ``_-. :/``) become
    ``_``: ``peak@0.05`` is logged as ``peak_0.05``."""
    name = f"{metric}/{row.method}/{fraction_key(row.fraction):g}" + (f":{row.target}" if row.target else "")
    return _UNSAFE.sub("_", name)


def row_metrics(row: ResultRow) -> dict[str, float]:
    """The metrics of one row: :data:`ROW_METRICS` under :func:`metric_name`, and ``seed``."""
    metrics = {metric_name(m, row): float(getattr(row, m)) for m in ROW_METRICS}
    metrics["seed"] = float(row.seed)
    return metrics


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise KnockoutError(
            f"this tracker needs the package {package!r}: pip install 'knockout[tracking]' (or pip install {package})"
        ) from e


def _is_file_store(uri: str) -> bool:
    """Whether an MLflow tracking URI is a local folder (``file:`` URI or a plain path)."""
    return uri.startswith("file:") or "://" not in uri and not uri.startswith(("sqlite:", "databricks", "postgresql"))


def _store_path(uri: str) -> Path:
    """The folder of a file store: ``file:./mlruns``, ``file:///abs/mlruns`` or a plain path."""
    if uri.startswith("file:"):
        parts = urllib.parse.urlsplit(uri)
        return Path(urllib.parse.unquote(parts.path or ".")).expanduser()
    return Path(uri).expanduser()


def _check_local(path: Path, what: str) -> None:
    """Refuse a local tracking location that is a file, lies under /proc, /sys or /dev (also through a link), or whose
    folder does not exist and cannot be made; checked on disk only (no network)."""
    real = Path(os.path.realpath(path))
    for system in SYSTEM_DIRS:
        if real == Path(system) or Path(system) in real.parents:
            raise KnockoutError(f"{what} lies under {system}, which holds no tracking store; give a folder of yours")
    if path.exists() and not path.is_dir():
        raise KnockoutError(f"{what} is a file, not a folder; give a folder (it is created if missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise KnockoutError(f"{what} lies inside the file {str(existing)!r}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KnockoutError(f"{what} cannot be written ({str(existing)!r} is not writable); give another folder")


def _check_server(uri: str) -> None:
    """Refuse an http(s) tracking URI whose server does not accept a TCP connection within
    :data:`CONNECT_TIMEOUT_S` seconds (one try, no retries)."""
    parts = urllib.parse.urlsplit(uri)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host:
        raise KnockoutError(f"--mlflow {uri!r} names no server; give http://HOST:PORT, or file:./mlruns to log offline")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise KnockoutError(
            f"cannot reach the MLflow server at {uri} ({e.strerror or e}); start it (mlflow server), or log offline "
            "with --mlflow file:./mlruns"
        ) from None


def check_mlflow_uri(uri: str) -> None:
    """Refuse, before a sweep starts (so before the model loads and statistics are collected), a tracking URI the
    sweep could not log to: a file store (``file:`` URI or a plain path) that is a file, lies under /proc, /sys or
    /dev, or cannot be created (checked on disk, offline); an ``sqlite:`` database in such a place; an http(s)
    server that does not accept a connection within :data:`CONNECT_TIMEOUT_S` seconds. Other schemes (databricks,
    postgresql...) are left to MLflow."""
    if not isinstance(uri, str) or not uri.strip():
        raise KnockoutError("--mlflow needs a tracking URI, e.g. file:./mlruns or http://host:5000")
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if _is_file_store(uri):
        _check_local(_store_path(uri), f"--mlflow {uri!r}")
    elif scheme == "sqlite":
        rest = uri[len("sqlite:") :]
        if rest.startswith("///") and rest[3:]:  # sqlite:///relative.db, sqlite:////absolute.db
            db = Path(urllib.parse.unquote(rest[3:])).expanduser()
            if db.is_dir():
                raise KnockoutError(f"--mlflow {uri!r} names a folder; an sqlite: URI names a database file")
            _check_local(db.parent, f"the folder of --mlflow {uri!r}")
    elif scheme in ("http", "https"):
        _check_server(uri)


class MLflowCallback(Callback):
    """Log a sweep to MLflow: a new run in ``experiment`` of the tracking server or store ``uri`` (see the module
    docs for what is logged). ``uri`` may be a local folder (``file:./mlruns``, or a plain path), which works
    offline; MLflow 3 keeps such file stores in maintenance mode and refuses them unless
    ``MLFLOW_ALLOW_FILE_STORE=true``, so for a file store knockout sets that variable (when it is unset).
    ``run_name``: default the run folder's name. The run's id is :attr:`run_id` once the sweep started."""

    def __init__(self, uri: str, experiment: str = "knockout", run_name: str | None = None):
        if not uri:
            raise KnockoutError("--mlflow needs a tracking URI, e.g. file:./mlruns or http://host:5000")
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.run_id: str | None = None
        self._step = 0
        _need("mlflow", "mlflow-skinny")  # refuse before the sweep starts
        check_mlflow_uri(uri)

    def on_start(self, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if _is_file_store(self.uri) and "MLFLOW_ALLOW_FILE_STORE" not in os.environ:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        name = self.run_name or Path(config.get("out") or "knockout").name
        run = self.client.create_run(experiment_id, run_name=name, tags={"knockout.out": str(config.get("out"))})
        self.run_id = run.info.run_id
        params = [Param(_UNSAFE.sub("_", k), param_text(v)) for k, v in sorted(flatten_config(config).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        log.info("MLflow: logging to run %s of experiment %r at %s", self.run_id, self.experiment, self.uri)

    def on_row(self, row: ResultRow, doc_summary: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, self._step) for k, v in row_metrics(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self._step += 1

    def on_end(self, run_dir: Path, files: list[Path]) -> None:
        run_dir = Path(run_dir)
        for path in files:
            parent = path.relative_to(run_dir).parent
            self.client.log_artifact(self.run_id, str(path), None if parent == Path(".") else parent.as_posix())
        self.client.set_terminated(self.run_id, "FINISHED")
        log.info("MLflow: run %s finished (%d files logged)", self.run_id, len(files))

    def on_error(self, error: BaseException) -> None:
        if self.run_id is not None:
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            self.client.set_terminated(self.run_id, status)


class WandbCallback(Callback):
    """Log a sweep to Weights & Biases: a new run in ``project`` (see the module docs for what is logged; the files
    are one artifact, ``knockout-run``, of type ``run-folder``). ``mode``: ``offline`` (the default: no network;
    the run is written under ``dir`` and uploaded later with ``wandb sync``), ``online`` (needs ``wandb login``) or
    ``disabled``. ``dir``: where W&B writes its run folder (default: the knockout run folder, so
    ``<out>/wandb/offline-run-*``). ``settings``: more ``wandb.Settings`` fields. The run is :attr:`run` once the
    sweep started."""

    def __init__(
        self,
        project: str,
        mode: str = "offline",
        dir: str | Path | None = None,
        entity: str | None = None,
        run_name: str | None = None,
        settings: dict | None = None,
    ):
        if not project:
            raise KnockoutError("--wandb needs a project name")
        if mode not in WANDB_MODES:
            raise KnockoutError(f"--wandb-mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
        self.project, self.mode, self.dir, self.entity, self.run_name = project, mode, dir, entity, run_name
        self.settings = {"console": "off", **(settings or {})}
        self.run = None
        self._step = 0
        _need("wandb", "wandb")

    def on_start(self, config: dict) -> None:
        import wandb

        out = Path(config.get("out") or ".")
        folder = Path(self.dir) if self.dir is not None else out
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project, entity=self.entity, name=self.run_name or out.name, dir=str(folder), mode=self.mode,
            config=flatten_config(config), settings=wandb.Settings(**self.settings), reinit="create_new",
        )  # fmt: skip
        log.info("W&B: logging to %s run %s in %s", self.mode, self.run.id, self.run.dir)

    def on_row(self, row: ResultRow, doc_summary: dict) -> None:
        self.run.log(row_metrics(row), step=self._step)
        self._step += 1

    def on_end(self, run_dir: Path, files: list[Path]) -> None:
        import wandb

        run_dir = Path(run_dir)
        artifact = wandb.Artifact("knockout-run", type="run-folder", description=f"knockout run folder {run_dir}")
        for path in files:
            artifact.add_file(str(path), name=path.relative_to(run_dir).as_posix())
        self.run.log_artifact(artifact)
        self.run.finish()
        if self.mode == "offline":
            log.info("W&B: offline run saved in %s; upload it with `wandb sync %s`", self.run.dir,
                     Path(self.run.dir).parent)  # fmt: skip

    def on_error(self, error: BaseException) -> None:
        if self.run is not None:
            self.run.finish(exit_code=130 if isinstance(error, KeyboardInterrupt) else 1)


def trackers(mlflow: str | None = None, wandb: str | None = None, wandb_mode: str = "offline") -> list[Callback]:
    """The trackers the CLI's ``--mlflow URI`` and ``--wandb PROJECT`` (with ``--wandb-mode``) ask for."""
    out: list[Callback] = []
    if mlflow is not None:
        out.append(MLflowCallback(mlflow))
    if wandb is not None:
        out.append(WandbCallback(wandb, mode=wandb_mode))
    return out
