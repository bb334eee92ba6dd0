"""A sweep with ``optimal`` on a tiny model: per-document sums stored and consistent with the rows, resume without
retraining, and the report / compare open with the answer computed from those sums."""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from knockout.ablation.optimal import OptimalAblation
from knockout.config import SweepConfig
from knockout.experiments.runner import run_sweep
from knockout.inference.paired import DocSums, paired_difference
from knockout.loading import LoadedModel
from knockout.reporting.answer import add, paired_records, run_answer
from knockout.reporting.doc import Doc
from knockout.reporting.report import compare_runs, write_report
from knockout.runfolder import RunFolder, row_key

METHODS = ("zero", "mean", "peak", "optimal")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("answer")
    corpus = tiny.write_corpus(root / "corpus.txt", n_docs=60)
    loaded = LoadedModel(tiny.causal_lm("llama"), tiny.tokenizer(), "causal", "tiny-llama", torch.device("cpu"))
    cfg = SweepConfig(
        model="tiny-llama", data=corpus, out=str(root / "run"), methods=METHODS, fractions=(0.0, 0.5, 0.9),
        seeds=(0, 1), eval_tokens=80, stats_tokens=200, max_length=20, batch_size=4,
        optimal={"steps": 10, "lr": 0.05, "held_out_tokens": 30},
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        with _counting_trainings() as trained:
            out = Path(run_sweep(cfg, progress=False, loaded=loaded))
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


def _markdown(answer) -> str:
    doc = Doc()
    add(doc, answer)
    return "\n".join(doc.md)


def test_doc_sums_add_up_to_the_rows(run):
    _, _, _, out, trained = run
    assert trained == 4  # 2 seeds x 2 non-zero fractions
    rows, sums = RunFolder(out).row_dicts(), RunFolder(out).stored_sums
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
    assert len(RunFolder(out).row_dicts()) == 26


def _independent(out, f):
    """The paired statistics at ``f`` recomputed from the stored sums: per-seed ratios of sums by hand, and zero's
    excess over optimal."""
    sums = RunFolder(out).stored_sums
    data = {m: [DocSums(**sums[row_key(m, f, s)]) for s in (0, 1)] for m in METHODS}
    by_hand = {m: np.mean([data[m][s].ce_sum.sum() / data[m][s].n.sum() for s in (0, 1)]) for m in METHODS}
    return data, by_hand, paired_difference(data["zero"], data["optimal"], "ce")


def test_answer_matches_the_paired_statistics_of_the_stored_sums(run):
    _, _, _, out, _ = run
    answer = run_answer(out, (0.5, 0.9))
    md = _markdown(answer)
    for f in (0.5, 0.9):
        data, by_hand, ex = _independent(out, f)
        ans = next(a for a in answer.fractions if a.fraction == f)
        assert ans.methods == ["zero", "mean", "peak"] and ans.bound == "optimal"  # optimal is the bound
        # two sets, fewer than a first look's three: the intervals are about these sets, nothing is decided
        assert ans.n_sets == 2 and ans.stop == "few sets" and len(ans.ce) == 3 and len(ans.top1) == 3
        for v in ans.ce:
            assert v.estimate == pytest.approx(by_hand[v.a] - by_hand[v.b], abs=1e-12)
            assert not v.decided and v.low <= v.estimate <= v.high
            assert v.level >= 1 - 0.05 / 3  # Holm over three pairs at 5%: at least the Bonferroni level
        assert ans.excess["zero"].estimate == ex.estimate and set(ans.excess) == {"zero", "mean", "peak"}
        assert f"zero {ex.estimate:+.3f} [{ex.low:+.3f}, {ex.high:+.3f}]" in md
        assert ans.best("ce") is None and f"At {100 * f:g}%, for these neuron sets (2 sets x" in md
        leader = min(ans.methods, key=lambda m: by_hand[m])
        assert f"these neuron sets (2 sets x {ans.n_docs} documents), {leader} hurts least" in md
        flagged = [s for s in (0, 1) for m in ans.methods if data["optimal"][s].metric("ce") > data[m][s].metric("ce")]
        assert len(ans.flags) == len(flagged)  # a bound above a contender on evaluation is flagged, every time


def test_answer_files_match_the_report(run, tmp_path):
    _, _, _, out, _ = run
    html = write_report(out, tmp_path / "report")
    saved = json.loads((tmp_path / "report" / "answer.json").read_text())
    answer = run_answer(out, (0.5, 0.9))
    assert [f["fraction"] for f in saved["fractions"]] == [0.5, 0.9]
    for fa, entry in zip(answer.fractions, saved["fractions"]):
        assert entry["best"]["ce"] == fa.best("ce") and entry["n_sets"] == fa.n_sets == 2
        assert entry["sentence"]["ce"] in (html.parent / "report.md").read_text()
    lines = (tmp_path / "report" / "paired.csv").read_text().splitlines()
    assert lines[0].split(",")[:6] == ["fraction", "metric", "kind", "a", "b", "estimate"]
    # 2 fractions x (3 CE pairs + 3 top-1 pairs + 3 excess over optimal)
    assert len(lines) == 1 + 2 * 9 and len(saved["pairs"]) == 18
    first = next(p for p in saved["pairs"] if p["kind"] == "pair" and p["metric"] == "ce" and p["fraction"] == 0.5)
    v = answer.fractions[0].ce[0]
    assert (first["a"], first["b"], first["estimate"], first["decided"]) == (v.a, v.b, v.estimate, v.decided)
    assert (tmp_path / "report" / "answer.png").is_file()


@pytest.mark.slow
def test_report_and_compare_open_with_the_answer(run):
    root, _, _, out, _ = run
    html = write_report(out)
    md = (html.parent / "report.md").read_text()
    for f in (0.5, 0.9):
        _, _, ex = _independent(out, f)
        assert f"zero {ex.estimate:+.3f} [{ex.low:+.3f}, {ex.high:+.3f}]" in md
    assert md.index("## The answer") < md.index("## Table 2") < md.index("Verdicts per fraction")
    text = html.read_text()
    assert text.index("The answer") < text.index("Model and data") and "Verdicts per fraction" in text
    cmp = compare_runs([out], root / "cmp")
    assert "The answer per model" in cmp.read_text() and "Details: the answer for tiny-llama" in cmp.read_text()


def test_rows_without_doc_sums_are_reported_as_such(run, tmp_path):
    import shutil

    _, _, _, out, _ = run
    copy = tmp_path / "old"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("report", "artifacts"))
    shutil.rmtree(copy / "paired")
    md = _markdown(run_answer(copy, (0.5,)))
    assert "No paired comparison is possible" in md and "no usable per-document sums" in md


