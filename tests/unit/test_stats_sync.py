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
    s = LayerStats(4, eps=0.01, limit=5.0)
    for seed in range(3):
        s.add(torch.randn(50, 4, generator=torch.Generator().manual_seed(seed)))
    assert len(reads) == 3
    with pytest.raises(Exception, match="non-finite"):
        s.add(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
