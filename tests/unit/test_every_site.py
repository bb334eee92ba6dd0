"""Every site of every architecture in the site tables: the statistics knockout collects and its zero and mean
ablations equal an independent computation by a plain forward pre-hook on the same module (whatever shape the
module's input has: OPT flattens [batch, pos] before its MLP's fc2)."""

import functools
import re

import pytest
import torch

import tiny
from knockout import MethodContext, NeuronSelection, collect_stats, find_sites, get_method
from knockout.data.batch import Batch
from knockout.sites import MLP_SITE_PATTERNS, SITE_PATTERNS

CASES = [
    (t, kind) for t in SITE_PATTERNS for kind in ("attention", "mlp") if kind == "attention" or t in MLP_SITE_PATTERNS
]


_family = functools.lru_cache(maxsize=1)(tiny.family)  # the cases run family by family: each model is built once


def test_every_family_of_the_tables_has_a_tiny_model():
    assert set(tiny.FAMILY_CONFIGS) == set(SITE_PATTERNS)


def _raw_inputs(model, sites, inputs) -> list[torch.Tensor]:
    """Per layer, the module's input as the module receives it (a plain pre-hook, no knockout code)."""
    seen = {}

    def keep(layer):
        return lambda module, args: seen.__setitem__(layer, args[0].detach().clone())

    handles = [s.module.register_forward_pre_hook(keep(s.layer)) for s in sites]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return [seen[s.layer] for s in sites]


def _logits_with_raw_edit(model, sites, inputs, neurons, values) -> torch.Tensor:
    """Logits with ``input[..., i] := values[l][i]`` for ``i in neurons[l]``, by a plain pre-hook."""

    def edit(layer):
        def hook(module, args):
            z = args[0].clone()
            idx = neurons[layer]
            z[..., idx] = values[layer][idx].to(z.dtype)
            return (z, *args[1:])

        return hook

    handles = [s.module.register_forward_pre_hook(edit(s.layer)) for s in sites]
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("model_type, kind", CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_statistics_and_constant_ablations_equal_a_plain_hook(model_type, kind):
    model, inputs = _family(model_type)
    assert model.config.model_type == model_type
    sites = find_sites(model, kind=kind)
    table = SITE_PATTERNS if kind == "attention" else MLP_SITE_PATTERNS
    rx = re.compile(r"(?:^|\.)" + table[model_type] + r"$")
    assert [int(rx.search(s.name).group(1)) for s in sites] == list(range(len(sites))) == [0, 1]

    raw = _raw_inputs(model, sites, inputs)
    flat = [z.reshape(-1, s.width).double() for z, s in zip(raw, sites)]  # [tokens, width] whatever the layout
    n_rows = next(iter(inputs.values())).shape[0]
    positions = flat[0].shape[0] // n_rows
    batch = Batch(inputs, torch.ones(n_rows, positions, dtype=torch.bool), torch.zeros(n_rows, dtype=torch.long))
    stats = collect_stats(model, sites, [batch], eps=0.01, limit=50.0, progress=False)
    for x, s in zip(flat, stats.layers):
        assert s.count == x.shape[0] == n_rows * positions
        torch.testing.assert_close(s.mean.double(), x.mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s.min.double(), x.min(0).values, atol=0, rtol=0)
        torch.testing.assert_close(s.max.double(), x.max(0).values, atol=0, rtol=0)

    neurons = NeuronSelection.for_sites(sites, seed=1).at(0.6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        clean = model(**inputs).logits
    for name, values in (("zero", [torch.zeros(s.width) for s in sites]), ("mean", stats.means())):
        with torch.no_grad(), get_method(name)(MethodContext(model, sites, stats)).ablate(neurons):
            folded = model(**inputs).logits
        expected = _logits_with_raw_edit(model, sites, inputs, neurons, values)
        assert not torch.allclose(expected, clean, atol=1e-4)
        torch.testing.assert_close(folded, expected, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
