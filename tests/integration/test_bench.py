"""The benchmark runs on a tiny model and reports consistent figures (no timing assertions)."""

import json

import numpy as np
import pytest

import tiny
from knockout.bench import format_benchmark, run_benchmark
from knockout.cli import main
from knockout.loading import LoadedModel


def test_benchmark_reports_ratios_and_memory(tmp_path, capsys):
    import torch

    loaded = LoadedModel(tiny.causal_lm("llama"), tiny.tokenizer(), "causal", "tiny-llama", torch.device("cpu"))
    result = run_benchmark(loaded, batch_size=2, seq_len=16, repeats=2, progress=False, compare_tokens=500)
    modes = {"forward", "statistics", "statistics_first", "eval", "eval_folded", "eval_hooked_tl"}
    assert set(result["tokens_per_second"]) == modes
    assert all(v > 0 for v in result["tokens_per_second"].values())
    ratio = result["ratios"]["statistics_vs_forward"]
    tps = result["tokens_per_second"]
    assert abs(ratio - tps["statistics"] / tps["forward"]) < 0.01
    secs = result["seconds"]
    assert all(len(v) == 2 for v in secs.values())
    best = min(secs["forward"]) / min(secs["statistics"])
    assert result["ratios_fastest"]["statistics_vs_forward"] == pytest.approx(best, abs=2e-3)
    assert 0 < result["statistics_update_share"] < max(secs["statistics"]) / min(secs["forward"])
    # one batch; then the set-up, the warm-up and 2 rounds of the running statistics: 4 batches
    assert list(result["stats_memory_bytes"]) == ["32", "128"]
    a = result["authors_stats"]
    assert (a["tokens"], a["width"], a["drawn_from_tokens"]) == (500, 32, 32)
    assert a["speedup"] == pytest.approx(a["authors_seconds_per_layer"] / a["knockout_seconds_per_layer"], rel=0.05)
    assert a["memory_ratio"] == pytest.approx(a["authors_bytes"] / a["knockout_bytes"], rel=0.01)
    assert a["authors_bytes"] >= 500 * 32 * 4
    assert result["cpu"] and result["cpu"] in format_benchmark(result)
    w = result["width_cases"]
    assert (w["tokens"], w["width"]) == (32, 32)
    assert w["wide_vs_narrow"] == pytest.approx(
        w["wide"]["seconds_per_batch"] / w["narrow"]["seconds_per_batch"], rel=0.01
    )
    # the memory follows each neuron's own range: the wide case stores about 600 / eps bins per neuron, the massive
    # one 4 wide neurons and 4,092 narrow ones, far from a table over the layer's range
    assert w["narrow"]["hist_bytes"] < w["wide"]["hist_bytes"] <= 8 * 32 * 64_000 + 32 * 32
    assert w["massive"]["hist_bytes"] < w["massive"]["table_bytes"] / 50
    text = format_benchmark(result)
    assert "authors' method" in text and "500 tokens" in text and "±300" in text
    assert "folded ablation / eval" in text and f"{result['ratios']['statistics_vs_forward']:.3f}" in text


def test_authors_histograms_equal_numpy_per_neuron():
    from knockout.bench import authors_histograms

    acts = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    counts, edges = authors_histograms(acts, bins=10)
    for j in range(3):
        want, want_edges = np.histogram(acts[:, j], bins=10, range=(acts[:, j].min(), acts[:, j].max()))
        assert np.array_equal(counts[j], want) and np.allclose(edges[j], want_edges)


def test_bench_command_prints_and_writes_the_figures(tmp_path, capsys):
    model = tiny.save(tiny.causal_lm("llama"), "causal", tmp_path / "m")
    out = tmp_path / "b.json"
    args = [
        "-q",
        "bench",
        "--model",
        model,
        "--batch-size",
        "2",
        "--seq-len",
        "8",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert capsys.readouterr().out.strip() == format_benchmark(result)


def test_benchmark_refuses_bad_arguments():
    import pytest
    import torch

    from knockout import KnockoutError

    loaded = LoadedModel(tiny.causal_lm("gpt2"), tiny.tokenizer(), "causal", "tiny-gpt2", torch.device("cpu"))
    for kwargs, message in [
        ({"batch_size": 0}, "batch size"),
        ({"seq_len": 0}, "sequence length"),
        ({"repeats": 0}, "repeats"),
        ({"compare_tokens": 0}, "compare tokens"),
        ({"seq_len": 100}, "exceeds the model's 64 positions"),
    ]:
        with pytest.raises(KnockoutError, match=message):
            run_benchmark(loaded, **{"batch_size": 2, "seq_len": 8, "repeats": 1, **kwargs})
