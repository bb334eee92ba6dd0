"""LayerStats.add reads back from the device once per call, and its histogram is that of every value's own bin."""

from __future__ import annotations

import pytest
import torch

from knockout.stats import LayerStats


def _widened(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _reference_hist(x: torch.Tensor, eps: float, limit: float, k_lo: int, n_bins: int) -> torch.Tensor:
    """Per-neuron counts of floor(x / eps) (half precision widened to float32 as add does), value by value."""
    k = torch.floor(_widened(x) / eps).to(torch.int64)
    hist = torch.zeros(x.shape[1], n_bins, dtype=torch.int64)
    for j in range(x.shape[1]):
        for v in k[:, j].tolist():
            if k_lo <= v < k_lo + n_bins:
                hist[j, v - k_lo] += 1
    return hist


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_histogram_of_values_on_and_near_bin_edges(dtype):
    eps = 0.01
    g = torch.Generator().manual_seed(0)
    edges = (torch.randint(-50, 50, (40, 3), generator=g) * eps).to(dtype)  # values on (rounded) edges
    near = edges + torch.tensor(1e-3, dtype=dtype) * torch.randn(40, 3, generator=g).to(dtype)
    x = torch.cat([edges, near])
    s = LayerStats(3, eps=eps, limit=1.0)
    s.add(x[:30])
    s.add(x[30:])
    assert s.hist.sum() == x.numel() and int((s.under + s.over).sum()) == 0
    assert torch.equal(s.hist, _reference_hist(x, eps, 1.0, s.k_lo, s.n_bins))
    k = torch.floor(_widened(x) / eps).to(torch.int64)
    assert (s.k_lo, s.k_lo + s.n_bins - 1) == (int(k.min()), int(k.max()))
    assert s.mean.dtype == s.min.dtype == torch.float64 and s.hist.dtype == torch.int64


def test_one_host_read_per_add_without_clipping(monkeypatch):
    reads = []
    real = LayerStats._read_ends
    monkeypatch.setattr(LayerStats, "_read_ends", lambda self, ends: reads.append(1) or real(self, ends))
    s = LayerStats(4, eps=0.01, limit=5.0, sync_free=False)  # torch operations with reads, as on an accelerator
    cpu = LayerStats(4, eps=0.01, limit=5.0)  # the CPU's compiled passes read the batch where it is
    for seed in range(3):
        s.add(torch.randn(50, 4, generator=torch.Generator().manual_seed(seed)))
        cpu.add(torch.randn(50, 4, generator=torch.Generator().manual_seed(seed)))
    assert len(reads) == 3
    with pytest.raises(Exception, match="non-finite"):
        s.add(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    assert torch.equal(s.hist, cpu.hist) and torch.equal(s.min, cpu.min) and torch.equal(s.max, cpu.max)


def _batches(width: int, seed: int = 7) -> list[torch.Tensor]:
    """Batches whose bins grow on both sides, fall partly or wholly outside ±2, sit on edges, or are empty."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(120, width, generator=g) * 0.3,
        torch.randn(0, width),
        torch.randn(90, width, generator=g) * 0.8 + 0.4,
        torch.randn(60, width, generator=g) * 3.0,
        torch.full((2, width), 7.0) * torch.tensor([[1.0], [-1.0]]),
        torch.randint(-250, 250, (40, width), generator=g) * 0.01,
    ]


def _assert_same_state(a: LayerStats, b: LayerStats) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


class _NoHostReads:
    """Every way a tensor's value reaches Python raises inside this context (on a GPU each would wait for it)."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")

    def __enter__(self):
        def refuse(*args, **kwargs):
            raise AssertionError("a value was read back to the host")

        self.patch = pytest.MonkeyPatch()  # its own, so that leaving undoes only these
        for name in self.NAMES:
            self.patch.setattr(torch.Tensor, name, refuse)
        self.patch.setattr(torch, "nonzero", refuse)

    def __exit__(self, *exc):
        self.patch.undo()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sync_free_counting_reads_nothing_back_and_equals_counting_with_reads(dtype):
    """``sync_free`` (the default on accelerators, forced here on the CPU) reads no value back in ``add``; after
    ``finish`` every field equals counting with reads bit for bit, also when the two are mixed and when data is
    merged in between."""
    width = 5
    batches = [b.to(dtype) for b in _batches(width)]
    ref = LayerStats(width, eps=0.01, limit=2.0, sync_free=False)  # counting with reads
    for b in batches:
        ref.add(b)
    free = LayerStats(width, eps=0.01, limit=2.0, sync_free=True)
    with _NoHostReads():
        for b in batches:
            free.add(b)
    # before finish the fields read the whole window: the same counts, the same peak
    assert torch.equal(free.hist.sum(1), ref.hist.sum(1)) and free.n_bins == free.k_max - free.k_min + 1
    assert torch.equal(free.peak(), ref.peak())  # peak() finishes
    _assert_same_state(free, ref)
    # mixed: with reads, sync-free, merged statistics, with reads again
    mixed = LayerStats(width, eps=0.01, limit=2.0, sync_free=False)
    mixed.add(batches[0])
    mixed.sync_free = True
    mixed.add(batches[2])
    part = LayerStats(width, eps=0.01, limit=2.0, sync_free=True)
    part.add(batches[3])
    mixed.merge(part)
    mixed.add(batches[4])
    mixed.sync_free = False
    mixed.add(batches[5])
    _assert_same_state(mixed, ref)


def test_sync_free_raises_on_nan_at_finish_and_keeps_an_empty_histogram_empty():
    s = LayerStats(3, eps=0.01, limit=1.0, sync_free=True)
    s.add(torch.tensor([[5.0, -5.0, 9.0]]))  # every value outside the window: no bin in use
    s.finish()
    assert (s.n_bins, s.k_lo) == (0, 0) and s.over.tolist() == [1, 0, 1] and s.under.tolist() == [0, 1, 0]
    s.add(torch.tensor([[0.0, float("nan"), 0.0]]))  # not raised here: that would read back
    with pytest.raises(Exception, match="non-finite"):
        s.finish()
    s.finish()  # raised once; nothing pending afterwards


def test_sync_free_falls_back_to_reads_when_the_buffer_does_not_fit(monkeypatch, caplog):
    width = 4
    real_zeros = torch.zeros

    def zeros(*shape, **kwargs):
        if shape == (width, 402):  # the whole-window buffer of limit 2, eps 0.01 (+2 columns)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_zeros(*shape, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros)
    ref = LayerStats(width, eps=0.01, limit=2.0, sync_free=False)  # counting with reads
    s = LayerStats(width, eps=0.01, limit=2.0, sync_free=True)
    for b in _batches(width):
        ref.add(b)
        s.add(b)
    assert s.sync_free is False and "host read per batch instead" in caplog.text
    _assert_same_state(s, ref)


def test_counting_a_batch_late_equals_counting_with_reads(monkeypatch):
    """Where a whole-window buffer would exceed ``BUFFER_MAX_BYTES``, sync-free counting counts each batch one call
    late (its range read once it has reached the host); after ``finish`` every field equals counting with reads, a
    NaN is raised at ``finish``, and no buffer over the window is made."""
    from knockout.stats import running

    monkeypatch.setattr(running, "BUFFER_MAX_BYTES", 0)
    width = 5
    batches = _batches(width)
    ref = LayerStats(width, eps=0.01, limit=2.0, sync_free=False)  # counting with reads
    late = LayerStats(width, eps=0.01, limit=2.0, sync_free=True)
    for b in batches:
        ref.add(b)
        late.add(b)
    assert late._buf is None and late._pending is not None  # the last batch waits for finish
    late.finish()
    _assert_same_state(late, ref)
    bad = LayerStats(3, eps=0.01, limit=1.0, sync_free=True)
    bad.add(torch.tensor([[0.0, float("nan"), 0.0]]))
    with pytest.raises(Exception, match="non-finite"):
        bad.finish()
