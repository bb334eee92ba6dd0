"""Documents on demand (``--decide-max-docs``) on a tiny model: the run adds evaluation documents when they limit the
interval; a grown row equals the same row evaluated on all its documents at once (and its per-document sums those of
an independent forward pass); every row's change is against the baseline on its own documents; an interrupted run
resumes to the same rows; the design lock covers the documents; bad settings are refused in one line; with the
setting off the first documents are evaluated exactly as before."""

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from knockout.cli import main
from knockout.config import SweepConfig
from knockout.data.tasks import DataSpec, ModelInputs, doc_segments, eval_batches
from knockout.data.text import load_texts, tokenize_docs
from knockout.errors import KnockoutError
from knockout.experiments.runner import run_sweep
from knockout.inference.paired import DocSums
from knockout.inference.sequential import Plan, SequentialTest
from knockout.loading import LoadedModel
from knockout.reporting.answer import run_answer, sentences
from knockout.reporting.report import identity
from knockout.runfolder import DOC_FIELDS, RunFolder, row_key

METHODS = ("zero", "mean", "peak")
FRACTIONS = (0.5, 0.9)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    corpus = tiny.write_corpus(root / "corpus.txt", 300)  # 60 evaluation documents
    loaded = LoadedModel(tiny.causal_lm("llama"), tiny.tokenizer(), "causal", "tiny-llama", torch.device("cpu"))
    return root, corpus, loaded


def _cfg(corpus, out, **changes) -> SweepConfig:
    values = dict(
        model="tiny-llama", data=corpus, out=str(out), methods=METHODS, fractions=FRACTIONS, seeds="auto",
        decide={"fractions": FRACTIONS, "max_sets": 8, "max_docs": 48}, eval_docs=12, stats_tokens=200,
        max_length=30, batch_size=5,
    )  # fmt: skip
    values.update(changes)
    return SweepConfig(**values)


def _sweep(cfg, loaded):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")
            return run_sweep(cfg, progress=False, loaded=loaded)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def grown(setup):
    root, corpus, loaded = setup
    out = root / "grown"
    _sweep(_cfg(corpus, out), loaded)
    return out


@pytest.fixture(scope="module")
def fixed(setup):
    """The same run with the documents fixed (no --decide-max-docs)."""
    root, corpus, loaded = setup
    out = root / "fixed"
    _sweep(_cfg(corpus, out, decide={"fractions": FRACTIONS, "max_sets": 8}), loaded)
    return out


def _values(out):
    return {(r["method"], r["fraction"], r["seed"]): {k: v for k, v in r.items() if k != "seconds"}
            for r in RunFolder(out).row_dicts()}  # fmt: skip


def test_the_first_documents_load_is_a_prefix_of_the_larger_one(setup):
    _, corpus, loaded = setup
    texts = lambda: load_texts(corpus, "eval")  # noqa: E731
    assert tokenize_docs(loaded.processor, texts(), 12, 30) == tokenize_docs(loaded.processor, texts(), 48, 30)[:12]
    spec = DataSpec(corpus, 1, 100, 30, 5, eval_docs=12, sort_by_length=True)
    inputs = ModelInputs("causal", loaded.processor, loaded.model.config)
    segments = doc_segments(spec, inputs, (12, 24, 48))
    first = eval_batches(spec, inputs, 0)
    assert len(segments[0]) == len(first)
    for a, b in zip(segments[0], first):
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.valid, b.valid)
    assert [sum(b.size for b in s) for s in segments] == [12, 12, 24]
    with pytest.raises(KnockoutError, match="--decide-max-docs"):
        doc_segments(spec, inputs, (12, 24, 500))  # the corpus has 60 evaluation documents


