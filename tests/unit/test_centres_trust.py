"""Centres you can trust: the auto histogram window, the collection's halves and how well they determine each centre,
and ``peak-smooth``, the peak that rounding of the activations cannot move."""

import math

import numpy as np
import pytest
import torch

import tiny
from knockout import MethodContext, NeuronSelection, collect_stats, edit_preout, evaluate, find_sites, get_method
from knockout.config import SweepConfig
from knockout.data.text import causal_batches
from knockout.hooks import capture
from knockout.stats import LayerStats, Statistics, centres
from knockout.stats.running import FIXED_LIMIT, auto_limit


def _batches(n_seqs: int, seed: int, batch_size: int = 4):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, tiny.VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(12, 30, (n_seqs,))]
    return causal_batches(seqs, batch_size, pad=0)


def _raw_preouts(model, sites, batches) -> list[np.ndarray]:
    """Per layer, every counted pre-out value (padding removed), as float32: what the statistics see."""
    out = {s.layer: [] for s in sites}
    rows = {}

    def keep(site, z):
        out[site.layer].append(z.flatten(0, 1)[rows["valid"]].float().numpy().copy())

    with torch.no_grad(), capture(sites, keep):
        for b in batches:
            rows["valid"] = b.valid.flatten()
            model(**b.inputs)
    return [np.concatenate(out[s.layer]) for s in sites]


