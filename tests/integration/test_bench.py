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


def test_benchmark_refuses_bad_arguments():
    import pytest
    import torch

    from knockout import KnockoutError

    loaded = LoadedModel(tiny.causal_lm("gpt2"), tiny.tokenizer(), "causal", "tiny-gpt2", torch.device("cpu"))
    for kwargs, message in [
        ({"batch_size": 0}, "batch size"),
        ({"seq_len": 0}, "sequence length"),
        ({"repeats": 0}, "repeats"),
        ({"seq_len": 100}, "exceeds the model's 64 positions"),
    ]:
        with pytest.raises(KnockoutError, match=message):
            run_benchmark(loaded, **{"batch_size": 2, "seq_len": 8, "repeats": 1, **kwargs})
