"""The centre methods end to end: `knockout stats` prints the point-mass count, and a sweep with median, mode,
peak-nopm and peak@EPS rows writes them, peak@<stored eps> gives peak's numbers exactly, and the report has the
table against the bin width."""

import pytest

import tiny
from knockout.cli import main
from knockout.runfolder import RunFolder


@pytest.mark.slow  # about 15 s of CPU: a stats run, a six-method sweep and its report
def test_stats_summary_and_a_sweep_with_centre_methods(tmp_path, capsys):
    model = tiny.save(tiny.causal_lm("llama"), "causal", tmp_path / "model")
    corpus = tiny.write_corpus(tmp_path / "corpus.txt", n_docs=40)
    common = ["--model", model, "--data", corpus, "--stats-tokens", "300", "--max-length", "40"]
    assert main(["-q", "stats", *common, "--out", str(tmp_path / "s.safetensors")]) == 0
    assert "point-mass peaks 0 (0.00% of neurons)" in capsys.readouterr().out
    methods = "peak,peak@0.01,peak@0.05,median,mode,peak-nopm"
    out = tmp_path / "run"
    args = ["-q", "sweep", *common, "--methods", methods, "--fractions", "0.5", "--seeds", "0"]
    assert main([*args, "--eval-tokens", "80", "--batch-size", "4", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in RunFolder(out).row_dicts()}
    assert set(rows) == {"baseline", *methods.split(",")}
    assert rows["peak@0.01"]["ce"] == rows["peak"]["ce"] and rows["peak@0.01"]["top1"] == rows["peak"]["top1"]
    assert len({rows[m]["ce"] for m in ("peak", "median", "mode")}) > 1  # the centres differ
    eps_md = (out / "report" / "eps.md").read_text()
    assert "| peak | 0.01 (stored) |" in eps_md and "| peak@0.05 | 0.05 |" in eps_md
