"""Centres read from LayerStats (median, KDE mode, coarse peak, point masses, clipping) against numpy on the raw data,
brute-force computations, or the known distributions the data were drawn from."""

import logging
import math

import numpy as np
import pytest
import torch

from knockout import KnockoutError
from knockout.stats import centres
from knockout.stats.running import LayerStats

EPS = 0.01
N = 40001  # odd, and (N - 1) * q is an integer for the quartiles: numpy.percentile is then x_(ceil(q N))
SPIKE, SPIKE_SHARE = 1.505, 0.02

# columns of the shared data set, [N, 8]
BIMODAL, LOGNORMAL, GAUSS, SPIKED, UNIFORM, EXPON, NARROW, BROAD = range(8)
MIX = ((0.65, -1.5, 0.4), (0.35, 1.2, 0.3))  # (weight, mean, std) of the bimodal column


def _normal_pdf(x, mu, sd):
    return np.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


PDFS = {
    BIMODAL: lambda x: sum(w * _normal_pdf(x, mu, sd) for w, mu, sd in MIX),
    LOGNORMAL: lambda x: np.exp(-0.5 * (np.log(x) / 0.5) ** 2) / (x * 0.5 * math.sqrt(2 * math.pi)),
    GAUSS: lambda x: _normal_pdf(x, 0.3, 1.0),
}


@pytest.fixture(scope="module")
def data():
    g = np.random.default_rng(0)
    x = np.empty((N, 8))
    heavy = g.random(N) < MIX[0][0]
    x[:, BIMODAL] = np.where(heavy, g.normal(MIX[0][1], MIX[0][2], N), g.normal(MIX[1][1], MIX[1][2], N))
    x[:, LOGNORMAL] = g.lognormal(0.0, 0.5, N)
    x[:, GAUSS] = g.normal(0.3, 1.0, N)
    x[:, SPIKED] = np.where(g.random(N) < SPIKE_SHARE, SPIKE, g.normal(0.0, 1.0, N))  # point mass on a broad bulk
    x[:, UNIFORM] = g.uniform(-2.0, 3.0, N)
    x[:, EXPON] = g.exponential(0.7, N) - 0.5
    x[:, NARROW] = g.normal(0.5, EPS, N)  # std = eps
    x[:, BROAD] = g.normal(-1.0, 5.0, N)
    return x


@pytest.fixture(scope="module")
def stats(data):
    s = LayerStats(data.shape[1], eps=EPS)
    for chunk in np.array_split(data, 7):
        s.add(torch.from_numpy(chunk))
    return s


def _stats(x, eps=EPS, **kw):
    s = LayerStats(x.shape[1], eps=eps, **kw)
    s.add(torch.from_numpy(x))
    return s