def test_the_run_adds_documents_where_they_limit_the_interval(grown):
    folder = RunFolder(grown)
    plan = Plan.from_dict(folder.resolved.design)
    assert plan.docs == (12, 24, 48)
    sums = RunFolder(grown).stored_sums
    grew = False
    for fraction in FRACTIONS:
        data = {m: [] for m in METHODS}
        for m in METHODS:
            s = 0
            while row_key(m, fraction, s) in sums:
                data[m].append(DocSums(**{f: sums[row_key(m, fraction, s)][f] for f in DOC_FIELDS}))
                s += 1
        test = SequentialTest(plan, list(METHODS), "ce")
        test.replay(data)
        assert test.finished
        # every set a look used has that look's documents, and no row has more than the design asked of it
        last = test.docs_used[-1]
        for m in METHODS:
            assert {r.n_docs for r in data[m]} <= set(plan.docs)
        for m in test.methods_needed() or METHODS:
            assert all(r.n_docs >= last for r in data[m][: plan.looks[test.looks_done - 1]])
        grew |= last > 12
        fa = next(f for f in run_answer(grown, FRACTIONS, n_boot=50).fractions if f.fraction == fraction)
        assert fa.n_docs == last and fa.n_sets == plan.looks[test.looks_done - 1] and fa.max_docs == 48
        assert f"x {last} documents" in sentences(fa)[0]
        assert f"documents {'/'.join(map(str, test.docs_used))} of the planned 12/24/48" in fa.design
    assert grew, "the tiny model's document part should limit the interval: the design should add documents"
    most = max(len(v["n"]) for v in sums.values())  # the report says how far the documents grew
    assert (
        identity(folder)["eval tokens"].startswith("12 documents")
        and f"up to {most} at the decision" in (identity(folder)["eval tokens"])
    )


def test_a_grown_row_is_the_row_evaluated_on_all_its_documents(setup, grown, fixed):
    root, corpus, loaded = setup
    rows, sums, fixed_sums = _values(grown), RunFolder(grown).stored_sums, RunFolder(fixed).stored_sums
    big = [k for k, r in rows.items() if k[0] != "baseline" and len(sums[row_key(*k)]["n"]) == 48]
    assert big
    seeds = sorted({k[2] for k in big})
    # the same rows evaluated on the 48 documents at once (batches of 5: other batches than the grown segments')
    scratch = root / "scratch"
    _sweep(_cfg(corpus, scratch, seeds=tuple(seeds), eval_docs=48, decide={}), loaded)
    ref, ref_sums = _values(scratch), RunFolder(scratch).stored_sums
    for k in big:
        a, b = sums[row_key(*k)], ref_sums[row_key(*k)]
        assert np.array_equal(a["n"], b["n"]) and np.array_equal(a["correct"], b["correct"])
        np.testing.assert_allclose(a["ce_sum"], b["ce_sum"], rtol=1e-5, atol=1e-6)
        assert rows[k]["n_eval"] == ref[k]["n_eval"] and rows[k]["top1"] == pytest.approx(ref[k]["top1"], abs=1e-12)
        assert rows[k]["ce"] == pytest.approx(ref[k]["ce"], rel=1e-6)
        assert rows[k]["delta_ce"] == pytest.approx(ref[k]["delta_ce"], abs=1e-6)
        if row_key(*k) in fixed_sums:  # the first documents: the row of the run with fixed documents, bit for bit
            first = fixed_sums[row_key(*k)]
            assert all(np.array_equal(a[f][:12], first[f]) for f in DOC_FIELDS)
    # the baseline's sums against a forward pass of each document alone (no knockout evaluation code)
    seqs = tokenize_docs(loaded.processor, load_texts(corpus, "eval"), 48, 30)
    base = sums[row_key("baseline", 0.0, 0)]
    with torch.no_grad():
        for i, ids in enumerate(seqs):
            logits = loaded.model(torch.tensor([ids])).logits[0, :-1].double()
            target = torch.tensor(ids[1:])
            ce = torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            assert base["n"][i] == len(ids) - 1 and base["correct"][i] == int((logits.argmax(-1) == target).sum())
            assert base["ce_sum"][i] == pytest.approx(ce, rel=1e-5)


def test_every_row_changes_from_the_baseline_on_its_own_documents(grown):
    rows, sums = _values(grown), RunFolder(grown).stored_sums
    for k, r in rows.items():
        mine = sums[row_key(*k)]
        n = len(mine["n"])
        base = {f: v[:n] for f, v in sums[row_key("baseline", 0.0, k[2])].items()}
        assert r["n_eval"] == int(mine["n"].sum()) and r["top1"] == int(mine["correct"].sum()) / r["n_eval"]
        assert r["ce"] == pytest.approx(float(mine["ce_sum"].sum()) / r["n_eval"], rel=1e-6)
        base_ce = float(base["ce_sum"].sum()) / int(base["n"].sum())
        assert r["delta_ce"] == pytest.approx(r["ce"] - base_ce, abs=1e-6)
        assert r["delta_top1"] == pytest.approx(r["top1"] - int(base["correct"].sum()) / int(base["n"].sum()))


