"""The centre methods (median, mode, peak-nopm, peak@EPS): constants equal the centres functions on the same
statistics, the folded ablation equals a hook, peak@<stored eps> is peak, and bad names fail clearly."""

import logging

import pytest
import torch

import tiny
from knockout import KnockoutError, MethodContext, NeuronSelection, find_sites, get_method
from knockout.ablation.centres import EpsChoice, parse_eps
from knockout.ablation.methods import METHODS, methods_for, register_parametrised
from knockout.config import SweepConfig
from knockout.hooks import replace_with_constants
from knockout.stats import Statistics, centres

EPS = 0.01
SPIKE = 0.7351  # a repeated value, as the pre-out at position 0 of a common first token


@pytest.fixture(scope="module")
def setup():
    """A tiny Llama and statistics of skewed, bimodal neurons; neuron 3 of each layer has a planted point mass and
    neuron 7 of layer 1 is constant (std 0)."""
    model = tiny.causal_lm("llama")
    sites = find_sites(model)
    g = torch.Generator().manual_seed(0)
    stats = Statistics([s.width for s in sites], eps=EPS)
    n = 4000
    for layer, s in enumerate(sites):
        x = torch.randn(n, s.width, generator=g, dtype=torch.float64)
        x[: n // 2] = x[: n // 2].abs() * 0.8 + 1.0  # half skewed and off-centre: centres differ
        x[torch.rand(n, generator=g) < 0.05, 3] = SPIKE
        if layer == 1:
            x[:, 7] = 0.25
        for chunk in x.split(1000):
            stats.add(layer, chunk)
    return model, sites, stats


REFERENCE = {
    "median": centres.median,
    "mode": centres.mode,
    "peak-nopm": centres.peak_without_point_masses,
    "peak@0.05": lambda s: centres.peak_at(s, 0.05),
    "peak@fd": lambda s: centres.peak_at(s, torch.where(centres.fd_eps(s) == 0, s.eps, centres.fd_eps(s))),
    "peak@0.5std": lambda s: centres.peak_at(s, torch.where(s.std == 0, s.eps, 0.5 * s.std)),
    "peak@0.3iqr": lambda s: centres.peak_at(
        s, torch.where(centres.iqr(s) == 0, s.eps, centres.relative_eps(s, 0.3, "iqr"))
    ),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_constants_equal_the_centres_functions(setup, name):
    model, sites, stats = setup
    got = get_method(name)(MethodContext(model, sites, stats)).constants()
    for layer, s in enumerate(stats.layers):
        want = REFERENCE[name](s).float()
        assert torch.equal(got[layer], want), (name, layer)
        assert torch.isfinite(got[layer]).all()


def test_the_centres_really_differ_and_peak_nopm_skips_the_spike(setup):
    model, sites, stats = setup
    ctx = MethodContext(model, sites, stats)
    peak = get_method("peak")(ctx).constants()
    nopm = get_method("peak-nopm")(ctx).constants()
    assert bool(centres.point_mass(stats.layers[0])[3])
    assert abs(float(peak[0][3]) - SPIKE) < EPS and abs(float(nopm[0][3]) - SPIKE) > 0.1
    assert not torch.equal(get_method("median")(ctx).constants()[0], get_method("mode")(ctx).constants()[0])


def test_peak_at_the_stored_eps_is_peak_exactly(setup):
    model, sites, stats = setup
    ctx = MethodContext(model, sites, stats)
    at = get_method(f"peak@{EPS}")(ctx).constants()
    assert all(torch.equal(a, b) for a, b in zip(at, get_method("peak")(ctx).constants()))
    assert all(torch.equal(a, b) for a, b in zip(at, stats.peaks()))


def test_constant_neuron_gets_the_stored_eps_with_relative_widths(setup):
    model, sites, stats = setup
    ctx = MethodContext(model, sites, stats)
    for name in ("peak@0.5std", "peak@fd"):
        assert float(get_method(name)(ctx).constants()[1][7]) == pytest.approx(0.255)  # bin [0.25, 0.26)


@pytest.mark.parametrize("name", ["median", "mode", "peak-nopm", "peak@0.1", "peak@fd"])
def test_folded_ablation_equals_hook_with_the_constants(setup, name):
    model, sites, stats = setup
    method = get_method(name)(MethodContext(model, sites, stats))
    neurons = NeuronSelection([s.width for s in sites], seed=3).at(0.6)
    ids = torch.randint(5, tiny.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with replace_with_constants(sites, neurons, method.constants()):
            hooked = model(input_ids=ids).logits
        with method.ablate(neurons):
            folded = model(input_ids=ids).logits
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-4)


def test_parse_eps():
    assert parse_eps("0.05") == EpsChoice("abs", 0.05)
    assert parse_eps("5e-2") == EpsChoice("abs", 0.05)
    assert parse_eps("FD") == EpsChoice("fd")
    assert parse_eps("0.5std") == EpsChoice("std", 0.5)
    assert parse_eps(".25iqr") == EpsChoice("iqr", 0.25)
    assert parse_eps("0.5std").label == "0.5 × std"


@pytest.mark.parametrize("name", ["peak@abc", "peak@0", "peak@-0.1", "peak@", "peak@inf", "peak@nan", "peak@1sd"])
def test_bad_parameters_give_one_clear_error(name):
    with pytest.raises(KnockoutError, match=r"bad bin width .*peak@0\.05.*peak@fd.*peak@0\.5std"):
        get_method(name)
    with pytest.raises(KnockoutError, match="bad bin width"):
        SweepConfig(model="m", methods=("zero", name))  # refused before anything runs


def test_names_and_registry():
    with pytest.raises(KnockoutError, match="'mean' takes no parameter"):
        get_method("mean@0.1")
    with pytest.raises(KnockoutError, match=r"unknown ablation method 'nope@1'.*peak@\.\.\."):
        get_method("nope@1")
    with pytest.raises(ValueError, match="already registered"):
        register_parametrised("peak")(lambda param, name: None)
    cls = get_method("peak@0.2")
    assert cls is get_method("peak@0.2") and cls.name == "peak@0.2" and cls.needs_stats
    assert "peak@0.2" not in METHODS
    assert {"median", "mode", "peak-nopm"} <= set(METHODS)
    assert not {"median", "mode", "peak-nopm"} & set(methods_for("causal"))  # asked for by name


def test_undefined_centre_is_an_error_naming_layer_and_neuron():
    model = tiny.causal_lm("llama")
    sites = find_sites(model)
    stats = Statistics([s.width for s in sites], eps=0.1, limit=2.0)
    for layer, s in enumerate(sites):
        x = torch.randn(200, s.width)
        if layer == 1:
            x[:150, 5] = 5.0  # 75% above the window: median unknown
        stats.add(layer, x)
    ctx = MethodContext(model, sites, stats)
    with pytest.raises(KnockoutError, match=r"'median' .* 1 neurons \(layer 1 neuron 5\)"):
        get_method("median")(ctx).constants()
    with pytest.raises(KnockoutError, match=r"'peak@fd' .*layer 1 neuron 5.*quartile"):
        get_method("peak@fd")(ctx).constants()
    assert all(torch.isfinite(c).all() for c in get_method("mode")(ctx).constants())


def test_absolute_width_not_a_multiple_is_snapped_with_a_warning(setup, caplog):
    model, sites, stats = setup
    with caplog.at_level(logging.WARNING):
        got = get_method("peak@0.034")(MethodContext(model, sites, stats)).constants()
    assert "using bins of 0.03" in caplog.text
    assert all(torch.equal(a, centres.peak_at(s, 0.03).float()) for a, s in zip(got, stats.layers))


def test_clipped_neurons_are_named_with_their_layer(caplog):
    from knockout.experiments.engine import warn_clipped_neurons
    from knockout.stats.running import LayerStats

    layer = LayerStats(6, eps=0.1, limit=2.0)
    x = torch.randn(1000, 6) * 0.3
    x[:5, 2] = 3.0  # 0.5% clipped
    x[:1, 4] = -9.0  # 0.1%: at the threshold, not over it
    layer.add(x)
    with caplog.at_level(logging.WARNING):
        warn_clipped_neurons(7, layer)
    assert "layer 7: 1 neurons" in caplog.text and ": 2 (0.50%)" in caplog.text and "4 (" not in caplog.text
    assert "inside the window only" in caplog.text
