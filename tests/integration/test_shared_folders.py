"""Shared run folders are a closed world: knockout never follows a link out of a run folder when it writes, deletes
or locks, and reads every stored file through the checked reader (export and compare included)."""

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

import tiny
from knockout import files
from knockout.cli import main


@pytest.fixture(autouse=True)
def _no_report(monkeypatch):
    monkeypatch.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama):
    """A small finished sweep (zero and peak, two seeds) and its command line."""
    root = tmp_path_factory.mktemp("shared")
    model, corpus = tiny_llama
    args = tiny.sweep_args(model, corpus, root / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")
        assert main(args) == 0
    return root / "run", args


def _copy(run, tmp_path) -> tuple[Path, list[str]]:
    folder, args = run
    out = shutil.copytree(folder, tmp_path / "run")
    return out, [*args[:-1], str(out)]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(run, tmp_path, capsys):
    out, args = _copy(run, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".knockout.lock").symlink_to(victim)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("knockout: error: ") and "is a link" in err and err.count("\n") == 1
    assert victim.read_text() == "precious"


def test_a_report_folder_that_links_elsewhere_is_not_written(run, tmp_path, capsys, monkeypatch):
    from knockout.reporting.report import write_report

    monkeypatch.setattr("knockout.reporting.write_report", write_report)
    out, _ = _copy(run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "report.html").write_text("someone else's report")
    (out / "report").symlink_to(elsewhere)
    assert main(["report", str(out)]) == 2
    assert "outside the run folder" in capsys.readouterr().err
    assert _tree(elsewhere) == {"report.html": b"someone else's report"}
    assert main(["report", str(out), "--out", str(tmp_path / "mine")]) == 0  # reading it is fine
    assert (tmp_path / "mine" / "report.html").is_file()


def test_an_artifacts_link_is_refused_and_nothing_is_deleted_through_it(run, tmp_path, capsys):
    out, args = _copy(run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".keep.123.abc.tmp").write_text("not knockout's")
    (out / "artifacts").symlink_to(elsewhere, target_is_directory=True)
    before = _tree(out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds links that point outside it (artifacts)" in err and err.count("\n") == 1
    assert (elsewhere / ".keep.123.abc.tmp").read_text() == "not knockout's"
    assert _tree(out) == before and not (out / ".knockout.lock").exists()


def test_a_sweep_into_a_scans_folder_is_refused(run, tmp_path, capsys):
    out, args = _copy(run, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["scan"] = {**config["scan"], "unit": "head"}
    (out / "config.json").write_text(json.dumps(config))
    before = _tree(out)
    assert main(args) == 2
    assert "holds a scan's run; a sweep cannot resume or extend it" in capsys.readouterr().err
    assert _tree(out) == before


def _export(run_dir, method, out) -> int:
    return main(["export", str(run_dir), "--format", "safetensors", "--method", method, "--out", str(out)])


def test_export_reads_through_the_checksums_and_never_overwrites(run, tmp_path, capsys):
    out, _ = _copy(run, tmp_path)
    stats = out / "stats.safetensors"
    tensors, meta = files.read_safetensors(stats, "")
    key = "layer0.mean"
    tensors[key] = tensors[key] + 1000  # the stored checksum left as it was
    save_file(tensors, str(stats), metadata=meta)
    assert _export(out, "mean", tmp_path / "x.safetensors") == 2
    assert "checksum does not match" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    fresh, _ = _copy(run, tmp_path / "b")
    given = tmp_path / "given.safetensors"
    given.write_text("mine")
    assert _export(fresh, "peak", given) == 2
    assert "exists" in capsys.readouterr().err and given.read_text() == "mine"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("text")
    assert _export(fresh, "peak", corpus / "x.safetensors") == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "File exists" not in err
    assert _export(fresh, "peak", tmp_path / "ok.safetensors") == 0


def test_a_run_folder_reached_through_a_link_of_its_own_is_fine(run, tmp_path):
    out, args = _copy(run, tmp_path)
    (tmp_path / "alias").symlink_to(out, target_is_directory=True)

    def kept(tree):  # config.json records the --out given
        return {k: v for k, v in tree.items() if not k.startswith("report") and k != "config.json"}

    before = kept(_tree(out))
    assert main([*args[:-1], str(tmp_path / "alias")]) == 0  # resumes: nothing to run
    assert kept(_tree(out)) == before
    assert os.path.islink(tmp_path / "alias")