def test_an_interrupted_run_resumes_to_the_same_rows(setup, grown):
    root, corpus, loaded = setup
    out = root / "interrupted"
    saved = []
    import knockout.runfolder as rf

    real = rf.save_doc_sums

    def save_then_stop(run_dir, method, fraction, seed, sums, target=""):
        real(run_dir, method, fraction, seed, sums, target)
        if method != "baseline" and len(sums["n"]) > 12:
            saved.append(seed)
            if len(saved) == 4:  # inside the growing, after the sums and before the row
                raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rf, "save_doc_sums", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            _sweep(_cfg(corpus, out), loaded)
    assert _values(out) != _values(grown)
    _sweep(_cfg(corpus, out), loaded)
    assert _values(out) == _values(grown)
    a, b = RunFolder(out).stored_sums, RunFolder(grown).stored_sums
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k][f], b[k][f]) for k in a for f in DOC_FIELDS)


def test_the_documents_are_part_of_the_locked_design(setup, grown, tmp_path):
    import shutil

    _, corpus, loaded = setup
    out = shutil.copytree(grown, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for max_docs in ({"max_docs": 24}, {}):
        cfg = _cfg(corpus, out, decide={"fractions": FRACTIONS, "max_sets": 8, **max_docs})
        locked = r"sequential design was fixed before its first look \(docs: \[12, 24, 48\]"
        with pytest.raises(KnockoutError, match=locked):
            _sweep(cfg, loaded)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--decide-max-docs", "many"], "--decide-max-docs"),
        (["--decide-max-docs", "12"], "must be above --eval-docs (12)"),
        (["--decide-max-docs", "8"], "must be above --eval-docs (12)"),
        (["--decide-max-docs", "1"], "decide.max_docs (--decide-max-docs) must be an integer >= 2"),
    ],
)
def test_bad_settings_are_refused_in_one_line(setup, tmp_path, capsys, extra, message):
    _, corpus, _ = setup
    args = ["sweep", "--model", "unused", "--data", corpus, "--seeds", "auto", "--eval-docs", "12",
            "--out", str(tmp_path / "run"), *extra]  # fmt: skip
    if extra[1] == "many":  # argparse: its usage line, then the error
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err and "expected an integer" in err
        return
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_documents_are_added_only_to_whole_documents_of_auto_runs(setup):
    _, corpus, loaded = setup
    with pytest.raises(KnockoutError, match="give --seeds auto"):
        _cfg(corpus, "x", seeds=(0, 1, 2))
    with pytest.raises(KnockoutError, match="give the first look's with --eval-docs"):
        _cfg(corpus, "x", eval_docs=None)
    spec = DataSpec(corpus, 100, 100, 30, 5, eval_docs=12)
    for task in ("masked", "image"):
        with pytest.raises(KnockoutError, match="whole documents of text for causal LMs"):
            doc_segments(spec, ModelInputs(task, loaded.processor, loaded.model.config), (12, 24))
    prompts = DataSpec("ioi", 100, 100, 30, 5, eval_docs=12)
    with pytest.raises(KnockoutError, match="whole documents of text for causal LMs"):
        doc_segments(prompts, ModelInputs("causal", loaded.processor, loaded.model.config), (12, 24))


def test_with_documents_fixed_the_rows_have_the_first_documents_only(grown, fixed):
    folder = RunFolder(fixed)
    assert folder.resolved.design["docs"] == []
    sums = RunFolder(fixed).stored_sums
    assert {len(s["n"]) for s in sums.values()} == {12}
    # the first look's rows of both runs are evaluated on the same batches: bit for bit on the first documents
    grown_sums = RunFolder(grown).stored_sums
    for k in [k for k in sums if k[2] < 3]:
        assert all(np.array_equal(grown_sums[k][f][:12], sums[k][f]) for f in DOC_FIELDS)
