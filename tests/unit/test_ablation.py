"""Weight-edit ablation against hook-based replacement; scoping and exact restoration; the method registry."""

import pytest
import torch

import tiny
from knockout import KnockoutError, MethodContext, NeuronSelection, find_sites, get_method
from knockout.ablation.methods import METHODS, ConstantAblation, register
from knockout.hooks import fold_constants, replace_with_constants
from knockout.stats import Statistics

FAMILIES = ["gpt2", "opt", "llama", "gpt_neox", "gemma3_text"]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _random_ablation(sites, fraction=0.5, seed=1):
    sel = NeuronSelection([s.width for s in sites], seed=seed)
    values = [torch.randn(s.width) for s in sites]
    return sel.at(fraction), values


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_ablation_equals_hook_replacement(family):
    model = tiny.causal_lm(family)
    sites = find_sites(model)
    neurons, values = _random_ablation(sites)
    ids = torch.randint(5, tiny.VOCAB, (3, 10))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with replace_with_constants(sites, neurons, values):
            hooked = model(input_ids=ids).logits
        with fold_constants(sites, neurons, values):
            folded = model(input_ids=ids).logits
    assert not torch.allclose(hooked, clean, atol=1e-3)  # the ablation does something
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-4)


def test_folded_ablation_equals_hook_on_masked_and_vit():
    for model, inputs in [
        (tiny.masked_lm("roberta"), {"input_ids": torch.randint(5, tiny.VOCAB, (2, 7))}),
        (tiny.vit_classifier(), {"pixel_values": torch.randn(2, 3, 32, 32)}),
    ]:
        sites = find_sites(model)
        neurons, values = _random_ablation(sites, fraction=0.7)
        with torch.no_grad():
            with replace_with_constants(sites, neurons, values):
                hooked = model(**inputs).logits
            with fold_constants(sites, neurons, values):
                folded = model(**inputs).logits
        torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-4)


def test_hook_replacement_really_sets_the_preout():
    model = tiny.causal_lm("opt")
    sites = find_sites(model)
    neurons, values = _random_ablation(sites)
    seen = {}
    from knockout import capture

    with torch.no_grad(), replace_with_constants(sites, neurons, values):
        # a second pre-hook registered after the replacement sees the replaced input
        with capture(sites, lambda s, z: seen.__setitem__(s.layer, z.clone())):
            model(input_ids=torch.randint(5, tiny.VOCAB, (2, 6)))
    for s in sites:
        idx = neurons[s.layer]
        assert torch.equal(seen[s.layer][..., idx], values[s.layer][idx].expand(2, 6, -1))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ablating_no_neurons_changes_nothing(family):
    model = tiny.causal_lm(family)
    sites = find_sites(model)
    ids = torch.randint(5, tiny.VOCAB, (2, 8))
    stats = Statistics([s.width for s in sites])
    for layer, s in enumerate(sites):
        stats.add(layer, torch.randn(50, s.width))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        for name in ("zero", "mean", "peak"):
            method = get_method(name)(MethodContext(model, sites, stats))
            with method.ablate(NeuronSelection([s.width for s in sites], seed=0).at(0.0)):
                assert torch.equal(model(input_ids=ids).logits, clean)


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2"])  # bias / no bias (temporary bias) / Conv1D
def test_weights_restored_exactly_after_exception(family):
    model = tiny.causal_lm(family)
    sites = find_sites(model)
    before = _state(model)
    bias_none = [s.module.bias is None for s in sites]
    neurons, values = _random_ablation(sites, fraction=0.9)
    with pytest.raises(RuntimeError, match="boom"):
        with fold_constants(sites, neurons, values):
            assert not torch.equal(
                sites[0].weight(),
                before[f"{sites[0].name}.weight"].T if family == "gpt2" else before[f"{sites[0].name}.weight"],
            )
            raise RuntimeError("boom")
    after = _state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [s.module.bias is None for s in sites] == bias_none


def test_weights_restored_when_an_edit_fails_halfway():
    model = tiny.causal_lm("opt")
    sites = find_sites(model)
    before = _state(model)
    neurons = [torch.tensor([0, 1]), torch.tensor([0, 99])]  # layer 1 index out of range -> fails mid-edit
    values = [torch.ones(32), torch.ones(32)]
    with pytest.raises(IndexError):
        with fold_constants(sites, neurons, values):
            pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_zero_ablation_of_everything_removes_attention_output():
    model = tiny.causal_lm("opt")
    sites = find_sites(model)
    ids = torch.randint(5, tiny.VOCAB, (2, 6))
    method = get_method("zero")(MethodContext(model, sites))
    with torch.no_grad():
        with method.ablate([torch.arange(s.width) for s in sites]):
            folded = model(input_ids=ids).logits
        with replace_with_constants(sites, [torch.arange(s.width) for s in sites], [torch.zeros(32)] * 2):
            hooked = model(input_ids=ids).logits
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-4)


def test_mean_and_peak_use_the_statistics():
    model = tiny.causal_lm("llama")
    sites = find_sites(model)
    stats = Statistics([s.width for s in sites], eps=0.5)
    for layer, s in enumerate(sites):
        x = torch.randn(400, s.width).abs() * 3 + 1.0  # skewed and off-centre: mean != peak
        stats.add(layer, x)
    ctx = MethodContext(model, sites, stats)
    assert all(torch.equal(a, b) for a, b in zip(get_method("mean")(ctx).constants(), stats.means()))
    assert all(torch.equal(a, b) for a, b in zip(get_method("peak")(ctx).constants(), stats.peaks()))
    with pytest.raises(KnockoutError, match="needs statistics"):
        get_method("peak")(MethodContext(model, sites))


def test_registry_rejects_duplicates_and_unknown_names():
    assert {"zero", "mean", "peak"} <= set(METHODS)
    with pytest.raises(ValueError, match="already registered"):

        @register("zero")
        class Again(ConstantAblation):
            def constants(self):
                return []

    with pytest.raises(KnockoutError, match="unknown ablation method"):
        get_method("nope")


def test_a_new_method_plugs_in_without_touching_the_sweep():
    name = "test-ones"
    if name not in METHODS:

        @register(name)
        class Ones(ConstantAblation):
            """z_i := 1."""

            def constants(self):
                return [torch.ones(s.width) for s in self.ctx.sites]

    model = tiny.causal_lm("opt")
    sites = find_sites(model)
    neurons, _ = _random_ablation(sites)
    ids = torch.randint(5, tiny.VOCAB, (2, 6))
    with torch.no_grad():
        with get_method(name)(MethodContext(model, sites)).ablate(neurons):
            got = model(input_ids=ids).logits
        with replace_with_constants(sites, neurons, [torch.ones(32)] * 2):
            want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    del METHODS[name]
