"""``--seeds auto`` on a tiny model: the sets added are those the sequential design asks for (checked by replaying
the design by hand on the stored sums), the report's answer replays the same looks, and a run killed with SIGKILL
during an added set resumes with the same command to the values of an uninterrupted run."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from knockout.cli import main
from knockout.inference.paired import DocSums
from knockout.inference.sequential import SequentialTest, plan_for
from knockout.reporting.answer import run_answer
from knockout.runfolder import RunFolder, row_key

SRC = Path(__file__).resolve().parents[2] / "src"
METHODS = ("zero", "mean", "peak")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    return tmp_path_factory.mktemp("auto"), *tiny_llama


def _args(model, corpus, out):
    return [
        "-q", "sweep", "--model", model, "--data", corpus, "--methods", ",".join(METHODS), "--fractions", "0,0.5,1",
        "--seeds", "auto", "--decide-fractions", "0.5", "--decide-max-sets", "6", "--eval-tokens", "60",
        "--stats-tokens", "200", "--max-length", "30", "--batch-size", "4", "--out", str(out),
    ]  # fmt: skip


def _values(out):
    return {(r["method"], r["fraction"], r["seed"]): (r["ce"], r["top1"]) for r in RunFolder(out).row_dicts()}


@pytest.fixture(scope="module")
def reference(setup):
    root, model, corpus = setup
    out = root / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")
        assert main(_args(model, corpus, out)) == 0
    return out


def test_the_added_sets_are_those_the_design_asks_for(reference):
    rows = RunFolder(reference).row_dicts()
    sums = RunFolder(reference).stored_sums
    first = {(m, f, s) for m in METHODS for f in (0.0, 0.5, 1.0) for s in (0, 1, 2)}
    assert first <= {(r["method"], r["fraction"], r["seed"]) for r in rows}
    added = {(r["method"], r["fraction"], r["seed"]) for r in rows if r["seed"] >= 3 and r["method"] != "baseline"}
    # the design by hand: the first look at 3 sets decides what the second (6 sets) needs
    plan = plan_for(6)
    assert plan.looks == (3, 6)
    test = SequentialTest(plan, list(METHODS), "ce")
    data = {m: [DocSums(**sums[row_key(m, 0.5, s)]) for s in range(3)] for m in METHODS}
    test.look(data)
    if test.done:
        assert added == set()
    else:
        assert added == {(m, 0.5, s) for m in test.methods_needed() for s in (3, 4, 5)}
        assert all(f == 0.5 for _, f, _ in added)  # sets are added only at the decision fraction
    answer = run_answer(reference, (0.5, 1.0))
    at_half, at_one = answer.fractions
    assert at_half.n_sets == (3 if test.done else 6) and at_half.stop in ("decided", "maximum")
    assert at_half.design.startswith("sequential") and at_one.stop == "fixed" and at_one.n_sets == 3


WRAPPER = r"""
import os, signal, sys
import knockout.runfolder as rf
real = rf.save_doc_sums
def save_doc_sums(run_dir, method, fraction, seed, sums, target=""):
    real(run_dir, method, fraction, seed, sums, target)
    if seed == int(os.environ["KILL_AT_SEED"]) and method != "baseline":
        os.kill(os.getpid(), signal.SIGKILL)  # after the sums, before the row
rf.save_doc_sums = save_doc_sums
from knockout.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_an_added_set_then_the_same_command_gives_the_same_sets_and_values(setup, reference, tmp_path):
    _, model, corpus = setup
    if not any(r["seed"] >= 3 for r in RunFolder(reference).row_dicts()):
        pytest.skip("the first look decided every pair: no set was added")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "KILL_AT_SEED": "4"}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *_args(model, corpus, out)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = _values(out)
    assert max(s for m, _, s in partial if m != "baseline") == 3  # killed inside set 4, before its first row
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")
        assert main(_args(model, corpus, out)) == 0
    assert _values(out) == _values(reference)


def test_the_design_is_fixed_at_the_first_look_and_a_resume_may_not_change_it(setup, reference, tmp_path, capsys):
    from knockout.runfolder import RunFolder

    _, model, corpus = setup
    out = shutil.copytree(reference, tmp_path / "run")
    stored = RunFolder(out).resolved.design
    assert stored["looks"] == [3, 6] and stored["families"] == 2 and stored["max_sets"] == 6
    args = _args(model, corpus, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for changed in (["--decide-max-sets", "9"], ["--decide-alpha", "0.1"], ["--seeds", "0,1,2,3,4,5,6,7"]):
        i = args.index(changed[0]) if changed[0] in args else None
        given = [*args[:i], *changed, *args[i + 2 :]] if i is not None else [*args, *changed]
        assert main(given) == 2
        err = capsys.readouterr().err
        assert "sequential design was fixed before its first look" in err and "another --out" in err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    answer = run_answer(out, (0.5, 0.9), n_boot=50)
    assert [fa.fraction for fa in answer.fractions] == [0.5]  # 0.9 is not in this run: no line for it
    assert "per fraction and metric" in answer.families
