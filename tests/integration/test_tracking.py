"""``knockout sweep --mlflow URI`` and ``--wandb PROJECT`` (offline): what the trackers stored, read back from the
MLflow file store (``MlflowClient``) and from W&B's offline run file (the ``.wandb`` record log, parsed here), equals
the run folder: the params are config.json flattened, the metrics per step are results.jsonl's rows, the artifacts
are the run folder's files byte for byte."""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import pytest

import tiny
from knockout.cli import main
from knockout.errors import KnockoutError
from knockout.runfolder import RunFolder

METRICS = ("top1", "ce", "delta_top1", "delta_ce")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One sweep (with its report) logged to an MLflow file store and to an offline W&B run at once: the run folder
    and the MLflow URI. W&B writes under the run folder (``<out>/wandb``), its other folders under tmp."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("tracking")
    model = tiny.save(tiny.causal_lm("llama"), "causal", root / "model")
    corpus = tiny.write_corpus(root / "c.txt", n_docs=30)
    uri, out = (root / "mlruns").as_uri(), root / "run"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # not the home folder
            mp.setenv(var, str(root / var.lower()))
        mp.delenv("WANDB_MODE", raising=False)
        mp.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
        mp.chdir(root)  # anything written by default lands here
        code = main([
            "-q", "sweep", "--model", model, "--data", corpus, "--methods", "zero", "--fractions",
            "0,0.5,1", "--seeds", "0,1", "--eval-tokens", "40", "--stats-tokens", "40", "--max-length", "16",
            "--batch-size", "4", "--device", "cpu", "--out", str(out), "--mlflow", uri, "--wandb", "knockout-test",
        ])  # fmt: skip
    assert code == 0
    return out, uri


def _flat(config: dict, prefix: str = "") -> dict:
    """config.json's settings as dotted keys (nested objects flattened; an empty object kept as a value)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _expected_metrics(out) -> set[tuple[str, int, float]]:
    """``(name, step, value)`` of every row of results.jsonl, named as docs/tracking.md says: step = the row's index,
    ``{metric}/{method}/{fraction}``, and the row's seed."""
    want = set()
    for step, row in enumerate(RunFolder(out).row_dicts()):
        for m in METRICS:
            want.add((f"{m}/{row['method']}/{row['fraction']:g}", step, row[m]))
        want.add(("seed", step, float(row["seed"])))
    return want


def _run_files(out) -> dict[str, bytes]:
    names = ["config.json", "results.jsonl", "results.csv"]
    names += sorted(p.relative_to(out).as_posix() for p in (out / "report").rglob("*") if p.is_file())
    return {n: (out / n).read_bytes() for n in names}


def test_mlflow_file_store_reads_back_equal_to_the_run_folder(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    out, uri = tracked
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("knockout").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"

    config = json.loads((out / "config.json").read_text())
    want = {k: v if isinstance(v, str) else json.dumps(v) for k, v in _flat(config).items()}
    assert run.data.params == want
    assert run.data.params["resolved.task"] == "causal" and run.data.params["optimal.steps"] == "8"

    history = client.get_metric_history
    got = {(m.key, m.step, m.value) for key in run.data.metrics for m in history(run.info.run_id, key)}
    assert got == _expected_metrics(out)
    rows = RunFolder(out).row_dicts()
    i = next(i for i, r in enumerate(rows) if (r["method"], r["fraction"], r["seed"]) == ("zero", 0.5, 1))
    assert ("ce/zero/0.5", i, rows[i]["ce"]) in got and ("seed", i, 1.0) in got

    def listed(path=None):
        for item in client.list_artifacts(run.info.run_id, path):
            yield from (listed(item.path) if item.is_dir else [item.path])

    files = _run_files(out)
    assert sorted(listed()) == sorted(files)
    local = client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl"))
    assert {n: (tmp_path / "dl" / n).read_bytes() for n in files} == files and local


# -- W&B -------------------------------------------------------------------------------------------------------
def _wandb_records(path):
    """The records of a W&B run file (``run-*.wandb``): a 7-byte header (``:W&B``, magic, version), then LevelDB-log
    blocks of 32 KiB holding chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) of serialised
    ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_reads_back_equal_to_the_run_folder(tracked):
    out, _ = tracked  # --wandb-mode is offline by default
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(_wandb_records(run_file))

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "knockout-test" and run.display_name == "run"
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert config == _flat(json.loads((out / "config.json").read_text()))

    got = set()
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in r.history.item}
            step = items["_step"]
            got |= {(k, step, float(v)) for k, v in items.items() if not k.startswith("_")}
    assert got == _expected_metrics(out)

    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert (artifact.name, artifact.type) == ("knockout-run", "run-folder")
    md5 = {c.path: c.digest for c in artifact.manifest.contents}
    files = _run_files(out)
    assert md5 == {n: base64.b64encode(hashlib.md5(b).digest()).decode() for n, b in files.items()}
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the run was finished


def test_metric_names():
    from knockout.runfolder import ResultRow
    from knockout.tracking import metric_name, row_metrics

    row = ResultRow.measured("peak@0.05", 0.1 * 3, 2, 0.25, 3.5, 10, 4, 8, 0.1)
    assert metric_name("ce", row) == "ce/peak_0.05/0.3"  # MLflow allows no '@'; the fraction as rows key it
    assert row_metrics(row) == {"top1/peak_0.05/0.3": 0.25, "ce/peak_0.05/0.3": 3.5, "delta_top1/peak_0.05/0.3": 0.0,
                                "delta_ce/peak_0.05/0.3": 0.0, "seed": 2.0}  # fmt: skip
    named = ResultRow.measured("zero", 1.0, 0, 0.5, 2.0, 10, 4, 8, 0.1, target="L9.H6 (name)")
    assert metric_name("delta_ce", named) == "delta_ce/zero/1:L9.H6 _name_"


def test_mlflow_param_names_and_a_failed_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from knockout.tracking import MLflowCallback

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    cb = MLflowCallback(uri, experiment="e")
    cb.on_start({"out": "runs/x", "method_fractions": {"peak@0.05": [0.5]}, "resolved": {"commit": None}})
    cb.on_error(RuntimeError("boom"))
    run = MlflowClient(tracking_uri=uri).get_run(cb.run_id)
    assert run.data.params == {"out": "runs/x", "method_fractions.peak_0.05": "[0.5]", "resolved.commit": "null"}
    assert (run.info.status, run.info.run_name) == ("FAILED", "x")


def test_trackers_refuse_bad_settings():
    from knockout.tracking import MLflowCallback, WandbCallback

    with pytest.raises(KnockoutError, match="--wandb-mode"):
        WandbCallback("p", mode="cloud")
    with pytest.raises(KnockoutError, match="tracking URI"):
        MLflowCallback("")
