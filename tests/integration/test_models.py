"""``--models A,B``: the same sweep on two models, on the same evaluation documents, and their comparison."""

import json
from pathlib import Path

import pytest

import tiny
from knockout.cli import main
from knockout.data.text import load_texts
from knockout.runfolder import RunFolder


@pytest.fixture(autouse=True)
def _no_report(monkeypatch):
    monkeypatch.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")


def test_two_models_on_the_same_documents_and_their_comparison(tmp_path, capsys):
    llama = tiny.save(tiny.causal_lm("llama"), "causal", tmp_path / "llama")
    gpt2 = tiny.save(tiny.causal_lm("gpt2"), "causal", tmp_path / "gpt2")
    corpus = tiny.write_corpus(tmp_path / "corpus.txt", n_docs=60)
    out = tmp_path / "runs"
    args = ["-q", "sweep", "--models", f"{llama},{gpt2}", "--data", corpus, "--methods", "zero,mean",
            "--fractions", "0,0.5", "--seeds", "0,1", "--eval-docs", "6", "--stats-tokens", "200", "--max-length", "30",
            "--batch-size", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{llama}:" in printed and f"{gpt2}:" in printed and "comparison:" in printed
    for name in ("llama", "gpt2"):
        rows = RunFolder(out / name).row_dicts()
        assert {r["method"] for r in rows} == {"baseline", "zero", "mean"}
        sums = RunFolder(out / name).stored_sums
        assert all(len(s["n"]) == 6 for s in sums.values())  # six documents, whole
    # the same documents: each document's scored targets are its length (both tokenizers read characters here)
    texts = list(load_texts(corpus, "eval"))[:6]
    lengths = [min(len(t), 30) - 1 for t in texts]
    for name in ("llama", "gpt2"):
        base = RunFolder(out / name).stored_sums[("baseline", 0.0, 0, "")]
        assert sorted(base["n"].tolist()) == sorted(lengths)
    saved = json.loads((out / "compare" / "compare.json").read_text())
    assert saved["runs"] == ["llama", "gpt2"] and [v["fraction"] for v in saved["verdicts"]] == ["0.5"]  # 0.9: not run
    capsys.readouterr()
    without_docs = [a for a in args[:-2] if a not in ("--eval-docs", "6")] + ["--out", str(tmp_path / "x")]
    assert main(without_docs) == 2
    assert "give --eval-docs N" in capsys.readouterr().err
    assert main([*args[:-2], "--out", str(tmp_path / "y"), "--model", llama]) == 2
    assert "not both" in capsys.readouterr().err