# -- B: the auto window ------------------------------------------------------------------------------------------
def test_default_window_fits_a_neuron_far_outside_20():
    """A pre-out neuron living around +80 (the value projection's bias of one channel raised by 80): with the
    default settings nothing is clipped and its peak is numpy's histogram argmax on the raw values over the same
    grid; the old fixed window ±20 clips every one of its values."""
    model = tiny.causal_lm("qwen2")  # q/k/v projections with biases
    sites = find_sites(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.bias[3] += 80.0  # kv head 0, channel 3: pre-out neurons 3 and 8 + 3 (GQA)
    batches = _batches(24, seed=2)
    stats = collect_stats(model, sites, batches, progress=False)
    raw = _raw_preouts(model, sites, batches)
    assert stats.grid.auto and stats.limit == auto_limit(stats.widths, stats.eps) > 80
    for layer, (s, x) in enumerate(zip(stats.layers, raw)):
        assert s.count == len(x) and int((s.under + s.over).sum()) == 0
        far = [j for j in range(s.width) if x[:, j].min() > FIXED_LIMIT]
        assert 3 in far and 11 in far, (layer, far)
        edges = s.bin_edges().numpy()
        peaks = s.peak()
        for j in far:
            counts, _ = np.histogram(x[:, j].astype(np.float64), bins=edges)
            want = (edges[counts.argmax()] + edges[counts.argmax() + 1]) / 2
            assert float(peaks[j]) == pytest.approx(want, abs=1e-9)
            assert abs(want - x[:, j].mean()) < 5  # really a peak of this neuron, around +80
    fixed = collect_stats(model, sites, batches, limit=FIXED_LIMIT, progress=False)
    assert all(int(s.over[3]) == s.count for s in fixed.layers)  # the old window saw none of them


def test_auto_window_is_the_widest_that_fits_and_depends_on_widths_and_eps_only():
    from knockout.stats.running import HALVES, MAX_BINS_PER_NEURON, MAX_HIST_BYTES, hist_memory_bound

    for widths, eps in [([32, 32], 0.01), ([576] * 30, 0.01), ([11008] * 32, 0.01), ([64], 1e-5)]:
        limit = auto_limit(widths, eps)
        bins = round(2 * limit / eps)
        assert bins <= MAX_BINS_PER_NEURON and hist_memory_bound(widths, eps, "auto") <= MAX_HIST_BYTES
        wider = HALVES * 8 * sum(widths) * (bins + 2)
        assert bins + 2 > MAX_BINS_PER_NEURON or wider > MAX_HIST_BYTES  # two more bins would not fit


# -- A.1: the halves -----------------------------------------------------------------------------------------------
def test_half_centres_are_those_of_the_even_and_odd_batches_and_survive_a_file(tmp_path):
    """The halves' centres equal the centres of statistics collected on the even- and on the odd-numbered batches
    alone; they are saved, checksummed and loaded; centre_spread and centre_se follow from them."""
    model = tiny.causal_lm("llama")
    sites = find_sites(model)
    batches = _batches(30, seed=5)
    stats = collect_stats(model, sites, batches, progress=False)
    widths = [s.width for s in sites]
    even = collect_stats(model, sites, batches[0::2], progress=False, into=Statistics(widths, grid=stats.grid))
    odd = collect_stats(model, sites, batches[1::2], progress=False, into=Statistics(widths, grid=stats.grid))
    assert stats.half_tokens == (even.n_tokens, odd.n_tokens)
    path = tmp_path / "s.safetensors"
    stats.save(path)
    loaded = Statistics.load(path)
    for name in centres.HALF_CENTRES:
        spread = loaded.centre_spread(name)
        se = loaded.centre_se(name)
        for layer in range(len(sites)):
            a = centres.centre_values(even.layers[layer], (name,))[name]
            b = centres.centre_values(odd.layers[layer], (name,))[name]
            assert torch.equal(loaded.half_centres[layer][name], torch.stack([a, b])), name
            assert torch.equal(spread[layer], (a - b).abs())
            n_a, n_b = stats.half_tokens
            torch.testing.assert_close(se[layer], (a - b).abs() * math.sqrt(n_a * n_b) / (n_a + n_b))
    assert torch.equal(loaded.half_centres[0]["peak"][0], even.layers[0].peak().double())
    summary = loaded.centre_summary()
    assert set(summary) == set(centres.HALF_CENTRES) and summary["mean"]["ratio"] is None
    se, std = torch.cat(loaded.centre_se("peak")), torch.cat([s.std for s in loaded.layers])
    assert summary["peak"]["undetermined"] == int((se > 0.1 * std).sum())
    merged = Statistics.load(path).merge(even)
    assert merged.half_centres is None  # no longer describe the data


def test_half_se_is_half_the_difference_for_equal_halves_and_right_on_average():
    """``half_se``: |A - B| / 2 for equal halves; over many neurons of normal data its root mean square is the
    standard error of the mean over all values (sigma / sqrt(N))."""
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])
    assert torch.equal(centres.half_se(a, b, 10, 10), torch.tensor([0.5, 0.0]))
    g = torch.Generator().manual_seed(0)
    n, width = 400, 4000
    x = torch.randn(2 * n, width, generator=g, dtype=torch.float64)
    se = centres.half_se(x[:n].mean(0), x[n:].mean(0), n, n)
    assert float(se.square().mean().sqrt()) == pytest.approx(1 / math.sqrt(2 * n), rel=0.05)


# -- A.2: peak-smooth ---------------------------------------------------------------------------------------------
def test_one_value_across_a_bin_edge_moves_peak_far_and_peak_smooth_hardly():
    """Two modes 1.0 apart (bins -50 and 50) with the same count, an exact tie: ``peak`` takes the lower (numpy.argmax's
    rule). One more value 1e-6 below the upper modal bin's lower edge, or 1e-6 above it: ``peak`` moves by 1.0,
    ``peak-smooth`` (for which both cases put the upper mode ahead) by a small fraction of a bin."""
    eps = 0.01
    d = np.arange(-40, 41)
    shape = np.round(200 * np.exp(-0.5 * (d / 12.0) ** 2)).astype(np.int64)  # 200 at d = 0
    base = np.concatenate([np.repeat((c + d + 0.5) * eps, shape) for c in (-50, 50)])
    out = {}
    for name, extra in (("below", 0.5 - 1e-6), ("above", 0.5 + 1e-6)):
        s = LayerStats(1, eps=eps, limit=20.0)
        s.add(torch.from_numpy(np.r_[base, extra])[:, None])
        out[name] = (float(s.peak()[0]), float(centres.peak_smooth(s)[0]))
    assert out["below"][0] == pytest.approx(-0.495) and out["above"][0] == pytest.approx(0.505)  # peak: 1.0
    assert out["below"][1] == pytest.approx(0.505, abs=2 * eps)  # peak-smooth: the upper mode either way
    assert abs(out["above"][1] - out["below"][1]) < 0.1 * eps


