"""Streaming statistics against numpy on the concatenated data; merging; the peak; file round trips."""

import json

import numpy as np
import pytest
import torch

import tiny
from knockout import KnockoutError, capture, collect_stats, find_sites
from knockout.data.text import causal_batches
from knockout.stats import HistGrid, LayerStats, Statistics
from knockout.stats.running import merge_moments

EPS = 0.05


def _off_edge_data(n, width, seed, eps=EPS):
    """Values (k + u) * eps with u in [0.1, 0.9]: never within float error of a bin edge."""
    g = np.random.default_rng(seed)
    k = np.round(g.standard_normal((n, width)) * 20 + g.integers(-30, 30, size=width)).astype(np.int64)
    # one bimodal neuron and one skewed neuron
    k[:, 0] = np.where(g.random(n) < 0.4, -40, 25) + g.integers(-2, 3, size=n)
    k[:, 1] = np.round(g.exponential(8, size=n)).astype(np.int64) + 5
    return (k + g.uniform(0.1, 0.9, size=(n, width))) * eps


def test_moments_equal_numpy_on_concatenated_batches():
    data = _off_edge_data(1000, 7, seed=0)
    stats = LayerStats(7, eps=EPS)
    for chunk in np.array_split(data, [13, 400, 401, 777]):
        stats.add(torch.from_numpy(chunk).float())
    data32 = data.astype(np.float32).astype(np.float64)  # what the model would have given
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean.numpy(), data32.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.var.numpy(), data32.var(0), rtol=1e-9)
    np.testing.assert_array_equal(stats.min.numpy(), data32.min(0))
    np.testing.assert_array_equal(stats.max.numpy(), data32.max(0))


def test_histogram_and_peak_equal_numpy_histogram_argmax():
    data = _off_edge_data(2000, 6, seed=1)
    stats = LayerStats(6, eps=EPS)
    stats.add(torch.from_numpy(data).float())
    edges = stats.bin_edges().numpy()
    for j in range(6):
        counts, np_edges = np.histogram(data[:, j], bins=edges)
        np.testing.assert_array_equal(stats.hist[j].numpy(), counts)
        expected_peak = (np_edges[counts.argmax()] + np_edges[counts.argmax() + 1]) / 2
        assert stats.peak()[j].item() == pytest.approx(expected_peak, abs=1e-9)
    # the bimodal neuron's peak is at its larger mode, far from its mean
    assert abs(stats.peak()[0].item() - 25.5 * EPS) < 3 * EPS
    assert abs(stats.peak()[0].item() - stats.mean[0].item()) > 20 * EPS


def test_bins_are_aligned_to_multiples_of_eps():
    stats = LayerStats(1, eps=0.25)
    stats.add(torch.tensor([[0.1], [0.2], [-0.1], [0.26], [0.3]]))
    assert stats.k_lo == -1
    assert stats.hist[0].tolist() == [1, 2, 2]  # [-0.25,0) [0,0.25) [0.25,0.5)
    assert stats.peak()[0].item() == 0.125  # first of the tied maxima, as numpy.argmax


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_of_random_splits_equals_one_pass(seed):
    g = np.random.default_rng(seed)
    data = _off_edge_data(900, 5, seed=seed + 10)
    data[g.random(900) < 0.01, 2] = 50.0  # some values beyond the limit
    one = Statistics([5], eps=EPS, limit=20.0)
    one.add(0, torch.from_numpy(data).float())
    cuts = np.sort(g.choice(np.arange(1, 900), size=3, replace=False))
    parts = []
    for chunk in np.split(data, cuts):
        part = Statistics([5], eps=EPS, limit=20.0)
        part.add(0, torch.from_numpy(chunk).float())
        parts.append(part)
    merged = Statistics([5], eps=EPS, limit=20.0)
    for part in parts[::-1]:  # order does not matter
        merged.merge(part)
    a, b = one.layers[0], merged.layers[0]
    assert a.count == b.count and a.k_lo == b.k_lo
    assert torch.equal(a.hist, b.hist) and torch.equal(a.under, b.under) and torch.equal(a.over, b.over)
    assert torch.equal(a.min, b.min) and torch.equal(a.max, b.max)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.m2, b.m2, rtol=1e-10, atol=1e-10)
    assert torch.equal(a.peak(), b.peak())


def test_values_outside_the_window_are_counted_not_binned():
    stats = LayerStats(2, eps=0.1, limit=1.0)
    stats.add(torch.tensor([[0.05, -5.0], [0.06, 3.0], [2.0, 0.5], [-1.0, 0.55]]))
    assert stats.over.tolist() == [1, 1] and stats.under.tolist() == [0, 1]
    assert int(stats.hist.sum()) == 5  # 8 values, 3 outside [-1, 1); -1.0 itself is inside
    assert stats.hist[0, -10 - stats.k_lo] == 1  # -1.0 in bin -10 = [-1.0, -0.9)
    assert stats.clipped_fraction == pytest.approx(3 / 8)
    assert stats.k_lo + stats.n_bins - 1 <= stats.k_max


