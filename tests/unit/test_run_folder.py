"""The one reader of a run folder: typed settings as recorded (never today's defaults), checked per-document sums
(one policy: sums that do not add up to their row make it unusable, and are named), checked artifacts."""

import dataclasses
import inspect
import json

import numpy as np
import pytest

from knockout.config import Resolved, SweepConfig
from knockout.errors import KnockoutError
from knockout.files import save_checked
from knockout.inference.sequential import DecideOptions
from knockout.reporting.answer import run_answer
from knockout.reporting.report import identity
from knockout.runfolder import ResultRow, RunFolder, row_key, save_doc_sums, write_rows


def _with_default(monkeypatch, cls, name: str, value) -> None:
    """Give ``cls``'s setting ``name`` another default, as a later version of knockout might."""
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    defaults = list(cls.__init__.__defaults__)
    defaults[params.index(name) - (len(params) - len(defaults))] = value
    monkeypatch.setattr(cls.__init__, "__defaults__", tuple(defaults))


def _rows(methods=("zero", "peak"), seeds=(0, 1, 2), n_docs=6):
    """Rows at fraction 0.5 with per-document sums that add up to them (CE differs by method and document)."""
    rng = np.random.default_rng(0)
    out, total = [], 4 * n_docs
    for seed in seeds:
        n = np.full(n_docs, 4)
        base = {"n": n, "ce_sum": rng.uniform(4, 8, n_docs), "correct": rng.integers(0, 4, n_docs)}
        top1, mean_ce = base["correct"].sum() / total, base["ce_sum"].sum() / total
        out.append((ResultRow.measured("baseline", 0.0, seed, top1, mean_ce, total, 0, 64, 0.0), base))
        for i, m in enumerate(methods):
            ce = base["ce_sum"] + (i + 1) * rng.uniform(0.5, 1.0, n_docs)
            sums = {"n": n, "ce_sum": ce, "correct": np.minimum(base["correct"], 3 - i)}
            top1, mean_ce = sums["correct"].sum() / total, ce.sum() / total
            out.append((ResultRow.measured(m, 0.5, seed, top1, mean_ce, total, 32, 64, 0.0, out[-1 - i][0]), sums))
    return out


def _folder(tmp_path, settings: dict, rows=None) -> RunFolder:
    """A run folder written as a sweep writes it: config.json (settings and record), rows and their sums."""
    cfg = SweepConfig(model="tiny", **settings)
    config = {**cfg.to_dict(), "resolved": Resolved(task="causal", model_identity={"name": "tiny"}).to_dict()}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    rows = _rows() if rows is None else rows
    write_rows(tmp_path, [r for r, _ in rows])
    for row, sums in rows:
        save_doc_sums(tmp_path, row.method, row.fraction, row.seed, sums, row.target)
    return RunFolder(tmp_path)


def test_a_report_reads_the_settings_the_run_recorded_not_todays_defaults(tmp_path, monkeypatch):
    _folder(tmp_path, {"seeds": "auto", "methods": ("zero", "peak"), "fractions": (0.0, 0.5, 0.9, 1.0)})
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["decide"]["first"] == 3 and stored["stats_tokens"] == SweepConfig(model="m").stats_tokens
    _with_default(monkeypatch, DecideOptions, "first", 5)
    _with_default(monkeypatch, SweepConfig, "stats_tokens", 999)
    _with_default(monkeypatch, SweepConfig, "eps", 0.5)
    assert DecideOptions().first == 5 and SweepConfig(model="m").stats_tokens == 999  # the defaults did change
    run = RunFolder.with_results(tmp_path)
    assert run.fixed_seeds == [0, 1, 2]  # the run's own first look, not today's 5
    assert run.config.eps == stored["eps"] != 0.5
    assert identity(run)["stats tokens"] == stored["stats_tokens"]
    assert "auto: 3 for every fraction" == identity(run)["seeds"]