# -- quantiles --------------------------------------------------------------------------------------------------
def test_quantiles_and_median_within_eps_of_order_statistics(data, stats):
    """|Q(q) - x_(ceil(qN))| <= eps for every q and neuron; for odd N that order statistic is numpy.median."""
    xs = np.sort(data, axis=0)
    for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999):
        expected = xs[math.ceil(q * N) - 1]
        assert np.all(np.abs(centres.quantile(stats, q).numpy() - expected) <= EPS * (1 + 1e-9)), q
    assert np.all(np.abs(centres.median(stats).numpy() - np.median(data, axis=0)) <= EPS * (1 + 1e-9))
    # even N: numpy averages the two middle values; the bound holds for the lower one
    even = _stats(data[:-1])
    lower_middle = np.sort(data[:-1], axis=0)[(N - 1) // 2 - 1]
    assert np.all(np.abs(centres.median(even).numpy() - lower_middle) <= EPS * (1 + 1e-9))


def test_median_counts_clipped_values_and_is_nan_outside_the_window(caplog):
    g = np.random.default_rng(1)
    x = g.normal([1.5, -1.2, 3.0, -3.0], 1.0, size=(N, 4))
    s = _stats(x, limit=2.0)
    assert s.over[0] > 0.25 * N and s.under[1] > 0.15 * N  # many values clipped
    with caplog.at_level(logging.WARNING):
        med = centres.median(s).numpy()
    np.testing.assert_allclose(med[:2], np.median(x[:, :2], axis=0), rtol=0, atol=EPS)
    # the in-window values alone would give a very different median
    inside = x[:, 0][(x[:, 0] >= -2) & (x[:, 0] < 2)]
    assert abs(np.median(inside) - med[0]) > 20 * EPS
    assert np.isnan(med[2:]).all()
    assert "1 neurons have their 0.5-quantile below the histogram window and 1 above it" in caplog.text


# -- kernel density mode ------------------------------------------------------------------------------------------
def test_kde_bandwidth_is_silverman_rule_on_raw_data(data, stats):
    q75, q25 = np.percentile(data, [75, 25], axis=0)
    h_np = np.maximum(0.9 * np.minimum(data.std(0), (q75 - q25) / 1.34) * N**-0.2, EPS)
    # each quartile within eps, so IQR / 1.34 within 2 eps / 1.34
    np.testing.assert_allclose(centres.kde_bandwidth(stats).numpy(), h_np, rtol=0, atol=0.9 * 2 * EPS / 1.34 * N**-0.2)
    assert centres.kde_bandwidth(stats)[NARROW] == EPS  # never below eps


def _raw_kde_mode(x, h):
    """Maximum of the KDE (1/(n h)) sum phi((t - x_i) / h) of the raw values, by brute force: a scan of [min, max]
    in steps of h / 3, then of +-h / 3 around the best point in steps of eps / 20."""

    def best(lo, hi, step):
        grid = np.arange(lo, hi + step, step)
        chunks = np.array_split(grid, len(grid) // 64 + 1)
        dens = np.concatenate([np.exp(-0.5 * ((g[:, None] - x[None, :]) / h) ** 2).sum(1) for g in chunks])
        return grid[dens.argmax()]

    coarse = best(x.min(), x.max(), h / 3)
    return best(coarse - h / 3, coarse + h / 3, EPS / 20)


@pytest.mark.parametrize("col", [BIMODAL, LOGNORMAL, GAUSS, SPIKED, EXPON])
def test_mode_equals_brute_force_kde_on_raw_data_within_eps(data, stats, col):
    h = centres.kde_bandwidth(stats)
    x, hc = data[:, col], float(h[col])
    assert abs(centres.mode(stats)[col].item() - _raw_kde_mode(x, hc)) <= EPS
    if col in (BIMODAL, LOGNORMAL):  # an explicit, wider bandwidth
        assert abs(centres.mode(stats, bandwidth=3 * h)[col].item() - _raw_kde_mode(x, 3 * hc)) <= EPS


def _mode_tolerance(pdf, m, h, n):
    """|asymptotic bias| + 4 standard errors + eps of the KDE mode (Parzen 1962): bias = -h^2 f'''/(2 f''),
    SE^2 = f R(K') / (n h^3 f''^2), R(K') = 1 / (4 sqrt(pi)) for a Gaussian kernel; derivatives by finite
    differences."""
    d = 1e-3
    f = [pdf(m + k * d) for k in (-2, -1, 0, 1, 2)]
    f2 = (f[3] - 2 * f[2] + f[1]) / d**2
    f3 = (f[4] - 2 * f[3] + 2 * f[1] - f[0]) / (2 * d**3)
    bias = abs(h**2 * f3 / (2 * f2))
    se = math.sqrt(f[2] / (4 * math.sqrt(math.pi)) / (n * h**3 * f2**2))
    return bias + 4 * se + EPS


@pytest.mark.parametrize("col", [BIMODAL, LOGNORMAL, GAUSS])
def test_mode_near_true_density_mode(stats, col):
    grid = np.linspace(-3.0, 3.0, 600001) if col != LOGNORMAL else np.linspace(0.01, 3.0, 300001)
    true_mode = grid[PDFS[col](grid).argmax()]
    expected = {BIMODAL: -1.5, LOGNORMAL: math.exp(-0.25), GAUSS: 0.3}[col]
    assert true_mode == pytest.approx(expected, abs=1e-3)  # the heavier component; exp(mu - sigma^2)
    h = centres.kde_bandwidth(stats)[col].item()
    tol = _mode_tolerance(PDFS[col], true_mode, h, N)
    assert tol < 4 * h  # the bound is of the order of h
    assert abs(centres.mode(stats)[col].item() - true_mode) <= tol


def test_mode_is_not_captured_by_a_point_mass_that_captures_the_fine_peak(stats):
    assert stats.peak()[SPIKED].item() == pytest.approx(SPIKE, abs=1e-9)  # the spike outvotes the bulk at eps
    h = centres.kde_bandwidth(stats)[SPIKED].item()
    assert abs(centres.mode(stats)[SPIKED].item()) < 0.77 * h * 4  # bulk mode 0, 4 SE (SE ~ 0.77 h, Gaussian)


def test_kde_equals_direct_binned_sum(data, stats):
    """The FFT convolution equals the direct sum over bins, including at the ends of the range (no wrap-around)."""
    dens = centres.kde(stats)
    h = centres.kde_bandwidth(stats).numpy()
    centres_x = (np.arange(stats.n_bins) + stats.k_lo + 0.5) * EPS
    for col in (BIMODAL, EXPON, BROAD):
        counts = stats.hist[col].numpy()
        z = (centres_x[:, None] - centres_x[None, counts > 0]) / h[col]
        direct = (np.exp(-0.5 * z**2) * counts[counts > 0]).sum(1) / (counts.sum() * h[col] * math.sqrt(2 * math.pi))
        np.testing.assert_allclose(dens[col].numpy(), direct, rtol=0, atol=1e-12 * direct.max())
    assert abs(dens[BROAD].sum().item() * EPS - 1) < 1e-3  # a density


def test_mode_vectorised_matches_per_neuron(data, stats):
    whole = centres.mode(stats)
    for col in (BIMODAL, UNIFORM):
        one = _stats(data[:, [col]])
        assert centres.mode(one)[0].item() == pytest.approx(whole[col].item(), abs=1e-9)


# -- bin widths and coarse peaks --------------------------------------------------------------------------------
def test_fd_eps_and_relative_eps_match_numpy(data, stats):
    q75, q25 = np.percentile(data, [75, 25], axis=0)
    fd_np = 2 * (q75 - q25) * N ** (-1 / 3)  # numpy's _hist_bin_fd
    np.testing.assert_allclose(centres.fd_eps(stats).numpy(), fd_np, rtol=0, atol=4 * EPS * N ** (-1 / 3) * 1.000001)
    np.testing.assert_allclose(centres.relative_eps(stats, 0.05).numpy(), 0.05 * data.std(0), rtol=1e-9)
    np.testing.assert_allclose(
        centres.relative_eps(stats, 0.05, spread="iqr").numpy(), 0.05 * (q75 - q25) / 1.34, atol=0.05 * 2 * EPS / 1.34
    )


def _numpy_peak(x, width):
    """Centre of the most populated bin of the global grid [K w, (K + 1) w) (lowest on ties)."""
    ks = np.arange(math.floor(x.min() / width), math.floor(x.max() / width) + 2)
    counts, _ = np.histogram(x, bins=ks * width)
    return (ks[counts.argmax()] + 0.5) * width


@pytest.mark.parametrize("eps_new", [0.05, 0.2, 0.03, 0.034, 1.0])
def test_peak_at_equals_numpy_histogram_on_the_coarse_global_grid(data, stats, eps_new):
    width = round(eps_new / EPS) * EPS  # 0.034 -> 0.03
    assert centres.snapped_eps(stats, eps_new).tolist() == [width] * 8
    expected = [_numpy_peak(data[:, c], width) for c in range(8)]
    assert centres.peak_at(stats, eps_new).tolist() == expected


def test_peak_at_per_neuron_widths_stored_eps_and_order(data, stats):
    widths = torch.tensor([0.05, 0.02, 0.1, 0.07, 0.01, 0.3, 0.01, 0.5], dtype=torch.float64)
    expected = [_numpy_peak(data[:, c], round(w / EPS) * EPS) for c, w in enumerate(widths.tolist())]
    assert centres.peak_at(stats, widths).tolist() == expected
    assert torch.equal(centres.peak_at(stats, EPS), stats.peak())
    # another order and split of the same data gives the same coarse peaks
    other = LayerStats(8, eps=EPS)
    for chunk in np.array_split(data[::-1], 3):
        other.add(torch.from_numpy(chunk.copy()))
    assert torch.equal(centres.peak_at(other, widths), centres.peak_at(stats, widths))
    # NaN width -> NaN peak; a width under eps / 2 uses eps
    nan_w = widths.clone()
    nan_w[1] = math.nan
    assert math.isnan(centres.peak_at(stats, nan_w)[1].item())
    assert torch.equal(centres.peak_at(stats, 0.001), stats.peak())
    with pytest.raises(KnockoutError):
        centres.peak_at(stats, -0.1)


def test_the_peak_is_peak_at_the_stored_eps_and_numpy_argmax(data, stats, caplog):
    """One owner: ``LayerStats.peak()`` is ``peak_at(stats, stats.eps)``, equal to numpy's histogram argmax on the
    raw data; the stored bins (all widths eps) give what the re-binning path gives for its width-eps neurons."""
    expected = [_numpy_peak(data[:, c], EPS) for c in range(8)]
    assert stats.peak().tolist() == centres.peak_at(stats, stats.eps).tolist() == expected
    widths = torch.full((8,), EPS, dtype=torch.float64)
    widths[BROAD] = 2 * EPS  # one coarse neuron: every neuron goes through the re-binning
    assert torch.equal(centres.peak_at(stats, widths)[:BROAD], stats.peak()[:BROAD])
    # ties go to the lowest bin; a neuron with every value outside the window gets its mean, with a warning
    x = np.array([[0.015, 5.0, -0.004], [0.025, 7.0, -0.004], [0.031, 6.0, 0.011], [0.045, 9.0, 0.012]])
    s = _stats(x, limit=1.0)
    with caplog.at_level(logging.WARNING):
        peak = s.peak()
    assert "1 neurons have every value outside" in caplog.text
    assert torch.equal(peak, centres.peak_at(s, s.eps))
    assert peak.tolist() == [_numpy_peak(x[:, 0], EPS), 6.75, _numpy_peak(x[:, 2], EPS)]
    assert peak[0].item() == pytest.approx(0.015) and peak[2].item() == pytest.approx(-0.005)


def test_peak_at_lowest_coarse_bin_on_a_negative_grid():
    """The first coarse bin is floor(k_lo / m), also for negative k_lo not a multiple of m."""
    g = np.random.default_rng(4)
    x = np.concatenate([g.uniform(-0.268, -0.252, 100), g.uniform(-0.24, 0.4, 50)])[:, None]
    s = _stats(x)
    assert s.k_lo == -27
    for width in (0.05, 0.03, 0.07, 0.2):
        assert centres.peak_at(s, width).item() == _numpy_peak(x[:, 0], width)
    assert centres.peak_at(s, 0.05).item() == pytest.approx(-0.275)


# -- point masses -------------------------------------------------------------------------------------------------
def test_point_mass_flags_the_spike_only(stats):
    assert centres.point_mass(stats).tolist() == [c == SPIKED for c in range(8)]


def test_no_gaussian_is_flagged_however_narrow():
    """Widths from 0.1 eps (all in one bin: holds more than half) to 10 eps, at random offsets within a bin."""
    g = np.random.default_rng(2)
    sds = np.array([0.1, 0.3, 0.5, 0.74, 1.0, 2.0, 10.0]) * EPS
    x = g.normal(g.uniform(0, 1, sds.size) * EPS, sds, size=(N, sds.size))
    assert not centres.point_mass(_stats(x)).any()


def test_a_spike_on_a_bulk_is_flagged_and_a_narrow_core_is_not():
    """Test 2 of point_mass: 1% of the values at one point inside a N(0, 0.5) bulk (its bins either side hold the
    bulk, so the isolated-spike test misses it) is flagged; peaked distributions whose top spreads over a few bins
    (Laplace, a std-eps core on a wide Gaussian, narrow Gaussians) are not."""
    g = np.random.default_rng(4)
    n = 16384
    spike = g.normal(0.0, 0.5, n)
    spike[: n // 100] = 0.1234
    core = np.where(g.random(n) < 0.3, g.normal(0.0, EPS, n), g.normal(0.0, 0.15, n))
    columns = [spike, g.laplace(0.0, 0.02, n), g.laplace(0.0, 0.05, n), core, g.normal(0.2, 0.3, n)]
    s = _stats(np.stack(columns, axis=1))
    assert s.peak()[0].item() == pytest.approx(0.125)  # the spike's bin
    assert centres.point_mass(s).tolist() == [True, False, False, False, False]
    # without the spike, the peak is the bulk's: that of the histogram of the other values
    edges = s.bin_edges().numpy()
    counts, _ = np.histogram(spike[n // 100 :], bins=edges)
    bulk_top = counts.max()
    near_bulk_top = np.abs(centres.peak_without_point_masses(s)[0].item() - (edges[:-1] + EPS / 2)[counts.argmax()])
    assert near_bulk_top <= 3 * EPS  # the bulk's own top is flat to within Poisson noise over a few bins
    assert counts[np.searchsorted(edges, centres.peak_without_point_masses(s)[0].item()) - 1] > 0.9 * bulk_top


def test_peak_without_point_masses_is_the_bulk_peak(data, stats):
    """Each spike's bin is the global maximum in turn; what is left equals the histogram of the bulk alone."""
    g = np.random.default_rng(3)
    bulk = g.normal(0.0, 1.0, N)
    spikes = g.random(N)
    two = np.where(spikes < 0.02, SPIKE, np.where(spikes < 0.035, -0.995, bulk))
    x = np.stack([two, data[:, SPIKED]], axis=1)
    s = _stats(x)
    assert s.peak().tolist() == pytest.approx([SPIKE, SPIKE])
    edges = s.bin_edges().numpy()
    expected = []
    for col, is_bulk in ((two, spikes >= 0.035), (data[:, SPIKED], data[:, SPIKED] != SPIKE)):
        counts, _ = np.histogram(col[is_bulk], bins=edges)
        expected.append((edges[counts.argmax()] + edges[counts.argmax() + 1]) / 2)
    np.testing.assert_allclose(centres.peak_without_point_masses(s).numpy(), expected, rtol=0, atol=1e-12)
    # without point masses nothing changes
    no_spike = [c for c in range(8) if c != SPIKED]
    assert torch.equal(centres.peak_without_point_masses(stats)[no_spike], stats.peak()[no_spike])


# -- clipping -------------------------------------------------------------------------------------------------------
def test_clipped_fraction_and_neurons_match_numpy(data):
    s = _stats(data, limit=2.0)
    outside = (data < -2.0) | (data >= 2.0)
    np.testing.assert_array_equal(centres.clipped(s).numpy(), outside.mean(0))
    assert centres.clipped_neurons(s) == np.flatnonzero(outside.mean(0) > 1e-3).tolist()
    assert centres.clipped_neurons(s, threshold=0.2) == np.flatnonzero(outside.mean(0) > 0.2).tolist()
    assert centres.clipped_neurons(s) and NARROW not in centres.clipped_neurons(s)


def test_empty_statistics_raise():
    with pytest.raises(KnockoutError, match="empty"):
        centres.median(LayerStats(3))