def test_load_run_gives_the_rows_summary_and_answer_as_dataframes(run):
    import pandas as pd

    import knockout as ko
    from knockout.reporting.summary import summarize

    _, cfg, loaded, out, _ = run
    results = ko.load_run(out)
    rows = RunFolder(out).row_dicts()
    assert isinstance(results.rows, pd.DataFrame) and len(results.rows) == len(rows)
    assert results.rows.to_dict("records") == rows
    assert results.summary.to_dict("records") == summarize(rows)
    answer = run_answer(out, (0.5, 0.9))  # the run's decision fractions by default
    assert [fa.fraction for fa in results.answer.fractions] == [0.5, 0.9]
    assert results.paired.to_dict("records") == pd.DataFrame(paired_records(answer)).to_dict("records")
    assert results.best(0.5) == answer.fractions[0].best("ce") and Path(results) == out
    again = run_sweep(cfg, progress=False, loaded=loaded)  # nothing left to run: the same object
    assert again.rows.equals(results.rows) and again.paired.equals(results.paired)


def _verdict(a, b, estimate, decided):
    from knockout.inference.sequential import PairVerdict

    half = abs(estimate) / 2 if decided else abs(estimate) * 2 + 0.1
    return PairVerdict(a, b, "ce", estimate, estimate - half, estimate + half, 0.98, decided, 3, 10, 0,
                       estimate - half, estimate + half)  # fmt: skip


