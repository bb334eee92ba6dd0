"""The compiled statistics update (knockout.stats.native) against the torch path, and its fallbacks."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from knockout.stats import LayerStats, native

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler on this machine"
)


def _batches(width: int, seed: int) -> list[torch.Tensor]:
    """Batches that grow the stored bins on both sides, sit on bin edges, fall partly or wholly outside ±2 (those
    take the torch path), or are empty."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(257, width, generator=g) * 0.3,
        torch.randint(-199, 199, (64, width), generator=g) * 0.01,  # on (rounded) bin edges
        torch.randn(0, width),
        torch.randn(90, width, generator=g) * 0.3 + 0.5,
        torch.randn(40, width, generator=g) * 3.0,  # partly outside the window
        torch.randn(33, width, generator=g) * 0.2 - 0.7,
    ]


def _collect(batches, dtype) -> LayerStats:
    s = LayerStats(batches[0].shape[1], eps=0.01, limit=2.0)
    for b in batches:
        s.add(b.to(dtype))
    return s


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_update_equals_the_torch_path(dtype, monkeypatch):
    """Counts, under/over, min/max and the bin range bit for bit, moments to float64 rounding; and it did run."""
    assert native.library() is not None, "a C compiler is present, so the compiled update must build"
    width = 70  # more than one block of neurons, and not a multiple of it
    batches = _batches(width, seed=1)
    calls = []
    real_pass2 = native.pass2
    monkeypatch.setattr(native, "pass2", lambda *a, **k: calls.append(1) or real_pass2(*a, **k))
    fast = _collect(batches, dtype)
    inside = [b for b in batches if len(b) and -2 <= b.to(dtype).min() and b.to(dtype).max() < 2]
    assert len(inside) >= 3 and len(calls) == len(inside)  # every non-empty batch inside the window, and only those
    monkeypatch.setenv("KNOCKOUT_NATIVE", "0")
    ref = _collect(batches, dtype)
    assert len(calls) == len(inside)
    assert (fast.count, fast.k_lo) == (ref.count, ref.k_lo)
    for name in ("hist", "under", "over", "min", "max"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name
    torch.testing.assert_close(fast.mean, ref.mean, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(fast.m2, ref.m2, rtol=1e-12, atol=0)


@needs_compiler
def test_compiled_update_does_not_depend_on_the_split_over_threads():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 131, generator=g) * 0.4
    k = torch.floor(x / torch.tensor(0.01))
    k_lo, n_bins = int(k.min()), int(k.max() - k.min()) + 1
    results = []
    for threads in (1, 2, 5):
        hist = torch.zeros(131, n_bins, dtype=torch.int64)
        under, over = torch.zeros(131, dtype=torch.int64), torch.zeros(131, dtype=torch.int64)
        mean, lo, hi, bad = native.pass1(x, threads=threads)
        m2 = native.pass2(x, mean, 0.01, -2000, 1999, k_lo, hist, under, over, threads=threads)
        assert bad == 0 and torch.equal(lo, x.amin(0)) and torch.equal(hi, x.amax(0))
        results.append((hist, under, over, mean, m2))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    hist, _, _, mean, m2 = results[0]
    want = torch.stack([torch.bincount((k[:, j] - k_lo).long(), minlength=n_bins) for j in range(131)])
    assert torch.equal(hist, want)
    torch.testing.assert_close(mean, x.double().mean(0), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(m2, x.double().var(0, correction=0) * 300, rtol=1e-12, atol=0)


def test_without_a_working_compiler_the_torch_path_is_used(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "CACHE", tmp_path / "native")
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    with caplog.at_level(logging.INFO, logger="knockout.stats.native"):
        assert native.library() is None
    assert "compiled statistics update not available" in caplog.text and not native.usable(torch.zeros(2, 2))
    s = LayerStats(3, eps=0.01, limit=1.0)
    s.add(torch.tensor([[0.5, -0.25, 0.0], [0.125, 0.75, -0.5]]))
    assert s.hist.sum().item() == 6 and s.count == 2
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("CC")
    monkeypatch.setenv("KNOCKOUT_NATIVE", "0")
    assert native.library() is None and "lib" not in native._state  # turned off: not even built


@needs_compiler
def test_compiled_update_refuses_nan_and_inf_before_counting():
    s = LayerStats(3, eps=0.01, limit=1.0)
    s.add(torch.tensor([[0.5, -0.25, 0.0]]))
    before = {k: v.clone() for k, v in s.state_dict().items()}
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(Exception, match="non-finite"):
            s.add(torch.tensor([[0.1, bad, 0.2], [0.0, 0.0, 0.0]]))
        after = s.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-written
    assert native.pass1(torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]]))[3] == 2