def _counts_equal_numpy(stats, batches, eps, limit) -> dict:
    """Assert the stored bins, under and over equal numpy's counts of the concatenated batches; numpy's counts."""
    want = _numpy_reference(batches, eps, limit, stats.k_min, stats.k_max)
    assert stats.k_lo == want["k_lo"]
    np.testing.assert_array_equal(stats.hist.numpy(), want["hist"])
    np.testing.assert_array_equal(stats.under.numpy(), want["under"])
    np.testing.assert_array_equal(stats.over.numpy(), want["over"])
    return want


def _numpy_reference(batches: list[torch.Tensor], eps: float, limit: float, k_min: int, k_max: int) -> dict:
    """What ``LayerStats.add`` of ``batches`` must give, from the concatenated data in numpy: the bin of a value is
    floor(x / eps) in the dtype ``add`` works in (float32 for half precision, widened exactly), moments in float64."""
    arrays = [(b.float() if b.dtype in (torch.float16, torch.bfloat16) else b).numpy() for b in batches]
    # whole numbers, exact also beyond int64; each batch binned in its own dtype
    k = np.concatenate([np.floor(a / a.dtype.type(eps)).astype(np.float64) for a in arrays])
    data = np.concatenate(arrays)
    inside = (k >= k_min) & (k <= k_max)
    lo, hi = int(k[inside].min()), int(k[inside].max())
    hist = np.stack([np.bincount((c[ok] - lo).astype(np.int64), minlength=hi - lo + 1) for c, ok in zip(k.T, inside.T)])
    d64 = data.astype(np.float64)
    return {
        "count": data.shape[0],
        "k_lo": lo,
        "hist": hist,
        "under": (k < k_min).sum(0),
        "over": (k > k_max).sum(0),
        "min": d64.min(0),
        "max": d64.max(0),
        "mean": d64.mean(0),
        "var": d64.var(0),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_add_equals_numpy_over_batches_that_grow_and_clip(dtype):
    """Counts, under/over, min/max exactly and moments closely equal numpy on the concatenated data, over batches
    whose bins grow on both sides, that fall partly or wholly outside the window, that are empty, or sit on edges."""
    eps, limit, width = 0.01, 2.0, 6
    g = torch.Generator().manual_seed(5)
    batches = [
        torch.randn(300, width, generator=g) * 0.3,  # the first bins
        torch.randn(0, width),  # nothing
        torch.randn(200, width, generator=g) * 0.8 + 0.4,  # the stored bins grow on both sides
        torch.randn(150, width, generator=g) * 3.0,  # partly beyond ±limit: under / over, and growth
        torch.full((3, width), 7.0) * torch.tensor([[1.0], [-1.0], [1.0]]),  # wholly outside the window
        torch.randint(-250, 250, (80, width), generator=g) * eps,  # on (rounded) bin edges, some outside
        torch.tensor([[-limit, limit, limit - eps / 2, -limit - eps / 2, 0.0, -0.0]]),  # the window's own edges
    ]
    batches = [b.to(dtype) for b in batches]
    stats = LayerStats(width, eps=eps, limit=limit)
    for b in batches:
        stats.add(b)
    want = _numpy_reference(batches, eps, limit, stats.k_min, stats.k_max)
    assert stats.count == want["count"] and stats.k_lo == want["k_lo"]
    np.testing.assert_array_equal(stats.hist.numpy(), want["hist"])
    np.testing.assert_array_equal(stats.under.numpy(), want["under"])
    np.testing.assert_array_equal(stats.over.numpy(), want["over"])
    assert int(stats.under.sum() + stats.over.sum() + stats.hist.sum()) == want["count"] * width
    np.testing.assert_array_equal(stats.min.numpy(), want["min"])
    np.testing.assert_array_equal(stats.max.numpy(), want["max"])
    np.testing.assert_allclose(stats.mean.numpy(), want["mean"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.var.numpy(), want["var"], rtol=1e-10)


def test_moments_are_exact_to_float64_rounding_also_far_from_zero():
    """A batch's moments are two float64 passes (mean, then squared deviations): against exact rational arithmetic
    (``fractions``) they are right to float64 rounding, also for a neuron whose mean is 10^4 of its std, where
    the one-pass sum-of-squares formula loses every digit. The input is not changed (a float64 batch too)."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1e-3, 2.0, 1e-2])
    x = x + torch.tensor([0.0, 10.0, -5.0, 1e2])
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        batch = x.to(dtype)
        before = batch.clone()
        stats = LayerStats(4, eps=0.01, limit=200.0)
        stats.add(batch[:100])
        stats.add(batch[100:])
        assert torch.equal(batch, before)
        for j in range(4):
            col = [Fraction(v) for v in batch[:, j].double().tolist()]
            mean = sum(col) / len(col)
            var = sum((v - mean) ** 2 for v in col) / len(col)
            assert abs(float(stats.mean[j]) - float(mean)) <= 4e-16 * max(abs(float(mean)), 1e-300)
            assert abs(float(stats.var[j]) - float(var)) <= 1e-12 * float(var)


def test_values_beyond_the_integer_range_of_their_bin_are_clipped():
    """x / eps beyond int64 (or inf in float32) still counts as below / above the window."""
    stats = LayerStats(2, eps=0.01, limit=1.0)
    stats.add(torch.tensor([[1e30, 0.5], [-1e30, 3e38], [0.25, -3e38], [0.25, 1e17]]))
    assert stats.over.tolist() == [1, 2] and stats.under.tolist() == [1, 1]
    assert stats.hist.sum(1).tolist() == [2, 1] and (stats.k_lo, stats.n_bins) == (25, 26)


def test_indices_in_float_and_in_integers_agree():
    """Flat bin indices are formed in float where exact, else in an integer type (very wide layers): the same
    indices, int32 where they fit."""
    k = torch.randint(-30, 30, (400, 5))
    offsets = torch.arange(5) * 60 + 30
    want = k + offsets
    for dtype in (torch.float32, torch.float64, torch.int64):
        got = LayerStats._indices(k.to(dtype), offsets, 400)
        assert got.dtype == torch.int32 and torch.equal(got.long(), want)
    assert LayerStats._indices(k.float(), offsets, 2**31).dtype == torch.int64
    assert torch.equal(LayerStats._indices(k.float(), offsets, 2**25), want.int())  # beyond float32's exact range
    # float32 up to 2**22, read from the bits of k + offsets + 1.5 * 2**23: also at the ends of that range
    k = torch.tensor([[-(2.0**21), 2.0**21 - 1, 0.0, -1.0, 5.0]])
    offsets = torch.tensor([-(2**21), 2**21, 0, -(2**22 - 1), 2**22 - 6])
    got = LayerStats._indices(k.clone(), offsets, 2**22)
    assert got.dtype == torch.int32 and got.tolist() == [[-(2**22), 2**22 - 1, 0, -(2**22), 2**22 - 1]]


def test_memory_does_not_grow_with_tokens():
    stats = LayerStats(16, eps=0.01)
    stats.add(torch.randn(1000, 16).clamp(-3, 3))
    size = sum(t.numel() for t in (stats.hist, stats.mean, stats.m2, stats.min, stats.max))
    for _ in range(5):
        stats.add(torch.randn(1000, 16).clamp(-3, 3))
    assert stats.count == 6000
    assert sum(t.numel() for t in (stats.hist, stats.mean, stats.m2, stats.min, stats.max)) == size


def test_bad_input_errors():
    with pytest.raises(KnockoutError, match="NaN"):
        LayerStats(2).add(torch.tensor([[1.0, float("nan")]]))
    for eps in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(KnockoutError, match="eps"):
            LayerStats(2, eps=eps)
    with pytest.raises(KnockoutError, match="limit"):
        Statistics([2], eps=0.1, limit=0.01)
    with pytest.raises(KnockoutError, match="merge"):
        Statistics([2], eps=0.1).merge(Statistics([2], eps=0.2))
    with pytest.raises(KnockoutError, match="empty"):
        LayerStats(2).peak()


def test_the_grid_is_checked_once_where_it_is_made(monkeypatch):
    """A grid with a bad eps or limit is refused where it is made (a LayerStats built directly makes its own);
    Statistics makes one, checked once, and its layers share it."""
    from knockout.stats import running

    for eps in (0, -0.1, float("nan"), float("inf"), "0.01"):
        with pytest.raises(KnockoutError, match="eps"):
            HistGrid(eps)
    with pytest.raises(KnockoutError, match="limit"):
        LayerStats(2, eps=0.1, limit=float("inf"))
    with pytest.raises(KnockoutError, match="histogram bins per neuron"):
        Statistics([2], eps=1e-9, limit=20.0)
    with pytest.raises(TypeError, match="not both"):
        LayerStats(2, eps=0.1, grid=HistGrid())
    checks = []
    real = running.check_hist_params
    monkeypatch.setattr(running, "check_hist_params", lambda *a: checks.append(a) or real(*a))
    stats = Statistics([3, 4, 5], eps=0.05, limit=2)
    assert checks == [(0.05, 2)] and all(layer.grid is stats.grid for layer in stats.layers)
    assert (stats.eps, stats.limit, stats.layers[1].eps, stats.layers[1].limit) == (0.05, 2.0, 0.05, 2.0)
    assert (stats.grid.k_min, stats.grid.k_max) == (-40, 39) == (stats.layers[0].k_min, stats.layers[0].k_max)


def test_save_load_round_trip_and_model_check(tmp_path):
    stats = Statistics([4, 4], eps=EPS, meta={"model": json.dumps({"name": "a", "widths": [4, 4]})})
    for layer in range(2):
        stats.add(layer, torch.from_numpy(_off_edge_data(300, 4, seed=layer)).float())
    stats.save(tmp_path / "s.safetensors")
    back = Statistics.load(tmp_path / "s.safetensors")
    assert back.eps == EPS and back.widths == [4, 4] and back.n_tokens == 300
    for a, b in zip(stats.layers, back.layers):
        assert torch.equal(a.hist, b.hist) and torch.equal(a.mean, b.mean) and a.k_lo == b.k_lo
        assert torch.equal(a.peak(), b.peak())
    back.check_model({"name": "a", "widths": [4, 4]})
    with pytest.raises(KnockoutError, match="different model"):
        back.check_model({"name": "b", "widths": [4, 4]})
    with pytest.raises(KnockoutError, match="does not exist"):
        Statistics.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(KnockoutError, match="not a readable"):
        Statistics.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(KnockoutError, match="not a knockout statistics file"):
        Statistics.load(tmp_path / "other.safetensors")


def test_collect_stats_excludes_padding_and_equals_manual_capture():
    model = tiny.causal_lm("llama")
    sites = find_sites(model)
    seqs = [list(range(5, 5 + n)) for n in (9, 4, 7, 2, 6)]
    batches = causal_batches(seqs, batch_size=3, pad=0)
    stats = collect_stats(model, sites, batches, eps=0.01, progress=False)
    # independent: each sequence alone, no padding, activations concatenated
    rows = {s.layer: [] for s in sites}
    with torch.no_grad(), capture(sites, lambda s, z: rows[s.layer].append(z[0])):
        for seq in seqs:
            model(input_ids=torch.tensor([seq]))
    for s in sites:
        data = torch.cat(rows[s.layer]).double()
        assert stats.layers[s.layer].count == sum(map(len, seqs)) == data.shape[0]
        torch.testing.assert_close(stats.layers[s.layer].mean, data.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stats.layers[s.layer].max, data.max(0).values, atol=1e-6, rtol=1e-5)


def test_stats_skip_first_leaves_out_the_first_positions(tmp_path):
    from knockout.config import SweepConfig
    from knockout.data.tasks import ModelInputs, stats_batches
    from knockout.loading import LoadedModel

    model = tiny.causal_lm("llama")
    sites = find_sites(model)
    corpus = tiny.write_corpus(tmp_path / "c.txt")
    loaded = LoadedModel(model, tiny.tokenizer(), "causal", "tiny", torch.device("cpu"))
    cfg = SweepConfig(model="tiny", data=corpus, stats_tokens=300, stats_skip_first=2, max_length=30)
    batches = stats_batches(cfg.data_spec(), ModelInputs(loaded.task, loaded.processor, model.config))
    stats = collect_stats(model, sites, batches, progress=False)
    assert stats.n_tokens == 300
    # independent: each sequence alone, positions 2.. only
    kept = []
    with torch.no_grad(), capture(sites[:1], lambda s, z: kept.append(z[0, 2:])):
        for b in batches:
            for ids, mask in zip(b.inputs["input_ids"], b.inputs["attention_mask"]):
                model(input_ids=ids[mask.bool()][None])
    data = torch.cat(kept).double()
    assert data.shape[0] == 300
    torch.testing.assert_close(stats.layers[0].mean, data.mean(0), atol=1e-6, rtol=1e-5)
    with pytest.raises(KnockoutError, match="stats_skip_first"):
        SweepConfig(model="tiny", stats_skip_first=-1)


def _aligned(hist: torch.Tensor, k_lo: int, lo: int, hi: int) -> torch.Tensor:
    """``hist`` (first column bin ``k_lo``) on the bins ``lo..hi``."""
    out = torch.zeros(hist.shape[0], hi - lo + 1, dtype=hist.dtype)
    out[:, k_lo - lo : k_lo - lo + hist.shape[1]] = hist
    return out


def test_collected_statistics_merge_and_extend():
    """``collect_stats`` runs the model in inference mode; its result must still merge and grow afterwards (its
    tensors are ordinary ones: inference tensors would refuse ``merge``/``add`` outside inference mode)."""
    model = tiny.causal_lm("llama")
    sites = find_sites(model)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(5, tiny.VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(4, 20, (9,))]
    batches = causal_batches(seqs, 3, pad=0)
    first = collect_stats(model, sites, batches[:1], eps=0.01, progress=False)
    rest = collect_stats(model, sites, batches[1:], eps=0.01, progress=False)
    whole = collect_stats(model, sites, batches, eps=0.01, progress=False)
    first.merge(rest)
    for mine, ref in zip(first.layers, whole.layers):
        assert mine.count == ref.count
        lo, hi = min(mine.k_lo, ref.k_lo), max(mine.k_lo + mine.n_bins, ref.k_lo + ref.n_bins) - 1
        assert torch.equal(_aligned(mine.hist, mine.k_lo, lo, hi), _aligned(ref.hist, ref.k_lo, lo, hi))
        assert torch.equal(mine.min, ref.min) and torch.equal(mine.max, ref.max)
        torch.testing.assert_close(mine.mean, ref.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mine.var, ref.var, rtol=1e-10, atol=1e-12)
    extra = torch.randn(5, sites[0].width)
    before = whole.layers[0].count
    whole.add(0, extra)  # extending collected statistics with more data
    assert whole.layers[0].count == before + 5


@pytest.mark.parametrize("limit", ["auto", 2.0])
def test_collect_stats_into_extends_and_sync_free_collection_is_the_same(limit):
    """``into`` continues a collection: batch 1, then batches 2.. into it, equals one sequential pass over all
    batches bit for bit; so does a pass whose layers count sync-free (the accelerator path, forced on the CPU: with
    a window of ±2 over one buffer, with the auto window a batch late). A collection from scratch (two halves,
    merged at the end) has the same histograms, counts, minima and maxima, and the same moments up to float64
    rounding."""
    model = tiny.causal_lm("llama")
    sites = find_sites(model)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(5, tiny.VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(4, 20, (7,))]
    batches = causal_batches(seqs, 3, pad=0)
    widths = [s.width for s in sites]
    sequential = collect_stats(model, sites, batches, progress=False, into=Statistics(widths, 0.01, limit))
    whole = collect_stats(model, sites, batches, eps=0.01, limit=limit, progress=False)
    assert whole.half_centres is not None and sequential.half_centres is None
    part = collect_stats(model, sites, batches[:1], eps=0.01, limit=limit, progress=False)
    assert collect_stats(model, sites, batches[1:], progress=False, into=part) is part
    assert part.half_centres is None  # they would no longer describe the data
    free = Statistics(widths, eps=0.01, limit=limit)
    for layer in free.layers:
        layer.sync_free = True
    collect_stats(model, sites, batches, progress=False, into=free)
    assert free.layers[0]._pending is None and free.layers[0]._buf is None  # finished
    for other in (part, free, whole):
        for a, b in zip(other.layers, sequential.layers):
            sa, sb = a.state_dict(), b.state_dict()
            exact = [k for k in sb if other is not whole or k not in ("mean", "m2")]
            assert all(torch.equal(sa[k], sb[k]) for k in exact)
            torch.testing.assert_close(sa["mean"], sb["mean"], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(sa["m2"], sb["m2"], rtol=1e-12, atol=1e-15)
    with pytest.raises(KnockoutError, match="widths"):
        collect_stats(model, sites[:1], batches, progress=False, into=whole)


def _heavy_batches(width: int, seed: int) -> list[torch.Tensor]:
    """Heavy-tailed batches whose neurons span very different ranges (a few 'massive' neurons reach the hundreds),
    some values beyond a window of ±200, some batches empty, every neuron's range widening batch after batch."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(width)
    scale[:2] = 60.0  # massive dimensions
    scale[2] = 0.02  # a neuron that stays within a few bins
    out = []
    for i, n in enumerate([50, 0, 200, 7, 400, 120]):
        tail = torch.rand(n, width, generator=g).clamp(min=0.3)
        tail[:, :2] = tail[:, :2].clamp(min=0.05)  # heavier tails for the massive ones
        x = torch.randn(n, width, generator=g) / tail * scale * (1 + i / 2)
        out.append(x)
    out.append(torch.tensor([[250.0, -250.0] + [0.5] * (width - 2)]))  # outside the window
    return out


def test_per_neuron_histogram_equals_numpy_and_stores_only_each_neurons_bins():
    """The histogram over each neuron's own range: its table equals numpy's bincount of floor(x / eps) over the
    layer's range, each neuron stores exactly the bins from its lowest to its highest value inside the window, the
    peak is the centre of numpy's argmax (lowest on ties), and the memory follows the neurons' own ranges."""
    width, eps, limit = 9, 0.01, 200.0
    batches = _heavy_batches(width, seed=11)
    stats = LayerStats(width, eps=eps, limit=limit)
    for b in batches:
        stats.add(b)
    stats.finish()
    want = _counts_equal_numpy(stats, batches, eps, limit)
    hist = want["hist"]
    nz = hist != 0
    first, last = nz.argmax(1), hist.shape[1] - 1 - nz[:, ::-1].argmax(1)
    state = stats.state_dict()
    np.testing.assert_array_equal(state["hist_lo"].numpy(), want["k_lo"] + first)
    np.testing.assert_array_equal(state["hist_bins"].numpy(), last - first + 1)
    assert state["hist"].numel() == int((last - first + 1).sum()) < hist.size / 3  # not width x the widest range
    assert stats.counts.dtype == torch.int32 and state["hist"].dtype == stats.hist.dtype == torch.int64
    assert stats.hist_nbytes == 4 * state["hist"].numel() + 32 * width  # int32 counts on a CPU
    peaks = (want["k_lo"] + hist.argmax(1) + 0.5) * eps
    np.testing.assert_array_equal(stats.peak().numpy(), peaks)


def _torch_order_sum(d: np.ndarray) -> np.ndarray:
    """Column sums of float64 ``d: [n, width]`` added in the order of torch's CPU ``multi_row_sum``
    (ATen/native/cpu/SumKernel.cpp): runs of 2**p rows into level 0, each level flushed into the next in cascade."""
    n = len(d)
    p = max(4, (1 if n <= 2 else (n - 1).bit_length()) // 4)
    step, mask = 1 << p, (1 << p) - 1
    acc = np.zeros((4, d.shape[1]))
    i = 0
    while i + step <= n:
        for _ in range(step):
            acc[0] += d[i]
            i += 1
        for level in range(1, 4):
            acc[level] += acc[level - 1]
            acc[level - 1] = 0.0
            if i & (mask << (level * p)):
                break
    for r in range(i, n):
        acc[0] += d[r]
    for level in range(1, 4):
        acc[0] += acc[level]
    return acc[0]


@pytest.mark.parametrize("width", [576, 100, 97])
@pytest.mark.parametrize("eps", [1.0, 0.0005])
def test_cpu_passes_equal_numpy_and_torch(width, eps):
    """On a CPU a batch is read by the two compiled passes of knockout.stats.kernels: the histogram, under/over
    and the peaks equal numpy's on the concatenated data, over batches that grow the stored bins, that clip, that
    are half precision and that sit on bin edges; the moments equal each batch's float64 sums added in torch's
    order (mean = sum / n, then the squared deviations summed), merged batch by batch; where torch's own loop adds
    every neuron that way (576 neurons, one thread), they equal torch's sums bit for bit."""
    limit = 8.0
    g = torch.Generator().manual_seed(width)
    batches = [
        torch.randn(1024, width, generator=g),
        torch.randn(257, width, generator=g) * 1.5 + 0.2,  # the stored bins grow
        (torch.randn(64, width, generator=g) * 1.2).half(),
        torch.randn(33, width, generator=g) * 3.0,  # partly outside the window
        (torch.randn(1, width, generator=g)).bfloat16(),
        torch.randint(-80, 80, (90, width), generator=g) * eps,  # on (rounded) bin edges
        torch.randn(70000 if width == 97 else 5, width, generator=g),  # a long batch: runs of 16 rows
        torch.randn(40, width, generator=g, dtype=torch.float64) * 2,  # binned in float64
    ]
    stats = LayerStats(width, eps=eps, limit=limit)
    state = (0, torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for b in batches:
            stats.add(b)
            d = b.to(torch.float64).numpy()
            mean_b = _torch_order_sum(d) / len(d)
            m2_b = _torch_order_sum(np.square(d - mean_b))
            if width == 576:
                t = torch.from_numpy(d)
                assert np.array_equal(t.sum(0).numpy() / len(d), mean_b)
                assert np.array_equal((t - torch.from_numpy(mean_b)).square().sum(0).numpy(), m2_b)
            state = merge_moments(*state, len(d), torch.from_numpy(mean_b), torch.from_numpy(m2_b))
    finally:
        torch.set_num_threads(threads)
    stats.finish()
    want = _counts_equal_numpy(stats, batches, eps, limit)
    np.testing.assert_array_equal(stats.peak().numpy(), (want["k_lo"] + want["hist"].argmax(1) + 0.5) * eps)
    assert stats.count == state[0] and torch.equal(stats.mean, state[1]) and torch.equal(stats.m2, state[2])


def test_counts_are_int32_on_a_cpu_until_a_bin_could_reach_2_31():
    """On a CPU the counts are int32 while no bin can reach 2**31 (at most every value of a neuron in one bin), and
    become int64 before a batch that could; files, hist and merges see the same counts either way, also when an
    int32 and an int64 histogram are merged (both ways) and when the accelerators' path adds to int32 counts."""
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(100, 6, generator=g) for _ in range(4)]
    ref = LayerStats(6, eps=0.01, limit=5.0)
    for b in batches:
        ref.add(b)
    assert ref.counts.dtype == torch.int32
    big = LayerStats(6, eps=0.01, limit=5.0)
    big.add(batches[0])
    big.count += 2**31 - 150  # as if it had seen that many values: the next batch could fill a bin past 2**31
    big.add(batches[1])
    assert big.counts.dtype == torch.int64
    big.count -= 2**31 - 150
    for b in batches[2:]:
        big.add(b)
    assert torch.equal(big.hist, ref.hist) and torch.equal(big.state_dict()["hist"], ref.state_dict()["hist"])
    for first, second in ((big, ref), (ref, big)):
        a, b = LayerStats(6, eps=0.01, limit=5.0), LayerStats(6, eps=0.01, limit=5.0)
        a.load_state_dict(first.state_dict())
        a._fit_counts(0, narrow=first is ref)
        b.load_state_dict(second.state_dict())
        b._fit_counts(0, narrow=second is ref)
        a.merge(b)
        assert torch.equal(a.hist, 2 * ref.hist)
    torch_path = LayerStats(6, eps=0.01, limit=5.0)
    torch_path.add(batches[0])
    torch_path.sync_free = False  # torch operations with reads, as on an accelerator, on int32 counts
    for b in batches[1:]:
        torch_path.add(b)
    assert torch_path.counts.dtype == torch.int32 and torch.equal(torch_path.hist, ref.hist)


def test_float64_sums_that_overflow_are_not_taken_for_nan_and_integers_are_refused():
    """Finite float64 values near the largest overflow their sums (inf - inf: NaN): not an error, the same state as
    torch's operations give (the values counted below and above the window; mean and m2 overflowed in both, each
    adding in its own order); integer activations are refused."""
    x = torch.cat([torch.full((16, 3), 1e308, dtype=torch.float64), torch.full((16, 3), -1e308, dtype=torch.float64)])
    x[5, 1] = 0.5
    cpu, ref = LayerStats(3, eps=0.01, limit=5.0), LayerStats(3, eps=0.01, limit=5.0, sync_free=False)
    cpu.add(x)
    ref.add(x)
    got = cpu.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items() if k not in ("mean", "m2"))
    assert not got["mean"].isfinite().any() and not ref.mean.isfinite().any()
    assert cpu.over.tolist() == [16, 15, 16] and int(cpu.hist.sum()) == 1
    with pytest.raises(KnockoutError, match="floating-point"):
        LayerStats(3).add(torch.ones(4, 3, dtype=torch.int64))


def test_cpu_sums_follow_torchs_order_beyond_a_million_rows():
    """Above 2**20 rows a batch's sums run in chunks of 32 rows (torch's level power grows with the rows): the
    mean and m2 of one such batch equal torch's own sums, where its loop adds every neuron that way (32 neurons,
    one thread)."""
    n, width = 2**20 + 17, 32
    x = torch.randn(n, width, generator=torch.Generator().manual_seed(3)) * 3 + 1
    stats = LayerStats(width, eps=0.01, limit=40.0)
    stats.add(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = x.double()
        mean = d.sum(0) / n
        m2 = (d - mean).square().sum(0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(stats.mean, mean) and torch.equal(stats.m2, m2)
    assert int(stats.hist.sum()) == n * width


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_batch_with_nan_or_inf_changes_nothing(dtype):
    """A batch holding NaN or inf anywhere is refused with one error, and leaves the statistics as they were: also
    one whose other values would grow the stored bins or fall outside the window."""
    g = torch.Generator().manual_seed(5)
    stats = LayerStats(8, eps=0.01, limit=10.0)
    stats.add(torch.randn(300, 8, generator=g).to(dtype))
    before = {k: v.clone() for k, v in stats.state_dict().items()}
    for bad in (float("nan"), float("inf"), -float("inf")):
        for spread in (1.0, 4.0, 30.0):  # inside the stored bins; growing them; outside the window
            x = (torch.randn(200, 8, generator=g) * spread).to(dtype)
            x[150, 5] = bad
            with pytest.raises(KnockoutError, match="NaN"):
                stats.add(x)
            after = stats.state_dict()
            assert all(torch.equal(after[k], before[k]) for k in before), (bad, spread)


def _table_state(stats: LayerStats) -> dict[str, torch.Tensor]:
    """``stats``'s state as statistics files of format knockout.stats/1 hold it: one [width, n_bins] table."""
    state = {name: getattr(stats, name).clone() for name in LayerStats.TENSORS}
    state.update(count=torch.tensor([stats.count]), hist=stats.hist.clone(), k_lo=torch.tensor([stats.k_lo]))
    return state


def test_merges_halves_round_trips_and_old_tables_are_exact(tmp_path):
    """Statistics of random splits of the data, merged, equal one pass bit for bit (histogram, under/over, min,
    max); the state round-trips; a state as the old table (``hist`` [width, n_bins] from ``k_lo``) loads to the
    same statistics, also from a file of the old format; and the two halves of a collection merge exactly."""
    width, eps, limit = 9, 0.01, 200.0
    batches = _heavy_batches(width, seed=12)
    whole = LayerStats(width, eps=eps, limit=limit)
    for b in batches:
        whole.add(b)
    g = torch.Generator().manual_seed(0)
    parts = [LayerStats(width, eps=eps, limit=limit) for _ in range(3)]
    for b in batches:
        parts[int(torch.randint(0, 3, (1,), generator=g))].add(b)
    parts[2].merge(parts[0])
    parts[1].merge(parts[2])
    exact = ("hist", "hist_lo", "hist_bins", "under", "over", "min", "max", "count")
    sw, sm = whole.state_dict(), parts[1].state_dict()
    assert all(torch.equal(sw[k], sm[k]) for k in exact)
    assert torch.equal(whole.peak(), parts[1].peak())
    loaded = LayerStats(width, eps=eps, limit=limit)
    loaded.load_state_dict(sw)
    assert all(torch.equal(loaded.state_dict()[k], sw[k]) for k in sw)
    from_table = LayerStats(width, eps=eps, limit=limit)
    from_table.load_state_dict(_table_state(whole))
    assert all(torch.equal(from_table.state_dict()[k], sw[k]) for k in sw)
    assert torch.equal(from_table.hist, whole.hist) and from_table.k_lo == whole.k_lo
    # a statistics file of the old format, written as the old code wrote it
    from safetensors.torch import save_file

    from knockout.files import CHECKSUM_KEY, tensors_sha256
    from knockout.stats import statistics as statistics_module

    stats = Statistics([width], eps=eps, limit=limit)
    stats.layers[0] = whole
    path = tmp_path / "old.safetensors"
    tensors = {f"layer0.{k}": v.contiguous() for k, v in _table_state(whole).items()}
    meta = {"format": statistics_module.FORMAT_TABLE, "eps": repr(eps), "limit": repr(limit), "widths": "[9]"}
    meta[CHECKSUM_KEY] = tensors_sha256(tensors)
    save_file(tensors, str(path), metadata=meta)
    old = Statistics.load(path)
    assert all(torch.equal(old.layers[0].state_dict()[k], sw[k]) for k in sw)
    assert torch.equal(statistics_module.load_layer(path, 0).hist, whole.hist)
    # two halves of the data (even and odd batches), merged
    a, b = Statistics([width], eps=eps, limit=limit), Statistics([width], eps=eps, limit=limit)
    for i, batch in enumerate(batches):
        (a if i % 2 else b).add(0, batch)
    sh = a.merge(b).layers[0].state_dict()
    assert all(torch.equal(sh[k], sw[k]) for k in exact)


@pytest.mark.parametrize("late", [False, True])
def test_sync_free_per_neuron_histogram_equals_counting_with_reads(monkeypatch, late):
    """The accelerator paths (forced on the CPU: a whole-window buffer, or each batch counted one call late) store
    the same per-neuron histogram, under/over, extremes and count as the CPU's passes, on heavy-tailed data with
    massive neurons; their moments (torch's sums, which add a layer this narrow in another order) agree to float64
    rounding."""
    from knockout.stats import running

    if late:
        monkeypatch.setattr(running, "BUFFER_MAX_BYTES", 0)
    width = 9
    ref = LayerStats(width, eps=0.01, limit=200.0)
    free = LayerStats(width, eps=0.01, limit=200.0, sync_free=True)
    for b in _heavy_batches(width, seed=13):
        ref.add(b)
        free.add(b)
    free.finish()
    sr, sf = ref.state_dict(), free.state_dict()
    assert all(torch.equal(sr[k], sf[k]) for k in sr if k not in ("mean", "m2"))
    for k in ("mean", "m2"):
        torch.testing.assert_close(sf[k], sr[k], rtol=1e-13, atol=1e-300)
