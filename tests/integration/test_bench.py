"""The benchmark runs on a tiny model and reports consistent figures (no timing assertions)."""

import json

import tiny
from knockout.bench import run_benchmark
from knockout.loading import LoadedModel


def test_benchmark_reports_ratios_and_memory(tmp_path, capsys):
    import torch

    loaded = LoadedModel(tiny.causal_lm("llama"), tiny.tokenizer(), "causal", "tiny-llama", torch.device("cpu"))
    result = run_benchmark(loaded, batch_size=2, seq_len=16, repeats=2, json_out=str(tmp_path / "b.json"))
    assert json.loads((tmp_path / "b.json").read_text()) == result
    assert set(result["tokens_per_second"]) == {"forward", "statistics", "eval", "eval_folded", "eval_hooked"}
    assert all(v > 0 for v in result["tokens_per_second"].values())
    ratio = result["ratios"]["statistics_vs_forward"]
    tps = result["tokens_per_second"]
    assert abs(ratio - tps["statistics"] / tps["forward"]) < 0.01
    assert list(result["stats_memory_bytes"]) == ["32", "128"]
    assert "folded ablation / eval" in capsys.readouterr().out
