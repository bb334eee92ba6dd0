"""Run-folder integrity (issue 21): one writer per run folder, the model's fingerprint, checksummed artifacts and
paired sums that must add up to their rows, full disks, what a --stats file was collected on, and smaller defects."""

import errno
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import knockout
import tiny
from knockout import Statistics, files, runfolder
from knockout.cli import main
from knockout.errors import KnockoutError
from knockout.runfolder import RunFolder

SRC = Path(knockout.__file__).resolve().parents[1]  # subprocesses import the knockout under test


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    return tmp_path_factory.mktemp("integrity"), *tiny_llama


def _values(out):
    """The rows of a run folder without their timings, keyed by (method, fraction, seed)."""
    return {
        (r["method"], r["fraction"], r["seed"]): {f: v for f, v in r.items() if f != "seconds"}
        for r in RunFolder(out).row_dicts()
    }


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _no_report(monkeypatch):
    """Sweeps here skip writing the report (figures take most of a tiny sweep's time; tested elsewhere)."""
    monkeypatch.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")


@pytest.fixture(scope="module")
def reference(setup):
    root, model, corpus = setup
    out = root / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")
        assert main(tiny.sweep_args(model, corpus, out)) == 0
    return out


# -- 1: one writer per run folder -------------------------------------------------------------------------------------
# The CLI in a subprocess; at its PAUSE_AT-th call of write_atomic it creates the file PAUSED and waits for GO.
WRAPPER = r"""
import os, sys, time
from pathlib import Path
import knockout.runfolder as rf, knockout.stats.statistics as st
real, calls, n = rf.write_atomic, [0], int(os.environ["PAUSE_AT"])
def write_atomic(path, data):
    calls[0] += 1
    if calls[0] == n:
        Path(os.environ["PAUSED"]).write_text(str(os.getpid()))
        deadline = time.time() + 120
        while not Path(os.environ["GO"]).exists() and time.time() < deadline:
            time.sleep(0.05)
    real(path, data)
rf.write_atomic = st.write_atomic = write_atomic
from knockout.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def _start_paused(args, tmp_path, at: int) -> tuple[subprocess.Popen, Path]:
    """A sweep process paused inside its ``at``-th file write (holding the run folder's lock); returns it and the
    file to create to let it go on."""
    paused, go = tmp_path / "paused", tmp_path / "go"
    env = {**_env(), "PAUSE_AT": str(at), "PAUSED": str(paused), "GO": str(go)}
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 180
    while not paused.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the sweep never reached its pause"
        time.sleep(0.05)
    return proc, go


def _cli(args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knockout", *args], env=_env(), capture_output=True, text=True)


def test_a_second_writer_is_refused_and_a_folder_moved_away_is_not_written_again(
    setup, reference, tmp_path, capsys, monkeypatch
):
    from knockout.reporting.report import write_report

    _, model, corpus = setup
    out = tmp_path / "run"
    args = tiny.sweep_args(model, corpus, out)
    first, go = _start_paused(args, tmp_path, at=8)  # a few rows in, holding the folder's lock
    try:
        lock = out / runfolder.LOCK_FILE
        assert lock.read_text().strip() == str(first.pid)
        before = _files(out)
        second = _cli(args)  # a second process on the same folder
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("knockout: error: ")
        assert f"PID {first.pid}" in lines[0] and "one writer at a time" in lines[0]
        for extra in (["--restart"], ["--seeds", "0,1,2"]):  # a restart, a resume with more seeds (this process)
            assert main([*args, *extra]) == 2
            assert f"PID {first.pid}" in capsys.readouterr().err
        assert _files(out) == before  # nothing written, nothing moved aside
        assert not list(tmp_path.glob("run.old-*"))
        # readers never take the lock: a report of the folder being written works meanwhile
        monkeypatch.setattr("knockout.reporting.write_report", write_report)
        assert main(["report", str(out), "--out", str(tmp_path / "elsewhere")]) == 0
        assert _files(out) == before
        # the folder is moved away (by hand) while the first writer runs: it stops and writes nothing more
        moved = tmp_path / "moved"
        os.rename(out, moved)
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 2, stderr
    assert "was moved away or replaced while this process was writing it" in stderr.strip().splitlines()[-1]
    assert _files(moved) == before  # the write it was in and everything after went nowhere
    assert not out.exists()
    monkeypatch.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")
    args[args.index("--out") + 1] = str(moved)  # resumed where it is now (its stale lock file is no obstacle)
    assert main(args) == 0
    assert _values(moved) == _values(reference)
    assert not (moved / runfolder.LOCK_FILE).exists() and not list(moved.rglob(".*.tmp"))


def test_restart_moves_the_folder_with_its_lock_and_takes_a_fresh_one(tmp_path):
    out = tmp_path / "run"
    runfolder.write_atomic(out / "results.jsonl", "")
    lock = runfolder.lock_run(out)
    try:
        moved = runfolder.move_aside(out)
        assert moved is not None and moved.name.startswith("run.old-")
        assert not (moved / runfolder.LOCK_FILE).exists()  # the old lock was released (and its file removed)
        new = runfolder.lock_run(out)  # re-entrant: this process holds the new folder's lock
        assert (
            new is not lock and new.still_held() and (out / runfolder.LOCK_FILE).read_text().strip() == str(os.getpid())
        )
        runfolder.write_atomic(out / "x", "ok")
    finally:
        runfolder.unlock_run(out)
    assert (out / "x").read_text() == "ok" and not (out / runfolder.LOCK_FILE).exists()


def test_temporary_files_have_unique_names(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(runfolder.os, "replace", lambda a, b: (seen.append(Path(a).name), real(a, b)))
    for _ in range(3):
        runfolder.write_atomic(tmp_path / "f.txt", "x")
    assert len(set(seen)) == 3
    assert all(n.startswith(f".f.txt.{os.getpid()}.") and n.endswith(".tmp") for n in seen)


# -- 2: the model's fingerprint ---------------------------------------------------------------------------------------
def _other_weights(folder: Path) -> None:
    """Overwrite a model folder with a model of the same architecture and other weights."""
    model = tiny.causal_lm("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(folder)


def test_a_resume_on_changed_weights_is_refused(setup, tmp_path, capsys):
    _, model, corpus = setup
    folder = tmp_path / "m"
    tiny.save(tiny.causal_lm("llama"), "causal", folder)
    out = tmp_path / "run"
    args = tiny.sweep_args(folder, corpus, out, "--seeds", "0")
    assert main(args) == 0
    recorded = json.loads((out / "config.json").read_text())["resolved"]["model_identity"]["fingerprint"]
    assert recorded["of"] == "files" and sorted(recorded["files"]) == ["config.json", "model.safetensors"]
    before = _files(out)
    _other_weights(folder)
    assert main([*args, "--seeds", "0,1"]) == 2
    err = capsys.readouterr().err
    assert "weights differ" in err and "--restart" in err and len(err.strip().splitlines()) == 1
    assert _files(out) == before


def test_fingerprints_of_files_tensors_and_the_hub_cache(tmp_path, monkeypatch):
    from knockout import fingerprint as fp

    a = tiny.save(tiny.causal_lm("llama"), "causal", tmp_path / "a")
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (copy / name).write_bytes((Path(a) / name).read_bytes())
    assert fp.source_fingerprint(a) == fp.source_fingerprint(str(copy)) == fp.source_fingerprint(str(Path(a)))
    # the tokenizer is not part of the weights; config and weights are
    (copy / "tokenizer.json").write_text("{}")
    assert fp.source_fingerprint(str(copy)) == fp.source_fingerprint(a)
    # a tensor changed in memory changes the tensors' fingerprint
    model = tiny.causal_lm("llama")
    first = fp.tensors_fingerprint(model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    assert fp.tensors_fingerprint(model)["sha256"] != first["sha256"]
    # a link into a hub cache's blobs/ is its blob's name (the sha256 git LFS gives it): not read
    import hashlib

    data = (Path(a) / "model.safetensors").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / digest).write_bytes(data)
    (snap / "model.safetensors").symlink_to(blobs / digest)
    (snap / "config.json").write_bytes((Path(a) / "config.json").read_bytes())
    # a hub name whose snapshot is in the local cache: the same fingerprint as the copied folder, with the commit
    cached = {("org/tiny", "config.json"): str(snap / "config.json")}
    monkeypatch.setattr(
        "huggingface_hub.try_to_load_from_cache", lambda repo, name, revision=None: cached.get((repo, name))
    )
    hub = fp.source_fingerprint("org/tiny")
    assert hub.pop("revision") == "abc123" and hub == fp.source_fingerprint(a)
    assert fp.source_fingerprint("org/not-cached") is None  # known only after loading
    with monkeypatch.context() as mp:
        mp.setattr("builtins.open", None)  # nothing may be read
        assert fp.file_sha256(snap / "model.safetensors") == digest


def test_large_files_have_their_sha256_cached_by_path_size_and_time(tmp_path, monkeypatch):
    from knockout import files as fp

    monkeypatch.setattr(fp, "CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(fp, "SHA256_CACHE", tmp_path / "cache")
    monkeypatch.setattr(fp, "_MEMO", {})  # this process's memory of hashes: each step below is a new process
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"weights")
    import hashlib

    assert fp.file_sha256(f) == hashlib.sha256(b"weights").hexdigest()
    (cached,) = (tmp_path / "cache").iterdir()
    cached.write_text("0" * 64)  # the cache is what is used while the file is unchanged
    fp._MEMO.clear()
    assert fp.file_sha256(f) == "0" * 64
    f.write_bytes(b"other!!")  # same size, new modification time: hashed again
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    fp._MEMO.clear()
    assert fp.file_sha256(f) == hashlib.sha256(b"other!!").hexdigest()


# -- 3: artifacts (optimal's learned constants) -----------------------------------------------------------------------
def test_damaged_artifacts_are_named_and_relearned_after_deleting(setup, tmp_path, capsys):
    _, model, corpus = setup
    out = tmp_path / "run"
    args = tiny.sweep_args(model, corpus, out, "--methods", "optimal", "--fractions", "0,0.5", "--seeds", "0",
                 "--optimal-steps", "2", "--optimal-tokens", "40", "--optimal-held-out-tokens", "20")  # fmt: skip
    assert main(args) == 0
    (artifact,) = (out / "artifacts").rglob("*.safetensors")
    good, rows = artifact.read_bytes(), _values(out)
    tensors, meta = files.read_safetensors(artifact, "")
    edited = {k: v + 0.1 for k, v in tensors.items()}
    for damage in (lambda: save_file(edited, str(artifact), metadata=meta), lambda: artifact.write_bytes(good[:40])):
        damage()
        before = _files(out)
        assert main([*args, "--seeds", "0,1"]) == 2
        err = capsys.readouterr().err
        assert str(artifact) in err and "delete" in err and len(err.strip().splitlines()) == 1
        assert _files(out) == before
    artifact.unlink()
    assert main([*args, "--seeds", "0,1"]) == 0
    assert {k: v for k, v in _values(out).items() if k[2] == 0} == rows
    assert len(list((out / "artifacts").rglob("*.safetensors"))) == 1  # seed 1's; seed 0's row needs none now
    # a row that needs the deleted constants learns them again, the same
    store = runfolder.ResultStore(out)
    del store.rows[runfolder.row_key("optimal", 0.5, 0)]
    runfolder.write_rows(out, store.rows.values())
    assert main([*args, "--seeds", "0,1"]) == 0
    relearned, new_meta = files.read_safetensors(artifact, "")
    assert new_meta == meta and relearned.keys() == tensors.keys()
    assert all(torch.equal(relearned[k], tensors[k]) for k in tensors)
    assert _values(out) == {**_values(out), **rows}


# -- 4: paired sums: checksummed, and adding up to their rows ---------------------------------------------------------
def test_damaged_paired_file_is_named_then_recomputed_after_deleting(setup, reference, tmp_path, capsys, monkeypatch):
    from knockout.reporting.report import write_report

    _, model, corpus = setup
    out = tmp_path / "run"
    args = tiny.sweep_args(model, corpus, out)
    assert main(args) == 0
    path = out / "paired" / "seed1.safetensors"
    tensors, meta = files.read_safetensors(path, "")
    key = next(k for k in tensors if k.startswith("peak@0.5") and k.endswith("ce_sum"))
    tensors[key] = tensors[key] * 0.5  # edited values (same shapes), the checksum left as it was
    save_file(tensors, str(path), metadata=meta)
    before = _files(out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "delete" in err and "recomputes" in err
    assert _files(out) == before
    monkeypatch.setattr("knockout.reporting.write_report", write_report)
    assert main(["report", str(out), "--out", str(tmp_path / "r")]) == 2  # the report refuses it too
    capsys.readouterr()
    path.unlink()
    assert main(args) == 0  # recomputes the sums of seed 1's rows
    assert _values(out) == _values(reference)
    got, want = RunFolder(out).stored_sums, RunFolder(reference).stored_sums
    assert got.keys() == want.keys() and {k[2] for k in got} == {0, 1}
    assert all((got[k][f] == want[k][f]).all() for k in want for f in runfolder.DOC_FIELDS)


def test_paired_sums_that_do_not_add_up_to_their_row_are_rerun_and_left_out_until_then(setup, reference, tmp_path):
    from knockout.reporting.answer import run_answer

    _, model, corpus = setup
    out = tmp_path / "run"
    args = tiny.sweep_args(model, corpus, out)
    assert main(args) == 0
    sums = RunFolder(out).stored_sums
    key = runfolder.row_key("zero", 0.5, 1)
    forged = {**sums[key], "ce_sum": sums[key]["ce_sum"] * 1.5}
    runfolder.save_doc_sums(out, "zero", 0.5, 1, forged)  # a valid checksum, but not this row's sums
    assert runfolder.doc_sums_disagree(RunFolder(out).row_dicts()[0], None) == "no per-document sums"
    answer = run_answer(out, (0.5,), n_boot=50)
    (fa,) = answer.fractions
    assert fa.n_sets == 1
    assert any("seed 1 lacks the per-document sums of zero" in n and "re-run the same sweep command" in n
               for n in fa.notes)  # fmt: skip
    assert main(args) == 0  # the row is run again, its sums rewritten
    got = RunFolder(out).stored_sums
    assert (got[key]["ce_sum"] == RunFolder(reference).stored_sums[key]["ce_sum"]).all()
    assert run_answer(out, (0.5,), n_boot=50).fractions[0].n_sets == 2


# -- 5: a full disk ---------------------------------------------------------------------------------------------------
def _full_disk(monkeypatch, folder: Path, after: int = 0) -> list[int]:
    """Make ``os.write`` to files under ``folder`` fail with ENOSPC after ``after`` successful ones."""
    real, calls = os.write, [0]

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(str(folder)):
            calls[0] += 1
            if calls[0] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return calls


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is written")
@pytest.mark.parametrize("after", [1, 9])  # the first file (config.json), or among the rows
def test_a_full_disk_ends_in_one_line_leaves_no_temporary_file_and_resumes(setup, reference, tmp_path, capsys,
                                                                           monkeypatch, after):  # fmt: skip
    _, model, corpus = setup
    out = tmp_path / "run"
    args = tiny.sweep_args(model, corpus, out)
    with monkeypatch.context() as mp:
        _full_disk(mp, out.resolve(), after)
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("knockout: error: no space left on the device while writing")
    assert not list(out.rglob("*.tmp")) and not (out / runfolder.LOCK_FILE).exists()
    assert main(args) == 0  # space freed: the same command resumes
    assert _values(out) == _values(reference)


def test_a_full_disk_while_writing_the_report_is_one_line(setup, reference, tmp_path, capsys, monkeypatch):
    from knockout.reporting.report import write_report

    monkeypatch.setattr("knockout.reporting.write_report", write_report)
    _full_disk(monkeypatch, (tmp_path / "r").resolve())
    assert main(["report", str(reference), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device" in err[0]
    assert not list((tmp_path / "r").rglob("*.tmp"))


# -- 7: --stats: what the file was collected on -----------------------------------------------------------------------
def test_stats_file_of_other_data_or_settings_is_refused_unless_asked(setup, tmp_path, capsys):
    _, model, corpus = setup
    other = tiny.write_corpus(tmp_path / "other.txt", n_docs=50)
    cases = {
        "data": tiny.stats_cmd(model, other, 200, tmp_path / "data.safetensors"),
        "max_length: 30 -> 40": [*tiny.stats_cmd(model, corpus, 200, tmp_path / "l.safetensors"), "--max-length", "30"],
        "stats_tokens: 100 -> 200": tiny.stats_cmd(model, corpus, 100, tmp_path / "tok.safetensors"),
    }  # fmt: skip
    for what, cmd in cases.items():
        assert main(cmd) == 0
        stats = cmd[cmd.index("--out") + 1]
        out = tmp_path / f"run-{len(what)}"
        args = tiny.sweep_args(model, corpus, out, "--seeds", "0", "--fractions", "0,1", "--stats", stats)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert what in err and "--stats-any-data" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
        assert main([*args, "--stats-any-data"]) == 0
        recorded = json.loads((out / "config.json").read_text())["resolved"]["statistics"]
        assert recorded["file"] == stats
        meta = Statistics.load(stats).meta
        assert recorded["data"] == meta["data"] and str(recorded["max_length"]) == meta["max_length"]
        assert str(recorded["stats_tokens"]) == meta["stats_tokens"] and recorded["n_tokens"] == int(
            meta["stats_tokens"]
        )


def test_stats_file_is_matched_by_fingerprint_not_by_path(setup, tmp_path, capsys):
    _, model, corpus = setup
    stats = tmp_path / "s.safetensors"
    assert main(tiny.stats_cmd(model, corpus, 200, stats)) == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in Path(model).iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    for given in (str(Path(model).resolve()), str(copy)):  # an absolute path, a copied folder
        out = tmp_path / f"run-{len(given)}"
        assert (
            main(tiny.sweep_args(given, corpus, out, "--seeds", "0", "--fractions", "0,1", "--stats", str(stats))) == 0
        )
    _other_weights(copy)  # same architecture, other weights: refused
    assert main(tiny.sweep_args(str(copy), corpus, tmp_path / "other", "--seeds", "0", "--stats", str(stats))) == 2
    assert "other weights" in capsys.readouterr().err


# -- 8: smaller ones --------------------------------------------------------------------------------------------------
def test_restart_with_a_bad_model_path_moves_nothing(setup, tmp_path, capsys):
    _, model, corpus = setup
    out = tmp_path / "run"
    assert main(tiny.sweep_args(model, corpus, out, "--seeds", "0", "--fractions", "0,1", "--methods", "zero")) == 0
    before = _files(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (str(tmp_path / "missing"), str(empty)):
        assert main(tiny.sweep_args(bad, corpus, out, "--seeds", "0", "--fractions", "0,1", "--restart")) == 2
        assert "knockout: error:" in capsys.readouterr().err
        assert _files(out) == before and not list(tmp_path.glob("run.old-*"))


def test_compare_never_writes_into_a_run_folder(reference, tmp_path, capsys):
    from knockout.reporting.report import write_report

    report = Path(write_report(reference)).parent
    before = _files(report)
    for out in (report, reference, reference / "anything"):
        assert main(["compare", str(reference), str(reference), "--out", str(out)]) == 2
        assert "never writes into a run folder" in capsys.readouterr().err
    assert _files(report) == before


def test_partial_banner_counts_expected_rows_only(tmp_path):
    from knockout.runfolder import ResultRow, RunFolder

    config = {"model": "m", "methods": ["zero"], "fractions": [0.5], "seeds": [0, 1]}  # expects 4 rows
    made = [("baseline", 0.0, 0), ("zero", 0.5, 0), ("peak", 0.5, 0), ("peak", 0.5, 1)]  # peak: no longer asked for
    (tmp_path / "config.json").write_text(json.dumps(config))
    runfolder.write_rows(tmp_path, [ResultRow.measured(m, f, s, 0.5, 2.0, 10, 0, 8, 0.1) for m, f, s in made])
    note = RunFolder.with_results(tmp_path).partial_note()
    assert note.startswith("PARTIAL RUN: 2 of 4 expected rows are present (2 missing:")


def test_a_method_named_twice_in_method_fractions_is_refused(setup, tmp_path, capsys):
    _, model, corpus = setup
    with pytest.raises(SystemExit) as e:
        main(tiny.sweep_args(model, corpus, tmp_path / "run", "--methods", "optimal", "--method-fractions",
                   "optimal=0.5;optimal=1"))  # fmt: skip
    assert e.value.code == 2
    assert "'optimal' is named twice" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_temporary_offload_folder_is_removed_with_the_model(setup, tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    import tempfile

    from knockout.loading import load_model

    _, model, _ = setup
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip
    loaded = load_model(model, device="cpu", device_map=json.dumps(device_map))
    assert len(list(tmp_path.glob("knockout-offload-*"))) == 1
    del loaded
    gc.collect()
    assert not list(tmp_path.glob("knockout-offload-*"))


CUSTOM_CONFIG = """
from pathlib import Path
from transformers import LlamaConfig
Path({marker!r}).touch()  # shows that this code ran

class CustomConfig(LlamaConfig):
    model_type = "custom-llama"
"""


def _custom_code_model(tmp_path, model) -> Path:
    folder = tmp_path / "custom"
    folder.mkdir()
    for p in Path(model).iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(CUSTOM_CONFIG.format(marker=str(tmp_path / "marker")))
    return folder


def test_code_shipped_with_a_model_runs_only_with_trust_remote_code(setup, tmp_path, monkeypatch):
    from knockout.loading import load_model

    _, model, _ = setup
    folder = _custom_code_model(tmp_path, model)
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")  # a user answering transformers' prompt
    with pytest.raises(KnockoutError) as e:
        load_model(str(folder), device="cpu")
    assert "--trust-remote-code" in str(e.value)
    assert not asked and not (tmp_path / "marker").exists()


@pytest.mark.slow
def test_code_shipped_with_a_model_runs_with_trust_remote_code(setup, tmp_path):
    _, model, _ = setup
    folder = _custom_code_model(tmp_path, model)
    # in a subprocess: the folder's code is copied into HF_MODULES_CACHE
    env = {**_env(), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    cmd = ["sites", "--model", str(folder), "--trust-remote-code"]
    proc = subprocess.run([sys.executable, "-m", "knockout", *cmd], env=env, capture_output=True, text=True)
    assert (tmp_path / "marker").exists(), proc.stderr


def test_a_local_folder_that_fails_to_load_gets_no_hub_hint(setup, tmp_path):
    from knockout.loading import load_model

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(KnockoutError) as e:
        load_model(str(folder), device="cpu")
    assert "HF_HUB_OFFLINE" not in str(e.value) and "local cache" not in str(e.value)
    with pytest.raises(KnockoutError) as e:  # a hub name keeps the hint
        load_model("nobody/no-such-model", device="cpu")
    assert "HF_HUB_OFFLINE" in str(e.value)


HOSTILE = '<img src=x onerror="alert(1)">[a](b)$x^{2}~_#%&\\|*'


def test_markdown_and_latex_reports_escape_names(tmp_path):
    from knockout.reporting.escape import latex
    from knockout.reporting.report import compare_runs, write_report
    from knockout.runfolder import ResultRow, ResultStore, write_config

    run = tmp_path / "run"
    store = ResultStore(run)
    base = ResultRow.measured("baseline", 0.0, 0, 0.5, 2.0, 10, 0, 8, 0.1)
    store.add(base)
    store.add(ResultRow.measured(HOSTILE, 0.5, 0, 0.25, 3.0, 10, 4, 8, 0.1, base))
    write_config(run, {"model": HOSTILE, "methods": [HOSTILE], "fractions": [0.5], "seeds": [0, 1], "data": HOSTILE})
    report = Path(write_report(run, tmp_path / "report", fractions=(0.5,))).parent
    compare = Path(compare_runs([run], tmp_path / "compare", fractions=(0.5,))).parent
    for md in (report / "report.md", report / "table2.md", compare / "compare.md", compare / "table2.md"):
        text = md.read_text()
        assert "<img" not in text and "&lt;img src=x onerror=" in text and "[a](b)" not in text, md
    for tex in (report / "table2.tex", compare / "table2.tex"):
        text = tex.read_text()
        assert latex(HOSTILE) in text and "$x^{2}~" not in text
    assert latex("$ { } ^ ~ \\ & % # _ < > |") == (
        r"\$ \{ \} \textasciicircum{} \textasciitilde{} \textbackslash{} \& \% \# \_ \textless{} \textgreater{} "
        r"\textbar{}"
    )
