"""Reliability (issue 12): what a run folder records about its data, checks made before the model is loaded, bad data
files, NaN/inf, checksums, --restart, Ctrl-C, crash safety under SIGKILL, and determinism."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import knockout.loading
import tiny
from knockout.cli import main
from knockout.errors import KnockoutError
from knockout.experiments import engine, prepare
from knockout.runfolder import ResultRow, ResultStore, RunFolder, load_selection
from knockout.stats import Statistics

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    return tmp_path_factory.mktemp("rel"), *tiny_llama


def _values(out):
    """The rows of a run folder without their timings, keyed by (method, fraction, seed)."""
    rows = RunFolder(out).row_dicts()
    keys = [(r["method"], r["fraction"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)), "a row is duplicated"
    return {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in zip(keys, rows)}


def _csv_values(out):
    lines = (out / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    i = header.index("seconds")
    return sorted(",".join(x for j, x in enumerate(line.split(",")) if j != i) for line in lines[1:])


@pytest.fixture(autouse=True)
def _no_report(monkeypatch):
    """Sweeps here skip writing the report (figures take most of a tiny sweep's time; tested elsewhere)."""
    monkeypatch.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is loaded."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded although the input could be checked without it")

    monkeypatch.setattr(knockout.loading, "load_model", refuse)
    monkeypatch.setattr(prepare, "load_model", refuse)
    monkeypatch.setattr(engine, "load_model", refuse)


