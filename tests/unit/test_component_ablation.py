"""One head named by spec is ablated exactly as the same head chosen by NeuronSelection (bit for bit) and as an
independent hook that overwrites the head's slice of the pre-out by hand."""

import pytest
import torch

import tiny
from knockout import MethodContext, NeuronSelection, components, find_sites, get_method
from knockout.data.text import causal_batches
from knockout.stats import collect_stats

METHODS = ("zero", "mean", "peak")


def _batches(seed: int = 0, n: int = 6, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, tiny.VOCAB, (length,), generator=g).tolist() for _ in range(n)]
    return causal_batches(seqs, 3, 0)


@pytest.fixture(scope="module")
def setup():
    model = tiny.causal_lm("llama").double()  # float64: the hook and the weight edit agree to rounding
    sites = find_sites(model)
    stats = collect_stats(model, sites, _batches(1), progress=False)
    ids = _batches(2)[0].inputs
    return model, sites, stats, ids


def _logits(model, ids):
    with torch.inference_mode():
        return model(**ids).logits


@pytest.mark.parametrize("method", METHODS)
def test_head_by_spec_equals_the_head_chosen_by_selection_bit_for_bit(setup, method):
    model, sites, stats, ids = setup
    sel = NeuronSelection.for_sites(sites, seed=3, mode="heads-global")
    fraction = 1 / 8  # one of the 8 heads
    heads = sel.heads_at(fraction)
    ((layer, chosen),) = [(i, h) for i, h in enumerate(heads) if h.numel()]
    spec = f"L{layer}.H{int(chosen[0])}"
    by_spec, by_selection = components(spec, sites), sel.at(fraction)
    assert all(torch.equal(a, b) for a, b in zip(by_spec, by_selection))
    ablation = get_method(method)(MethodContext(model, sites, stats))
    with ablation.ablate(by_spec):
        a = _logits(model, ids)
    with ablation.ablate(by_selection):
        b = _logits(model, ids)
    assert torch.equal(a, b)
    assert not torch.equal(a, _logits(model, ids))  # the head mattered


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer, head", [(0, 1), (1, 3)])
def test_head_by_spec_equals_an_independent_hook(setup, method, layer, head):
    model, sites, stats, ids = setup
    d = sites[layer].d_head
    constants = get_method(method)(MethodContext(model, sites, stats)).constants()
    value = constants[layer][head * d : (head + 1) * d].to(torch.float64)

    def overwrite(module, args):  # by hand: the head's d_head dimensions of the out-projection's input
        z = args[0].clone()
        z[..., head * d : (head + 1) * d] = value
        return (z,)

    handle = sites[layer].module.register_forward_pre_hook(overwrite)
    try:
        expected = _logits(model, ids)
    finally:
        handle.remove()
    ablation = get_method(method)(MethodContext(model, sites, stats))
    with ablation.ablate(components(f"L{layer}.H{head}", sites)):
        got = _logits(model, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert (got - _logits(model, ids)).abs().max() > 1e-6
