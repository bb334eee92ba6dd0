"""Rows of named targets and task metrics: optional fields stay out of files that lack them (old results read as
before), summaries keep sets apart, the settings of --ablate, --stats-data and scans are checked."""

import json

import numpy as np
import pytest

from knockout import KnockoutError
from knockout.config import SweepConfig
from knockout.experiments.prepare import check
from knockout.reporting.summary import format_table, summarize
from knockout.runfolder import (
    RESULTS_CSV,
    RESULTS_FILE,
    ResultRow,
    ResultStore,
    RunFolder,
    row_key,
    save_doc_sums,
    write_rows,
)


def _row(method="zero", fraction=0.25, target="", **kw):
    base = ResultRow.measured("baseline", 0.0, 0, 0.5, 2.0, 10, 0, 64, 0.1, logit_diff=kw.get("base_ld"))
    ld = kw.get("ld")
    return ResultRow.measured(method, fraction, 0, 0.4, 2.5, 10, 16, 64, 0.1, base, target=target, logit_diff=ld)


def test_rows_without_a_logit_difference_keep_the_old_format(tmp_path):
    store = ResultStore(tmp_path)
    store.add(_row())
    line = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert "logit_diff" not in line and "delta_logit_diff" not in line
    assert (tmp_path / RESULTS_CSV).read_text().splitlines()[0].endswith(",seconds,target")
    old = {k: v for k, v in line.items()}  # a row written before the optional fields existed reads the same
    assert ResultRow.from_dict(old).logit_diff is None


def test_rows_with_a_logit_difference(tmp_path):
    store = ResultStore(tmp_path)
    row = _row(target="induction", ld=1.5, base_ld=4.0)
    assert row.delta_logit_diff == pytest.approx(-2.5)
    store.add(row)
    (line,) = RunFolder(tmp_path).row_dicts()
    assert line["logit_diff"] == 1.5 and line["delta_logit_diff"] == -2.5 and line["target"] == "induction"
    assert (tmp_path / RESULTS_CSV).read_text().splitlines()[0].endswith(",target,logit_diff,delta_logit_diff")
    with pytest.raises(KnockoutError, match="logit_diff = nan"):
        store.add(_row(target="x", ld=float("nan"), base_ld=4.0))


def test_doc_sums_keep_the_logit_difference_apart(tmp_path):
    sums = {"n": np.ones(3, np.int64), "ce_sum": np.arange(3.0), "correct": np.ones(3, np.int64), "ld_sum": -np.ones(3)}
    save_doc_sums(tmp_path, "zero", 0.25, 0, sums, target="L1.H2")
    key = row_key("zero", 0.25, 0, "L1.H2")
    assert set(RunFolder(tmp_path).stored_sums[key]) == {"n", "ce_sum", "correct", "ld_sum"}
    np.testing.assert_array_equal(RunFolder(tmp_path).stored_sums[key]["ld_sum"], -np.ones(3))


def test_summary_keeps_sets_of_the_same_size_apart():
    rows = [_row().as_dict() | {"method": "baseline", "fraction": 0.0, "target": ""}]
    rows += [_row(target="a").as_dict(), _row(target="b").as_dict() | {"ce": 3.0}]
    summary = summarize(rows)
    assert [(e["method"], e["target"]) for e in summary] == [("baseline", ""), ("zero", "a"), ("zero", "b")]
    assert [e["ce_mean"] for e in summary][1:] == [2.5, 3.0]
    table = format_table(summary)
    assert "target" in table.splitlines()[0] and " a " in table and " b " in table