def test_models_side_by_side_agree_disagree_or_stay_undecided():
    from knockout.reporting.answer import Answer, FractionAnswer, agreement, pair_records, side_by_side

    def fraction(mean_minus_peak, decided):
        fa = FractionAnswer(0.9, ["zero", "mean", "peak"])
        fa.ce = [_verdict("zero", "mean", 5.0, True), _verdict("zero", "peak", 5.0 + mean_minus_peak, True),
                 _verdict("mean", "peak", mean_minus_peak, decided)]  # fmt: skip
        return fa

    mean_wins, peak_wins, open_ = fraction(-0.2, True), fraction(0.2, True), fraction(-0.1, False)
    assert mean_wins.best("ce") == "mean" and peak_wins.best("ce") == "peak" and open_.best("ce") is None
    assert agreement([mean_wins, mean_wins]) == "agree: mean"
    assert agreement([mean_wins, peak_wins]) == "disagree: mean vs peak"
    assert agreement([mean_wins, open_]) == "same leader, not decided on every model"
    assert agreement([peak_wins, open_]) == "different leaders, not decided on every model"
    names = ["smol", "gemma"]
    recs = side_by_side(names, [Answer([mean_wins]), Answer([open_])])
    assert recs[0]["smol"].startswith("mean (decided; 0.200 nats") and recs[0]["gemma"].startswith(
        "undecided (leader mean"
    )
    pairs = pair_records(names, [Answer([mean_wins]), Answer([open_])])
    assert [p["pair"] for p in pairs] == ["zero - mean", "zero - peak", "mean - peak"]
    assert pairs[2]["smol"].endswith(" *") and not pairs[2]["gemma"].endswith(" *")


def test_compare_opens_with_the_answer_per_model(run, tmp_path):
    _, _, _, out, _ = run
    path = compare_runs([out, shutil.copytree(out, tmp_path / "copy")], tmp_path / "cmp", labels=["a", "b"])
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    answer = run_answer(out, (0.5, 0.9))
    for rec, fa in zip(saved["verdicts"], answer.fractions):
        who = fa.best("ce") or fa.leader("ce")
        assert rec["a"] == rec["b"] and who in rec["a"]
        assert rec["models agree?"] in (f"agree: {fa.best('ce')}", "same leader, not decided on every model")
    text = path.read_text()
    assert text.index("The answer per model") < text.index("Table 2") and (tmp_path / "cmp" / "answer.png").is_file()


def test_the_report_shows_optimal_training_and_held_out_ce_per_set(run):
    from safetensors import safe_open

    from knockout.reporting.answer import bound_records

    _, _, _, out, _ = run
    rows = RunFolder(out).row_dicts()
    recs = bound_records(out, rows)
    optimal = {(r["fraction"], r["seed"]): r for r in rows if r["method"] == "optimal" and r["n_ablated"] > 0}
    assert {(r["fraction"], r["seed"]) for r in recs} == set(optimal)  # 2 seeds x 2 fractions
    metas = []
    for path in sorted((out / "artifacts" / "optimal").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metas.append(f.metadata())
    for r in recs:
        assert r["evaluation CE"] == f"{optimal[(r['fraction'], r['seed'])]['ce']:.4f}"
        meta = next(m for m in metas if int(m["seed"]) == r["seed"]
                    and int(m["n_ablated"]) == optimal[(r["fraction"], r["seed"])]["n_ablated"])  # fmt: skip
        assert r["kept"] == meta["chosen"] and r["train CE"] == f"{float(meta['train_ce']):.4f}"
        assert r["held-out learned"] == f"{float(meta['held_out_ce_learned']):.4f}"
