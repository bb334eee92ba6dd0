"""A sweep launched like ``torchrun`` on two CPU processes (gloo) writes the results of a single-process run.

Two worker processes run this file as a script: each calls ``knockout sweep`` (``knockout.cli.main``) on the same
tiny saved model and corpus into the same run folder; only rank 0 writes. The test process runs the same sweep
itself, in one process, while the workers run, and compares the folders: the rows (top-1 and counts exact, CE
within 1e-9 relative), the statistics (histograms, counts, min, max bit-exact), and the per-document sums of every
row (``paired/``, bit-exact) with the report's paired comparison built from them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # a worker rank: find the tiny-model helpers as conftest does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist

import tiny
from knockout.cli import main
from knockout.runfolder import RunFolder
from knockout.stats import Statistics

METHODS = "zero,mean,peak,resample-tokens"


def _args(model: str, corpus: str, out: Path) -> list[str]:
    return [
        "-q", "sweep", "--model", model, "--data", corpus, "--methods", METHODS, "--fractions", "0.5,1",
        "--seeds", "0,1", "--eval-tokens", "120", "--stats-tokens", "120", "--max-length", "24", "--batch-size", "3",
        "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def _worker(model: str, corpus: str, out: Path) -> None:
    torch.set_num_threads(1)
    assert main(_args(model, corpus, out)) == 0
    assert not torch_dist.is_initialized()  # the CLI left the process group


def _answer(report_md: Path) -> str:
    """The report's paired comparison: its section "The answer"."""
    text = report_md.read_text()
    start = text.index("## The answer")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def _rows(out: Path) -> dict:
    return {(r["method"], r["fraction"], r["seed"], r["target"]): r for r in RunFolder(out).row_dicts()}


@pytest.mark.slow  # ~30 s on 2 busy CPU cores: three processes load torch and transformers
@pytest.mark.skipif(
    not (torch_dist.is_available() and torch_dist.is_gloo_available()), reason="torch built without gloo"
)
def test_two_rank_sweep_writes_the_single_process_results(tmp_path):
    from test_distributed import _assert_same_statistics, _launch_script, _one_thread, _wait

    model = tiny.save(tiny.causal_lm("llama"), "causal", tmp_path / "model")
    corpus = tiny.write_corpus(tmp_path / "corpus.txt", n_docs=60)
    procs = _launch_script(Path(__file__), [model, corpus, str(tmp_path / "dist")])
    try:  # the single-process reference, computed while the workers run
        with _one_thread():
            assert main(_args(model, corpus, tmp_path / "single")) == 0
    finally:
        _wait(procs)
    got, want = _rows(tmp_path / "dist"), _rows(tmp_path / "single")
    assert got.keys() == want.keys() and len(want) == 2 * (1 + 4 * 2)
    for key, w in want.items():
        g = got[key]
        assert (g["top1"], g["n_eval"], g["n_ablated"]) == (w["top1"], w["n_eval"], w["n_ablated"]), key
        assert g["ce"] == pytest.approx(w["ce"], rel=1e-9), key
    _assert_same_statistics(
        Statistics.load(tmp_path / "dist" / "stats.safetensors"),
        Statistics.load(tmp_path / "single" / "stats.safetensors"),
    )
    # per-document sums of every row, gathered from the ranks in batch order: those of one process, bit for bit
    got_docs, want_docs = RunFolder(tmp_path / "dist").stored_sums, RunFolder(tmp_path / "single").stored_sums
    assert got_docs.keys() == want_docs.keys() == want.keys()
    for key, w in want_docs.items():
        for field in ("n", "ce_sum", "correct"):
            assert got_docs[key][field].dtype == w[field].dtype, (key, field)
            assert np.array_equal(got_docs[key][field], w[field]), (key, field)
    config = json.loads((tmp_path / "dist" / "config.json").read_text())
    assert config["methods"] == METHODS.split(",")
    assert (tmp_path / "dist" / "report" / "report.html").is_file()
    # so the report opens with the same paired comparison
    answer = [_answer(tmp_path / run / "report" / "report.md") for run in ("dist", "single")]
    assert "At 50%, " in answer[0] and "(2 sets x " in answer[0]
    assert answer[0] == answer[1]


def test_a_rank_other_than_0_writes_nothing(tmp_path, monkeypatch):
    """Without processes: a sweep that believes it is rank 1 of 2 (collectives replaced by identities) computes
    its rows but leaves the run folder untouched."""
    from knockout import distributed
    from knockout.config import SweepConfig
    from knockout.experiments.runner import run_sweep

    model = tiny.save(tiny.causal_lm("llama"), "causal", tmp_path / "model")
    corpus = tiny.write_corpus(tmp_path / "corpus.txt", n_docs=30)
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(1, 2))
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    monkeypatch.setattr(distributed, "all_reduce_statistics", lambda s: s)
    monkeypatch.setattr(distributed, "all_reduce_metrics", lambda m, batch_index=None: m)
    cfg = SweepConfig(
        model=model, data=corpus, methods=("zero", "peak"), fractions=(1.0,), seeds=(0,), eval_tokens=40,
        stats_tokens=40, max_length=16, batch_size=2, device="cpu", out=str(tmp_path / "run"),
    )  # fmt: skip
    assert run_sweep(cfg, progress=False) is None  # the results are rank 0's to give
    out = tmp_path / "run"
    assert not out.exists() or not any(out.iterdir())


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