def test_expected_rows_of_a_run_of_targets(tmp_path):
    config = {
        "model": "m",
        "methods": ["zero", "mean"],
        "ablate": "a=L0.H0;L1.H2",
        "seeds": [0],
        "resolved": {"targets": {"a": {"fraction": 0.25}, "L1.H2": {"fraction": 0.125}}},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    run = RunFolder(tmp_path)
    assert run.expected_keys() == {
        row_key("baseline", 0.0, 0),
        *(row_key(m, f, 0, t) for m in ("zero", "mean") for t, f in (("a", 0.25), ("L1.H2", 0.125))),
    }
    assert "zero at a (seed 0)" in run.partial_note()


def test_settings_of_targeted_runs():
    assert SweepConfig(model="m").seeds == (0, 1, 2)
    assert SweepConfig(model="m", ablate="L1.H2").seeds == (0,)
    assert SweepConfig(model="m", scan={"unit": "neurons:8"}).seeds == (0,)
    assert SweepConfig(model="m", ablate="L1.H2", seeds=(0, 1)).seeds == (0, 1)
    with pytest.raises(KnockoutError, match="cannot read component 'L1H2'"):
        SweepConfig(model="m", ablate="L1H2")
    with pytest.raises(KnockoutError, match="--ablate is for sweeps"):
        SweepConfig(model="m", ablate="L1", scan={"unit": "head"})
    with pytest.raises(KnockoutError, match="--method-fractions chooses fractions"):
        SweepConfig(model="m", ablate="L1", methods=("zero",), method_fractions={"zero": [0.5]}, fractions=(0.5,))
    with pytest.raises(KnockoutError, match=r"scan.top_k \(--top-k\) must be an integer >= 1"):
        SweepConfig(model="m", scan={"unit": "head", "top_k": 0})
    with pytest.raises(KnockoutError, match="unknown scan unit"):
        SweepConfig(model="m", scan={"unit": "heads"})
    # none of them changes stored rows (rows are keyed by target), so none is compared on resume
    fields = SweepConfig(model="m", ablate="L1").result_fields()
    assert "ablate" not in fields and "scan" not in fields and fields["stats_data"] is None


def test_stats_data_is_part_of_the_data_identity(tmp_path):
    (tmp_path / "a.txt").write_text("one doc\n\nanother doc\n")
    (tmp_path / "b.txt").write_text("third\n\nfourth\n")
    plain, _ = check(SweepConfig(model="m", data=str(tmp_path / "a.txt"), out=str(tmp_path / "r1")))
    other, _ = check(
        SweepConfig(
            model="m", data=str(tmp_path / "a.txt"), stats_data=str(tmp_path / "b.txt"), out=str(tmp_path / "r2")
        )
    )
    assert "stats" not in plain and other["stats"]["source"] == str(tmp_path / "b.txt")
    assert {k: v for k, v in other.items() if k != "stats"} == plain
    with pytest.raises(KnockoutError, match="does not exist"):
        check(SweepConfig(model="m", data=str(tmp_path / "a.txt"), stats_data=str(tmp_path / "c.txt")))


def test_scan_defaults_depend_on_the_data():
    from knockout.experiments.scan import scan_config

    text = scan_config(model="m")
    assert (text.eval_tokens, text.max_length, text.methods, text.scan.unit) == (
        128,
        32,
        ("zero", "mean", "peak"),
        "head",
    )
    task = scan_config(model="m", data="ioi")
    assert (task.eval_tokens, task.max_length) == (8, 128)
    given = scan_config(model="m", eval_tokens=500, scan={"unit": "layer"})
    assert (given.eval_tokens, given.max_length, given.scan.unit) == (500, 128, "layer")


def test_report_names_what_rows_were_evaluated_on(tmp_path):
    from knockout.reporting.report import identity

    row = {"method": "zero", "fraction": 0.5, "seed": 0, "n_eval": 1116, "target": "", "seconds": 0.0}
    rows = [{**row, "top1": 0.3, "ce": 4.0, "delta_top1": -0.1, "delta_ce": 1.0, "n_ablated": 8, "n_neurons": 16}]

    def run(name: str, settings: dict, rows: list[dict]) -> RunFolder:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model": "m", **settings}))
        write_rows(tmp_path / name, [ResultRow.from_dict(r) for r in rows])
        return RunFolder(tmp_path / name)

    assert identity(run("a", {"eval_docs": 12, "eval_tokens": 4096}, rows))["eval tokens"] == (
        "12 documents (1,116 scored targets)"
    )
    assert identity(run("b", {"eval_tokens": 512}, rows))["eval tokens"] == "1,116 scored targets"
    assert identity(run("c", {"eval_tokens": 512}, []))["eval tokens"] == "512"