def test_peak_smooth_is_the_maximum_of_the_smoothed_histogram():
    """Against an independent computation: the Gaussian-smoothed histogram evaluated on a fine grid (numpy),
    its maximum found by brute force, with the kernel of ``smooth_bandwidth``."""
    g = np.random.default_rng(3)
    data = np.stack(
        [g.normal(0.3, 0.4, 5000), g.gamma(2.0, 0.3, 5000), np.r_[g.normal(-1, 0.2, 3000), g.normal(1, 0.3, 2000)]], 1
    )
    s = LayerStats(3, eps=0.01, limit=20.0)
    s.add(torch.from_numpy(data))
    got = centres.peak_smooth(s).numpy()
    h = centres.smooth_bandwidth(s).numpy()
    assert (h >= 2 * s.eps).all()
    centres_ = (np.arange(s.n_bins) + s.k_lo + 0.5) * s.eps
    for j in range(3):
        grid = np.linspace(centres_[0], centres_[-1], 20001)
        w = s.hist[j].numpy().astype(np.float64)
        dens = (w[None, :] * np.exp(-0.5 * ((grid[:, None] - centres_[None, :]) / h[j]) ** 2)).sum(1)
        assert got[j] == pytest.approx(grid[dens.argmax()], abs=0.1 * s.eps)


def _ce_of(model, sites, stats, method, neurons, batches) -> float:
    m = get_method(method)(MethodContext(model, sites, stats))
    with m.ablate(neurons):
        return evaluate(model, batches).ce


def test_peak_smooth_row_does_not_move_when_the_activations_move_by_rounding():
    """Statistics collected twice on a tiny model (~3000 tokens), the second time with every pre-out multiplied by
    (1 + 1e-6 u), u standard normal (a capture-time hook): the ``peak-smooth`` row at 50% moves by less than 1e-3
    nats, while the ablation itself moves the CE by far more than that."""
    model = tiny.causal_lm("llama")
    with torch.no_grad():  # pre-outs of order 1 and logits that matter, so that both rounding and ablation show
        model.lm_head.weight *= 20
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight *= 10
    sites = find_sites(model)
    batches, held_out = _batches(150, seed=7), _batches(12, seed=8)
    neurons = NeuronSelection([s.width for s in sites], seed=0).at(0.5)
    stats = collect_stats(model, sites, batches, progress=False)
    g = torch.Generator().manual_seed(1)

    def jitter(site, z):
        return z * (1 + 1e-6 * torch.randn(z.shape, generator=g))

    with edit_preout(sites, jitter):
        jittered = collect_stats(model, sites, batches, progress=False)
    moved = sum(int((a.hist != b.hist).any(1).sum()) for a, b in zip(stats.layers, jittered.layers))
    assert moved > 0  # the jitter did move some values across bin edges
    base = evaluate(model, held_out).ce
    ce = {
        name: _ce_of(model, sites, st, "peak-smooth", neurons, held_out) for name, st in (("a", stats), ("b", jittered))
    }
    assert abs(ce["a"] - base) > 0.05  # the ablation matters
    assert abs(ce["a"] - ce["b"]) < 1e-3


def test_hist_limit_flag_takes_auto_or_a_number_and_auto_is_the_default(capsys):
    from knockout.cli import build_parser, main

    parser = build_parser()
    assert SweepConfig(model="m").hist_limit == "auto"
    assert parser.parse_args(["stats", "--model", "m", "--out", "x.safetensors"]).hist_limit is None  # the default
    args = parser.parse_args(["stats", "--model", "m", "--out", "x.safetensors", "--hist-limit", "30"])
    assert args.hist_limit == 30.0
    with pytest.raises(SystemExit) as exit_:
        main(["stats", "--model", "m", "--out", "x.safetensors", "--hist-limit", "wide"])
    assert exit_.value.code == 2
    assert "expected a number or 'auto'" in capsys.readouterr().err
