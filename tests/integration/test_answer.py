"""A sweep with ``optimal`` on a tiny model: per-document sums stored and consistent with the rows, resume without
retraining, and the report / compare open with the answer computed from those sums."""

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import tiny
from knockout.ablation.optimal import OptimalAblation
from knockout.experiments.config import SweepConfig
from knockout.experiments.runner import run_sweep
from knockout.inference.paired import DocSums, best_method, paired_difference
from knockout.loading import LoadedModel
from knockout.reporting.answer import markdown, run_answer
from knockout.reporting.report import compare_runs, write_report
from knockout.runfolder import read_doc_sums, read_rows, row_key

METHODS = ("zero", "mean", "peak", "optimal")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("answer")
    corpus = tiny.write_corpus(root / "corpus.txt", n_docs=60)
    loaded = LoadedModel(tiny.causal_lm("llama"), tiny.tokenizer(), "causal", "tiny-llama", torch.device("cpu"))
    cfg = SweepConfig(
        model="tiny-llama", data=corpus, out=str(root / "run"), methods=METHODS, fractions=(0.0, 0.5, 0.9),
        seeds=(0, 1), eval_tokens=80, stats_tokens=200, max_length=20, batch_size=4,
        optimal={"steps": 10, "lr": 0.05},
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        with _counting_trainings() as trained:
            out = run_sweep(cfg, progress=False, loaded=loaded)
    finally:
        torch.set_num_threads(threads)
    return root, cfg, loaded, out, len(trained)


@contextmanager
def _counting_trainings():
    """Count the neuron sets ``optimal`` trains (calls of ``OptimalAblation.learn``) in the body."""
    calls, learn = [], OptimalAblation.learn
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OptimalAblation, "learn", lambda self, neurons: calls.append(1) or learn(self, neurons))
        yield calls


def test_doc_sums_add_up_to_the_rows(run):
    _, _, _, out, trained = run
    assert trained == 4  # 2 seeds x 2 non-zero fractions
    rows, sums = read_rows(out), read_doc_sums(out)
    assert len(rows) == 2 * (1 + 4 * 3)
    for r in rows:
        d = sums[row_key(r["method"], r["fraction"], r["seed"])]
        assert int(d["n"].sum()) == r["n_eval"]
        assert int(d["correct"].sum()) == round(r["top1"] * r["n_eval"])
        assert d["ce_sum"].sum() / r["n_eval"] == pytest.approx(r["ce"], rel=1e-6)
    assert len(list((out / "artifacts" / "optimal").glob("*.safetensors"))) == 4


def test_resume_reuses_the_learned_constants(run):
    _, cfg, loaded, out, _ = run
    results = (out / "results.jsonl").read_text()
    kept = [line for line in results.splitlines() if json.loads(line)["method"] != "optimal"]  # keep artifacts/
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    with _counting_trainings() as trained:
        run_sweep(cfg, progress=False, loaded=loaded)
    assert trained == []  # re-evaluated from artifacts/, not retrained
    assert len(read_rows(out)) == 26


def _independent(out, f):
    sums = read_doc_sums(out)
    data = {m: [DocSums(**sums[row_key(m, f, s)]) for s in (0, 1)] for m in METHODS}
    best = best_method(data, "ce")
    for m in METHODS:  # the point estimates by hand: mean over seeds of the ratio of sums
        per_seed = [data[m][s].ce_sum.sum() / data[m][s].n.sum() for s in (0, 1)]
        assert best.values[m] == pytest.approx(np.mean(per_seed))
    return data, best, paired_difference(data["zero"], data["optimal"], "ce")


def test_answer_matches_the_paired_statistics_of_the_stored_sums(run):
    _, _, _, out, _ = run
    answer = run_answer(out, (0.5, 0.9))
    md = "\n".join(markdown(answer))
    for f in (0.5, 0.9):
        data, best, ex = _independent(out, f)
        ans = next(a for a in answer.fractions if a.fraction == f)
        assert ans.ce.best == best.best and ans.ce.lead.low == best.lead.low and ans.seeds == [0, 1]
        assert ans.top1.best == best_method(data, "top1").best
        assert best.values["optimal"] <= best.values["mean"] + 0.05  # learned on other text, so not guaranteed
        assert ans.excess["zero"].estimate == ex.estimate and set(ans.excess) == {"zero", "mean", "peak"}
        assert f"At {100 * f:g}% ablated" in md and f"best by CE **{best.best}**" in md
        assert f"{best.lead.estimate:+.3f} [{best.lead.low:+.3f}, {best.lead.high:+.3f}]" in md
        assert f"zero {ex.estimate:+.3f} [{ex.low:+.3f}, {ex.high:+.3f}]" in md


@pytest.mark.slow
def test_report_and_compare_open_with_the_answer(run):
    root, _, _, out, _ = run
    html = write_report(out)
    md = (html.parent / "report.md").read_text()
    for f in (0.5, 0.9):
        _, best, ex = _independent(out, f)
        assert f"best by CE **{best.best}**" in md and f"zero {ex.estimate:+.3f} [{ex.low:+.3f}, {ex.high:+.3f}]" in md
    assert md.index("## The answer") < md.index("## Table 2") < md.index("Best method per fraction")
    text = html.read_text()
    assert text.index("The answer") < text.index("Model and data") and "Best method per fraction" in text
    cmp = compare_runs([out], root / "cmp")
    assert "The answer: tiny-llama" in cmp.read_text()
    assert f"best by CE **{best.best}**" in (root / "cmp" / "compare.md").read_text()


def test_rows_without_doc_sums_are_reported_as_such(run, tmp_path):
    import shutil

    _, _, _, out, _ = run
    copy = tmp_path / "old"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("report", "artifacts"))
    shutil.rmtree(copy / "paired")
    md = "\n".join(markdown(run_answer(copy, (0.5,))))
    assert "No paired comparison is possible" in md and "no per-document sums" in md
