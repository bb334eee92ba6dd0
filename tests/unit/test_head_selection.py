"""Selection of whole heads: nested, counted per layer or over all layers, everything at 1.0, and the folded zero
ablation equals a hook that zeroes the chosen heads' slices of the pre-out."""

import pytest
import torch

import tiny
from knockout import KnockoutError, MethodContext, NeuronSelection, find_sites, get_method
from knockout.ablation.selection import MODES, count_for
from knockout.config import SweepConfig
from knockout.hooks import edit_preout

FRACTIONS = [round(0.05 * i, 10) for i in range(21)]


@pytest.mark.parametrize("mode", ["heads-per-layer", "heads-global"])
def test_head_selection_is_nested_counted_and_reaches_everything(mode):
    widths, n_heads = [24, 40, 36], [3, 5, 9]  # d_head 8, 8, 4
    sel = NeuronSelection(widths, seed=3, mode=mode, n_heads=n_heads)
    previous = [set() for _ in widths]
    for f in FRACTIONS:
        heads, neurons = sel.heads_at(f), sel.at(f)
        counts = [len(h) for h in heads]
        if mode == "heads-per-layer":
            assert counts == [count_for(f, h) for h in n_heads]
        else:
            assert sum(counts) == count_for(f, sum(n_heads))
        for layer, (h, idx, d) in enumerate(zip(heads, neurons, sel.d_heads)):
            whole = sorted(int(k) * d + j for k in h for j in range(d))  # every neuron of every chosen head
            assert idx.tolist() == whole
            assert previous[layer] <= set(whole)  # nested
            previous[layer] = set(whole)
        assert sel.n_ablated(f) == sum(len(i) for i in neurons)
    assert [i.tolist() for i in sel.at(1.0)] == [list(range(w)) for w in widths]
    assert sel.n_ablated(1.0) == sum(widths) and sel.n_ablated(0.0) == 0
    assert set(sel.state_dict()) == (
        {"seed3.heads.layer0", "seed3.heads.layer1", "seed3.heads.layer2"}
        if mode == "heads-per-layer"
        else {"seed3.heads.global"}
    )


def test_head_orders_depend_on_the_seed_and_neuron_modes_ignore_heads():
    a, b, c = (NeuronSelection([32, 32], seed=s, mode="heads-global", n_heads=4) for s in (1, 1, 2))
    assert torch.equal(a.state_dict()["seed1.heads.global"], b.state_dict()["seed1.heads.global"])
    assert not torch.equal(a.orders[0], c.orders[0])
    for mode in ("per-layer", "global"):  # the head structure changes nothing for neuron selection
        plain, told = NeuronSelection([32, 48], 5, mode), NeuronSelection([32, 48], 5, mode, n_heads=[4, 6])
        assert all(torch.equal(x, y) for x, y in zip(plain.at(0.37), told.at(0.37)))


def test_head_selection_errors():
    with pytest.raises(KnockoutError, match="number of heads"):
        NeuronSelection([32, 32], 0, "heads-per-layer")
    with pytest.raises(KnockoutError, match="cannot be split"):
        NeuronSelection([32, 30], 0, "heads-global", n_heads=4)
    with pytest.raises(KnockoutError, match="chooses neurons"):
        NeuronSelection([32], 0).heads_at(0.5)
    mlp = find_sites(tiny.causal_lm("opt"), kind="mlp")
    with pytest.raises(KnockoutError, match="has no heads"):
        NeuronSelection.for_sites(mlp, 0, "heads-per-layer")
    with pytest.raises(KnockoutError, match="has no heads"):
        SweepConfig(model="x", site="mlp", selection="heads-global")
    assert {"heads-per-layer", "heads-global"} <= set(MODES)


def _zero_heads_hook(sites, heads):
    def fn(site, z):
        z = z.clone()
        for h in heads[site.layer].tolist():
            z[..., h * site.d_head : (h + 1) * site.d_head] = 0
        return z

    return edit_preout(sites, fn)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert", "vit"])
@pytest.mark.parametrize("mode", ["heads-per-layer", "heads-global"])
def test_folded_zero_head_ablation_equals_zeroing_the_head_slices(family, mode):
    if family == "bert":
        model, inputs = tiny.masked_lm("bert"), {"input_ids": torch.randint(5, tiny.VOCAB, (2, 9))}
    elif family == "vit":
        model, inputs = tiny.vit_classifier(), {"pixel_values": torch.randn(2, 3, 32, 32)}
    else:
        model, inputs = tiny.causal_lm(family), {"input_ids": torch.randint(5, tiny.VOCAB, (2, 9))}
    sites = find_sites(model)
    sel = NeuronSelection.for_sites(sites, seed=2, mode=mode)
    zero = get_method("zero")(MethodContext(model, sites))
    with torch.no_grad():
        clean = model(**inputs).logits
        for f in (0.25, 0.5, 1.0):
            with zero.ablate(sel.at(f)):
                folded = model(**inputs).logits
            with _zero_heads_hook(sites, sel.heads_at(f)):
                hooked = model(**inputs).logits
            assert not torch.allclose(hooked, clean, atol=1e-4)
            torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-4)
