"""``run_sweep(..., callbacks=[...])``: the start (resolved config), every row with its per-document summary, and the
end (after the report) reach a callback, in results.jsonl's order, also on a resumed run; errors reach ``on_error``;
under torchrun only rank 0 calls them."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

import tiny
from knockout.config import SweepConfig
from knockout.errors import KnockoutError
from knockout.experiments.callbacks import Callback
from knockout.experiments.runner import run_sweep
from knockout.runfolder import RunFolder


class Recorder(Callback):
    def __init__(self):
        self.events: list[tuple] = []

    def on_start(self, config):
        self.events.append(("start", config))

    def on_row(self, row, doc_summary):
        self.events.append(("row", row, doc_summary))

    def on_end(self, run_dir, files):
        # the files exist when on_end is called (the report included)
        self.events.append(("end", Path(run_dir), list(files), all(Path(f).is_file() for f in files)))

    def on_error(self, error):
        self.events.append(("error", error))

    def rows(self) -> list[dict]:
        return [e[1].as_dict() for e in self.events if e[0] == "row"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("callbacks")
    return tiny.save(tiny.causal_lm("llama"), "causal", root / "model"), tiny.write_corpus(root / "c.txt", n_docs=30)


def _cfg(saved, out, **kw) -> SweepConfig:
    model, corpus = saved
    values = dict(
        model=model, data=corpus, methods=("zero", "mean"), fractions=(0.0, 0.5), seeds=(0,), eval_tokens=60,
        stats_tokens=60, max_length=16, batch_size=3, device="cpu", out=str(out),
    )  # fmt: skip
    values.update(kw)
    return SweepConfig(**values)


def _summary(sums: dict) -> dict:
    """The per-document summary, recomputed with the statistics module from the stored per-document sums."""
    docs = [(c / n, k / n) for n, c, k in zip(sums["n"], sums["ce_sum"], sums["correct"]) if n > 0]
    ce, top1 = [d[0] for d in docs], [d[1] for d in docs]
    return {"n_docs": len(docs), "ce_mean": statistics.fmean(ce), "ce_std": statistics.stdev(ce),
            "top1_mean": statistics.fmean(top1), "top1_std": statistics.stdev(top1)}  # fmt: skip


def test_callbacks_see_the_config_every_row_and_the_finished_run(saved, tmp_path):
    rec = Recorder()  # zero only: without statistics the report has no histogram figures to draw (faster)
    cfg = _cfg(saved, tmp_path / "run", methods=("zero",), fractions=(0.0, 0.5, 1.0), seeds=(0, 1))
    out = Path(run_sweep(cfg, progress=False, callbacks=[rec], report=True))
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "start" and kinds[-1] == "end" and set(kinds[1:-1]) == {"row"}
    assert rec.events[0][1] == json.loads((out / "config.json").read_text())  # the resolved config
    assert rec.events[0][1]["resolved"]["task"] == "causal"
    assert rec.rows() == RunFolder(out).row_dicts()  # every row, in results.jsonl's order
    docs = RunFolder(out).stored_sums
    for _, row, summary in (e for e in rec.events if e[0] == "row"):
        sums = docs[row.key]
        assert summary == pytest.approx(_summary(sums), rel=1e-12)
        assert sum(sums["ce_sum"]) / sum(sums["n"]) == pytest.approx(row.ce, rel=1e-6)  # the same documents
    _, run_dir, files, existed = rec.events[-1]
    assert run_dir == out and existed
    names = [f.relative_to(out).as_posix() for f in files]
    assert names[:3] == ["config.json", "results.jsonl", "results.csv"]
    assert "report/report.html" in names and "report/report.md" in names
    report = sorted(p.relative_to(out).as_posix() for p in (out / "report").rglob("*") if p.is_file())
    assert sorted(names[3:]) == report


def test_a_resumed_run_tells_the_stored_rows_first(saved, tmp_path):
    run_sweep(_cfg(saved, tmp_path / "run", methods=("zero",)), progress=False)
    first = RunFolder(tmp_path / "run").row_dicts()
    rec = Recorder()
    cfg = _cfg(saved, tmp_path / "run", methods=("zero",), seeds=(0, 1))
    out = Path(run_sweep(cfg, progress=False, callbacks=[rec]))
    rows = RunFolder(out).row_dicts()
    assert len(rows) == 2 * len(first) and rows[: len(first)] == first
    assert rec.rows() == rows
    assert not any(f.relative_to(out).parts[0] == "report" for f in rec.events[-1][2])  # report=False: none


def test_an_error_reaches_on_error_and_is_raised_again(saved, tmp_path):
    class Failing(Callback):
        def on_row(self, row, doc_summary):
            if row.method == "mean":
                raise RuntimeError("tracker down")

    rec = Recorder()
    with pytest.raises(RuntimeError, match="tracker down"):
        run_sweep(_cfg(saved, tmp_path / "run"), progress=False, callbacks=[Failing(), rec])
    assert rec.events[-1][0] == "error" and str(rec.events[-1][1]) == "tracker down"
    assert not any(e[0] == "end" for e in rec.events)
    stored = RunFolder(tmp_path / "run").row_dicts()  # the row was stored before the callbacks heard of it
    assert stored[-1]["method"] == "mean" and rec.rows() == stored[:-1]


def test_callbacks_must_be_callbacks(saved, tmp_path):
    with pytest.raises(KnockoutError, match="Callback instances"):
        run_sweep(_cfg(saved, tmp_path / "run"), progress=False, callbacks=[print])
    assert not (tmp_path / "run").exists()


def test_only_rank_0_calls_callbacks(saved, tmp_path, monkeypatch):
    """A sweep that believes it is rank 1 of 2 (collectives replaced by identities) calls no callback."""
    from knockout import distributed

    monkeypatch.setattr(distributed, "world", lambda: distributed.World(1, 2))
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    monkeypatch.setattr(distributed, "all_reduce_statistics", lambda s: s)
    monkeypatch.setattr(distributed, "all_reduce_metrics", lambda m, batch_index=None: m)
    rec = Recorder()
    run_sweep(_cfg(saved, tmp_path / "run", fractions=(1.0,)), progress=False, callbacks=[rec], report=True)
    assert rec.events == []


def test_callbacks_see_a_run_of_named_components(saved, tmp_path):
    """``--ablate`` runs tell the callbacks as sweeps do: the start, every row (with its per-document summary) and the
    end, a resumed run's stored rows first."""
    rec = Recorder()
    cfg = _cfg(saved, tmp_path / "run", ablate="a=L0.H0;b=L1.H1")
    out = Path(run_sweep(cfg, progress=False, callbacks=[rec]))
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "start" and kinds[-1] == "end" and set(kinds[1:-1]) == {"row"}
    assert rec.events[0][1] == json.loads((out / "config.json").read_text())
    assert rec.rows() == RunFolder(out).row_dicts() and {r["target"] for r in rec.rows()} == {"", "a", "b"}
    docs = RunFolder(out).stored_sums
    for _, row, summary in (e for e in rec.events if e[0] == "row"):
        assert summary == pytest.approx(_summary(docs[row.key]), rel=1e-12)
    again = Recorder()
    run_sweep(cfg, progress=False, callbacks=[again])  # resumed: nothing to run, the stored rows replayed
    assert again.rows() == RunFolder(out).row_dicts() and [e[0] for e in again.events][-1] == "end"