# -- 2, 3: refused before loading the model, nothing written ---------------------------------------------------------
def _bad_data(tmp: Path) -> dict[str, Path]:
    files = {
        "malformed.json": b'{"text": "a',
        "numbers.json": b"[1, 2, 3]",
        "binary.txt": bytes([0x00, 0xFF, 0xFE, 0x80]) * 64,
        "oneline.txt": b"one long line of text that never ends " * 50,
        "empty.txt": b"",
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    (tmp / "emptydir").mkdir()
    return {name: tmp / name for name in [*files, "emptydir"]}


CASES = [
    (["--fractions", "0,1.5"], "between 0 and 1"),
    (["--fractions", "-0.1,0.5"], "between 0 and 1"),
    (["--eps", "-1"], "eps must be a positive"),
    (["--eps", "nan"], "eps must be a positive"),
    (["--eps", "0.000004", "--hist-limit", "20"], "histogram bins per neuron"),
    (["--methods", "nosuch"], "unknown ablation method"),
    (["--eval-tokens", "0"], "eval_tokens must be a positive"),
    (["--stats-tokens", "0"], "stats_tokens must be a positive"),
    (["--batch-size", "0"], "batch_size must be a positive"),
    (["--seeds", str(2**63)], "2**63"),
    (["--seeds", "-1"], "2**63"),
    (["DATA", "missing.txt"], "does not exist"),
    (["DATA", "malformed.json"], "is not valid JSON"),
    (["DATA", "numbers.json"], "item 0 is int"),
    (["DATA", "binary.txt"], "looks binary"),
    (["DATA", "oneline.txt"], "one document, which cannot be split"),
    (["DATA", "empty.txt"], "contains no text"),
    (["DATA", "emptydir"], "is empty"),
]


@pytest.mark.parametrize("extra, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_refused_before_the_model_loads_and_nothing_written(setup, tmp_path, capsys, no_model, extra, message):
    _, model, corpus = setup
    data = _bad_data(tmp_path)
    if extra[0] == "DATA":
        corpus, extra = str(data.get(extra[1], tmp_path / extra[1])), []
    out = tmp_path / "out"
    assert main(tiny.sweep_args(model, corpus, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_out_that_is_a_file_or_not_writable(setup, tmp_path, capsys, no_model):
    _, model, corpus = setup
    file = tmp_path / "file"
    file.write_text("keep")
    assert main(tiny.sweep_args(model, corpus, file)) == 2
    assert "is a file" in capsys.readouterr().err
    assert file.read_text() == "keep"
    assert main(tiny.sweep_args(model, corpus, file / "sub")) == 2
    assert "is a file" in capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            assert main(tiny.sweep_args(model, corpus, locked / "run")) == 2
            assert "not writable" in capsys.readouterr().err
            assert list(locked.iterdir()) == []
        finally:
            locked.chmod(0o755)


def test_descending_fraction_range_is_explained(setup, tmp_path, capsys, no_model):
    _, model, corpus = setup
    with pytest.raises(SystemExit) as e:
        main(tiny.sweep_args(model, corpus, tmp_path / "out", "--fractions", "1:0:0.5"))
    assert e.value.code == 2
    assert "counts down" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_histogram_memory_is_bounded_after_loading(setup, tmp_path, capsys, monkeypatch):
    _, model, corpus = setup
    monkeypatch.setattr("knockout.stats.running.MAX_HIST_BYTES", 1000)
    out = tmp_path / "out"
    assert main(tiny.sweep_args(model, corpus, out)) == 2
    err = capsys.readouterr().err
    assert "may need" in err and "64 neurons" in err and "raise --eps" in err
    assert not out.exists()


def test_windows_1252_text_is_read(tmp_path, caplog):
    from knockout.data.text import load_texts

    caplog.set_level("INFO")
    path = tmp_path / "latin.txt"
    path.write_bytes("Café crème à la française.\n\nNaïve façade, “quoted”.\n\nThird one.".encode("cp1252"))
    docs = sorted([*load_texts(str(path), "eval"), *load_texts(str(path), "collect")])
    assert docs == sorted(["Café crème à la française.", "Naïve façade, “quoted”.", "Third one."])
    assert caplog.text.count("Windows-1252") == 1  # noted once


# -- 1: the data a run folder was made from ---------------------------------------------------------------------------
def test_changed_data_is_refused_and_restart_starts_over(setup, tmp_path, capsys, caplog):
    _, model, _ = setup
    data = Path(tiny.write_corpus(tmp_path / "data.txt", n_docs=60))
    out = tmp_path / "run"
    args = tiny.sweep_args(model, str(data), out, "--seeds", "0", "--fractions", "0,1")
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    ident = config["resolved"]["data_identity"]
    assert ident["source"] == str(data) and len(ident["sha256"]) == 64
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    data.write_text(data.read_text() + "\n\nOne more document, added later.")  # edited in place, same path
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data differs" in err and "sha256" in err and "--restart" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing written

    # a config.json that records no data identity (edited by hand) is refused too: nothing says what its rows are of
    config["resolved"].pop("data_identity")
    (out / "config.json").write_text(json.dumps(config))
    assert main(args) == 2
    assert "data differs" in capsys.readouterr().err

    # --restart moves the old folder aside and starts afresh
    data.write_text(data.read_text() + "\n\nAnd another one.")
    assert main([*args, "--restart"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "results.jsonl").is_file()
    assert len(RunFolder(out).row_dicts()) == 5


def test_changed_setting_refuses_and_restart_applies_it(setup, tmp_path, capsys):
    _, model, corpus = setup
    out = tmp_path / "run"
    args = tiny.sweep_args(model, corpus, out, "--seeds", "0", "--fractions", "0,1", "--methods", "zero")
    assert main(args) == 0
    assert main([*args, "--max-length", "30"]) == 2
    assert "--restart" in capsys.readouterr().err
    assert main([*args, "--max-length", "30", "--restart"]) == 0
    assert json.loads((out / "config.json").read_text())["max_length"] == 30


# -- 4: NaN / inf -----------------------------------------------------------------------------------------------------
def test_nan_statistics_name_layer_and_neuron(setup, tmp_path, capsys):
    _, model, corpus = setup
    stats_path = tmp_path / "s.safetensors"
    cmd = tiny.stats_cmd(model, corpus, 200, stats_path)
    assert main(cmd) == 0
    stats = Statistics.load(stats_path)
    stats.layers[1].mean[5] = float("nan")
    stats.save(stats_path)  # a valid file (checksum and all) holding a NaN
    out = tmp_path / "run"
    assert main(tiny.sweep_args(model, corpus, out, "--stats", str(stats_path))) == 2
    err = capsys.readouterr().err
    assert "layer 1 neuron 5 has mean nan" in err
    assert not (out / "results.jsonl").exists()


def test_nan_metrics_are_an_error_never_a_row(tmp_path):
    store = ResultStore(tmp_path)
    good = ResultRow.measured("baseline", 0.0, 0, 0.5, 2.0, 10, 0, 64, 0.1)
    store.add(good)
    with pytest.raises(KnockoutError, match="zero at fraction 1.0 .seed 0. gave ce = nan"):
        store.add(ResultRow.measured("zero", 1.0, 0, 0.1, float("nan"), 10, 64, 64, 0.1, good))
    with pytest.raises(KnockoutError, match="gave ce = inf"):
        store.add(ResultRow.measured("zero", 1.0, 0, 0.1, float("inf"), 10, 64, 64, 0.1, good))
    assert [r["method"] for r in RunFolder(tmp_path).row_dicts()] == ["baseline"]
    json.loads((tmp_path / "results.jsonl").read_text())  # still valid JSON


# -- 5, 7: checksums and damaged run folders -------------------------------------------------------------------------
def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x7f" * 8  # the end of the tensor data
    path.write_bytes(bytes(data))


def test_damaged_stats_and_selection_files_are_named(setup, tmp_path, capsys):
    _, model, corpus = setup
    out = tmp_path / "run"
    args = tiny.sweep_args(model, corpus, out, "--seeds", "0", "--fractions", "0,1")
    assert main(args) == 0
    for name in ("selection.safetensors", "stats.safetensors"):
        path = out / name
        good = path.read_bytes()
        _damage(path)
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert main([*args, "--seeds", "0,1"]) == 2
        err = capsys.readouterr().err
        assert name in err and "damaged" in err and "delete" in err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        path.write_bytes(good)
    assert main([*args, "--seeds", "0,1"]) == 0  # repaired: resumes


def test_files_without_checksum_are_refused_as_damaged(tmp_path):
    stats = Statistics([4, 4], eps=0.5, limit=2.0)
    stats.add(0, torch.randn(10, 4))
    stats.add(1, torch.randn(10, 4))
    path = tmp_path / "s.safetensors"
    stats.save(path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.pop("sha256")
    save_file(tensors, str(path), metadata=meta)  # written by another tool, or its metadata edited
    with pytest.raises(KnockoutError, match="is damaged"):
        Statistics.load(path)
    save_file({"seed0": torch.arange(4)}, str(tmp_path / "selection.safetensors"), metadata={"mode": "per-layer"})
    with pytest.raises(KnockoutError, match="is damaged"):
        load_selection(tmp_path)


# -- 6, 7: Ctrl-C and SIGKILL in a real sweep process ----------------------------------------------------------------
# Runs the CLI with runfolder.write_atomic wrapped: at its Nth call it sends the process SIGINT or SIGKILL, before
# writing ("before"), after writing half the bytes of the temporary file ("half") or after the rename ("after").
# Call order in a sweep: config.json, stats.safetensors, selection.safetensors, then results.jsonl and results.csv
# per row. KILL_IN_STATS=N kills at the Nth batch added to the statistics instead.
WRAPPER = r"""
import os, signal, sys
from pathlib import Path
import knockout.runfolder as rf, knockout.stats.statistics as st, knockout.stats.running as rn
# A process started in the background by a non-interactive shell (as CI may start the tests) inherits SIGINT as
# ignored, and Python then installs no KeyboardInterrupt handler: restore what an interactive terminal gives.
signal.signal(signal.SIGINT, signal.default_int_handler)
sig = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))
where, n = os.environ.get("KILL_AT", "none:0").split(":")
real, calls = rf.write_atomic, [0]
def write_atomic(path, data):
    calls[0] += 1
    if calls[0] == int(n):
        if where == "half":
            tmp = Path(path).with_name(f".{Path(path).name}.tmp")
            raw = data.encode() if isinstance(data, str) else data
            tmp.write_bytes(raw[: len(raw) // 2])
        if where in ("half", "before"):
            os.kill(os.getpid(), sig)
        real(path, data)
        os.kill(os.getpid(), sig)
    real(path, data)
rf.write_atomic = st.write_atomic = write_atomic
stats_n, adds, real_add = int(os.environ.get("KILL_IN_STATS", "0")), [0], rn.LayerStats.add
def add(self, x):
    adds[0] += 1
    if adds[0] == stats_n:
        os.kill(os.getpid(), sig)
    return real_add(self, x)
rn.LayerStats.add = add
from knockout.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_cli(args, **env):
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], env=environ, capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted run (in this process) to compare interrupted ones with."""
    root, model, corpus = setup
    out = root / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")
        assert main(tiny.sweep_args(model, corpus, out)) == 0
    return out


def test_ctrl_c_prints_one_line_and_resume_is_exact(setup, reference, tmp_path):
    _, model, corpus = setup
    out = tmp_path / "run"
    proc = _run_cli(tiny.sweep_args(model, corpus, out), KILL_AT="after:7", KILL_SIGNAL="SIGINT")  # a few rows in
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    done = re.fullmatch(r"knockout: interrupted; re-run the same command to resume \((\d+) of 14 rows done\)", last)
    assert done, last
    n_rows = len((out / "results.jsonl").read_text().splitlines())
    assert int(done.group(1)) == n_rows and 0 < n_rows < 14  # the count is what the folder holds
    assert main(tiny.sweep_args(model, corpus, out)) == 0
    assert _values(out) == _values(reference)


KILL_POINTS = {
    "while writing a row": {"KILL_AT": "half:6"},
    "during statistics collection": {"KILL_IN_STATS": "3"},
    "while writing the statistics file": {"KILL_AT": "half:2"},
    "between rows": {"KILL_AT": "after:9"},
    "between results.jsonl and results.csv": {"KILL_AT": "after:12"},
}
FAST = ("while writing a row",)


@pytest.mark.parametrize("point", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in KILL_POINTS])
def test_sigkill_then_same_command_gives_the_uninterrupted_results(setup, reference, tmp_path, point):
    _, model, corpus = setup
    out = tmp_path / "run"
    proc = _run_cli(tiny.sweep_args(model, corpus, out), **KILL_POINTS[point])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert main(tiny.sweep_args(model, corpus, out)) == 0
    assert _values(out) == _values(reference)
    assert _csv_values(out) == _csv_values(reference)
    assert Statistics.load(out / "stats.safetensors").n_tokens == 200
    assert load_selection(out).keys() == load_selection(reference).keys()


# -- 9: determinism ---------------------------------------------------------------------------------------------------
def test_same_config_and_seed_give_identical_numbers(setup, reference, tmp_path):
    _, model, corpus = setup
    out = tmp_path / "again"
    assert main(tiny.sweep_args(model, corpus, out)) == 0
    assert _values(out) == _values(reference)  # exact equality, CE and top-1
    a, b = load_file(str(out / "stats.safetensors")), load_file(str(reference / "stats.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_same_config_and_seed_give_identical_numbers_on_smollm2(tmp_path):
    args = [
        "-q", "sweep", "--model", "smollm2-135m", "--data", "wiki", "--methods", "zero,peak", "--fractions", "0,0.5",
        "--seeds", "0", "--eval-tokens", "64", "--stats-tokens", "256", "--max-length", "64",
    ]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert _values(tmp_path / "a") == _values(tmp_path / "b")


def test_results_csv_is_rewritten_when_a_crash_left_it_behind(tmp_path):
    store = ResultStore(tmp_path)
    base = ResultRow.measured("baseline", 0.0, 0, 0.5, 2.0, 10, 0, 64, 0.1)
    store.add(base)
    stale = (tmp_path / "results.csv").read_text()
    store.add(ResultRow.measured("zero", 1.0, 0, 0.25, 3.0, 10, 64, 64, 0.1, base))
    (tmp_path / "results.csv").write_text(stale)  # killed after results.jsonl, before results.csv
    ResultStore(tmp_path)
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 3


def test_folding_a_nan_constant_names_layer_and_neuron_and_restores_weights():
    from knockout import find_sites, fold_constants

    model = tiny.causal_lm("llama")
    sites = find_sites(model)
    before = [s.weight().clone() for s in sites]
    values = [torch.zeros(s.width) for s in sites]
    values[1][7] = float("inf")
    neurons = [torch.arange(s.width) for s in sites]
    with pytest.raises(KnockoutError, match="layer 1 neuron 7: the ablation value inf is not finite"):
        with fold_constants(sites, neurons, values):
            pass
    assert all(torch.equal(b, s.weight()) for b, s in zip(before, sites))


def test_reports_do_not_leak_numpy_warnings(tmp_path, capsys, monkeypatch):
    import warnings

    import numpy as np

    def noisy_report(run_dir, *a, **k):
        np.array([1e308]) * 10  # overflow
        np.log(np.zeros(1))  # divide by zero
        np.mean(np.array([]))  # mean of an empty slice
        return Path(run_dir) / "report" / "report.html"

    monkeypatch.setattr("knockout.reporting.write_report", noisy_report)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["report", str(tmp_path)]) == 0
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert capsys.readouterr().err == ""
    np.testing.assert_equal(np.geterr()["over"], "warn")  # numpy's settings are restored


def test_binary_without_nul_bytes_is_refused(tmp_path):
    from knockout.data.text import load_texts

    path = tmp_path / "noise.txt"
    path.write_bytes(bytes([0xFF, 0xFE, 0x80, 0x01, 0x02, 0x03, 0x1B, 0x7F]) * 50)
    with pytest.raises(KnockoutError, match="looks binary"):
        list(load_texts(str(path), "eval"))


@pytest.mark.slow
def test_ctrl_c_during_statistics_prints_one_line(setup, tmp_path):
    _, model, corpus = setup
    out = tmp_path / "run"
    proc = _run_cli(tiny.sweep_args(model, corpus, out), KILL_IN_STATS="2", KILL_SIGNAL="SIGINT")
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "knockout: interrupted; re-run the same command to resume (0 rows done)"
    )
    assert not (out / "stats.safetensors").exists()