def test_a_setting_the_record_lacks_takes_todays_default_and_a_damaged_record_is_named(tmp_path):
    _folder(tmp_path, {})
    stored = json.loads((tmp_path / "config.json").read_text())
    del stored["eps"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert RunFolder(tmp_path).config.eps == SweepConfig(model="m").eps
    stored["fractions"] = "lots"
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(KnockoutError, match="does not hold a run's settings"):
        RunFolder(tmp_path).config  # noqa: B018
    stored["fractions"], stored["resolved"] = [0.5], {"task": ["causal"]}
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(KnockoutError, match="resolved.task must be a str"):
        RunFolder(tmp_path).resolved  # noqa: B018


def test_a_recorded_set_file_is_not_read_again(tmp_path):
    (tmp_path / "sets.json").write_text(json.dumps({"name": "a", "components": ["L0.H1"]}))
    _folder(tmp_path / "run", {"ablate": str(tmp_path / "sets.json"), "methods": ("zero",)}, rows=[])
    (tmp_path / "sets.json").unlink()  # the folder was shared; the file stayed behind
    assert RunFolder(tmp_path / "run").config.ablate == str(tmp_path / "sets.json")
    with pytest.raises(KnockoutError, match="does not exist"):
        SweepConfig(model="m", ablate=str(tmp_path / "sets.json"))  # a new run does read it


def test_sums_that_do_not_add_up_make_their_row_unusable_and_are_named(tmp_path):
    folder = _folder(tmp_path, {"methods": ("zero", "peak"), "fractions": (0.5,)})
    assert folder.unusable == {} and len(folder.doc_sums) == len(folder.rows)
    full = run_answer(folder, (0.5,), n_boot=50).fractions[0]
    assert full.n_sets == 3
    key = row_key("peak", 0.5, 1)
    good = folder.doc_sums[key]
    save_doc_sums(tmp_path, "peak", 0.5, 1, {**good, "ce_sum": good["ce_sum"] * 2})  # valid checksum, wrong sums
    folder = RunFolder(tmp_path)
    assert key not in folder.doc_sums and folder.unusable[key].startswith("their CE is")
    assert "peak at 0.5 (seed 1): their CE is" in folder.unusable_note()
    fa = run_answer(folder, (0.5,), n_boot=50).fractions[0]
    assert fa.n_sets == 1  # seed 1 lacks peak's sums: only the consecutive sets before it
    assert any("do not belong to them" in n for n in fa.notes)


def test_artifacts_are_read_checked(tmp_path):
    import torch

    folder = _folder(tmp_path, {"methods": ("zero",)}, rows=[])
    path = tmp_path / "artifacts" / "optimal" / "seed0-x.safetensors"
    save_checked(path, {"layer0": torch.ones(4)}, {"seed": "0", "n_ablated": "2"})
    assert folder.artifact_metadata("optimal") == [{"seed": "0", "n_ablated": "2", "sha256": folder.artifact_metadata(
        "optimal")[0]["sha256"]}]  # fmt: skip
    from safetensors.torch import save_file

    save_file({"layer0": torch.ones(4) + 1000}, str(path), metadata=folder.artifact_metadata("optimal")[0])
    with pytest.raises(KnockoutError, match="checksum does not match"):
        folder.artifact_metadata("optimal")
    with pytest.raises(KnockoutError, match="checksum does not match"):
        folder.artifact(path)


def test_resolved_record_round_trips():
    record = Resolved(task="causal", model_identity={"name": "m", "widths": [8]}, site_modules=["a"])
    assert Resolved.from_dict(record.to_dict()) == record
    assert "targets" not in record.to_dict() and dataclasses.replace(record, targets={}).to_dict()["targets"] == {}
    assert Resolved.from_dict({"unknown": 1, "task": "causal"}).task == "causal"


def test_one_neuron_set_speaks_of_that_set_and_decides_nothing_in_general(tmp_path):
    from knockout.reporting.answer import sentence

    rows = [r for r in _rows(n_docs=40) if r[0].seed == 0]  # peak far above zero on every document
    folder = _folder(tmp_path, {"methods": ("zero", "peak"), "fractions": (0.5,), "seeds": (0,)}, rows)
    (fa,) = run_answer(folder, (0.5, 0.9), n_boot=50).fractions  # no line for 0.9, which the run lacks
    assert fa.stop == "few sets" and fa.best("ce") is None and not any(v.decided for v in fa.ce)
    text = sentence(fa)
    assert "for this neuron set (1 set x 40 documents), zero hurts least" in text
    assert "Nothing is decided about neuron sets in general" in text
