"""The component grammar: every form, files of named sets, scan units, and every kind of bad input."""

import json

import pytest
import torch

import tiny
from knockout import KnockoutError, component_sets, components, find_sites
from knockout.components import parse_spec, parse_unit, scan_units


@pytest.fixture(scope="module")
def sites():
    return find_sites(tiny.causal_lm("llama"))  # 2 layers, 4 heads of 8 neurons: width 32


@pytest.fixture(scope="module")
def mlp_sites():
    return find_sites(tiny.causal_lm("llama"), kind="mlp")  # 2 layers of 64 MLP neurons, no heads


def expect(per_layer: dict[int, list[int]], n_layers: int = 2) -> list[torch.Tensor]:
    return [torch.tensor(sorted(per_layer.get(i, [])), dtype=torch.long) for i in range(n_layers)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and x.dtype == torch.long for x, y in zip(a, b))


@pytest.mark.parametrize(
    "spec, neurons",
    [
        ("L1.H2", {1: range(16, 24)}),  # head 2 of d_head 8: neurons 2*8 .. 2*8+7
        ("L0.H0", {0: range(0, 8)}),
        ("L0:17", {0: [17]}),
        ("L1:3-9", {1: range(3, 10)}),  # inclusive
        ("L0:5-5", {0: [5]}),
        ("L1", {1: range(32)}),
        ("L1.H3,L0.H1", {1: range(24, 32), 0: range(8, 16)}),
        ("L0:0-7,L0.H1", {0: range(0, 16)}),  # adjacent, not overlapping
        (" l1.h2 , L0:31 ", {1: range(16, 24), 0: [31]}),  # case and spaces do not matter
    ],
)
def test_every_form(sites, spec, neurons):
    got = components(spec, sites)
    assert same(got, expect({k: list(v) for k, v in neurons.items()}))


def test_sets_have_names_fractions_and_canonical_specs(sites):
    sets = component_sets("induction = L1.H3, L0.H1; l0:2-3", sites)
    assert [s.name for s in sets] == ["induction", "L0:2-3"]
    assert sets[0].spec == "L1.H3,L0.H1"
    assert sets[0].n_ablated == 16 and sets[0].fraction == 16 / 64 and sets[0].layers == [0, 1]
    assert sets[1].n_ablated == 2 and sets[1].layers == [0]
    # the digest depends on the neurons only: the same neurons written another way give the same digest
    again = component_sets("x=L0:8-15,L1:24-31", sites)[0]
    assert again.digest() == sets[0].digest() and again.digest() != sets[1].digest()


def test_head_on_the_mlp_site_is_refused_and_neurons_allowed(mlp_sites):
    with pytest.raises(KnockoutError, match=r"'L1.H0'.*mlp site has no heads.*L1:<first>-<last>, neurons 0..63"):
        components("L1.H0", mlp_sites)
    assert same(components("L1:60-63", mlp_sites), expect({1: [60, 61, 62, 63]}))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("L2.H0", r"component 'L2.H0': layer 2 is out of range; valid layers 0..1"),
        ("L5", r"layer 5 is out of range; valid layers 0..1"),
        ("L1.H4", r"'L1.H4': head 4 is out of range; valid heads 0..3 \(4 heads of 8 neurons\)"),
        ("L0:32", r"'L0:32': neuron 32 is out of range; valid neurons 0..31 of layer 0"),
        ("L0:30-40", r"neuron 40 is out of range; valid neurons 0..31"),
        ("x=L1.H1,L9", r"'L9' \(in set 'x'\): layer 9 is out of range"),
    ],
)
def test_out_of_range_names_the_token_and_the_valid_range(sites, spec, message):
    with pytest.raises(KnockoutError, match=message):
        components(spec, sites)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("L1H2", r"cannot read component 'L1H2'; use L<layer>.H<head>"),
        ("H2", r"cannot read component 'H2'"),
        ("L1.H2.3", r"cannot read component 'L1.H2.3'"),
        ("L-1", r"cannot read component 'L-1'"),
        ("L0:9-3", r"the range 9-3 counts down"),
        ("", r"give components to ablate"),
        (";;", r"no component sets"),
        ("a=", r"set 'a' has no components"),
        ("=L1", r"non-empty name"),
        ("baseline=L1", r"'baseline' names the unablated rows"),
        ("a#b=L1", r"may not contain"),
        ("a=L1;a=L0", r"set name 'a' is given twice"),
        ("L1;L1", r"set name 'L1' is given twice"),
    ],
)
def test_bad_syntax(spec, message):
    with pytest.raises(KnockoutError, match=message):
        parse_spec(spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("L1,L1.H2", r"components 'L1' and 'L1.H2' overlap \(both hold neuron 16 of layer 1\)"),
        ("L1.H2,L1.H2", r"'L1.H2' and 'L1.H2' overlap"),
        ("s=L0:0-9,L0.H1", r"set 's': components 'L0:0-9' and 'L0.H1' overlap \(both hold neuron 8 of layer 0\)"),
        ("L0:4,L0:0-7", r"'L0:4' and 'L0:0-7' overlap"),
    ],
)
def test_overlap_within_a_set_is_refused(sites, spec, message):
    with pytest.raises(KnockoutError, match=message + r".*list each neuron once"):
        component_sets(spec, sites)


def test_different_sets_may_overlap(sites):
    a, b = component_sets("a=L1;b=L1.H2", sites)
    assert a.n_ablated == 32 and b.n_ablated == 8


def test_components_wants_one_set(sites):
    with pytest.raises(KnockoutError, match=r"holds 2 sets \(a, b\); use knockout.component_sets"):
        components("a=L1;b=L0", sites)


def test_json_and_csv_files(tmp_path, sites):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"name": "induction", "components": ["L1.H3", "L0.H1"]}))
    several = tmp_path / "sets.json"
    several.write_text(json.dumps([{"name": "a", "components": "L0:1-2"}, {"name": "b", "components": ["L1"]}]))
    table = tmp_path / "sets.csv"
    table.write_text('name,components\nheads,"L1.H3,L0.H1"\nneuron,L0:5\n')
    assert same(components(str(one), sites), expect({1: range(24, 32), 0: range(8, 16)}))
    sets = component_sets(str(several), sites)
    assert [s.name for s in sets] == ["a", "b"] and same(sets[0].neurons, expect({0: [1, 2]}))
    sets = component_sets(str(table), sites)
    assert [s.name for s in sets] == ["heads", "neuron"]
    assert same(sets[0].neurons, expect({1: range(24, 32), 0: range(8, 16)}))


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("missing.json", None, r"does not exist"),
        ("bad.json", "{not json", r"is not valid JSON"),
        ("empty.json", "[]", r"non-empty list"),
        ("nofield.json", '{"name": "a"}', r'expected an object \{"name": \.\.\., "components"'),
        ("extra.json", '{"name": "a", "components": "L1", "why": 1}', r"unknown field\(s\) why"),
        ("numbers.json", '{"name": "a", "components": [1, 2]}', r"components must be a list of strings"),
        ("dup.json", '[{"name": "a", "components": "L1"}, {"name": "a", "components": "L0"}]', r"given twice"),
        ("header.csv", "a,L1\n", r"header name,components"),
        ("fields.csv", "name,components\na,L1,L0\n", r"line 2: expected two fields"),
        ("dup.csv", "name,components\na,L1\na,L0\n", r"set name 'a' is given twice"),
        ("badtoken.csv", "name,components\na,L1x\n", r"cannot read component 'L1x' \(in set 'a'\)"),
    ],
)
def test_bad_files(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(KnockoutError, match=message):
        parse_spec(str(path))


def test_scan_units(sites, mlp_sites):
    heads = scan_units(sites, "head")
    assert [u.name for u in heads] == [f"L{layer}.H{h}" for layer in range(2) for h in range(4)]
    for u in heads:  # each unit is one head's d_head neurons, ablated alone
        layer, head = u.components[0].layer, u.components[0].first
        assert same(u.neurons, expect({layer: range(8 * head, 8 * head + 8)}))
    assert [u.name for u in scan_units(sites, "layer")] == ["L0", "L1"]
    groups = scan_units(sites, "neurons:10")  # 32 = 10 + 10 + 10 + 2: the last group is shorter
    assert [u.name for u in groups][:5] == ["L0:0-9", "L0:10-19", "L0:20-29", "L0:30-31", "L1:0-9"]
    assert sum(u.n_ablated for u in groups) == 64
    singles = scan_units(sites, "neurons:1")
    assert len(singles) == 64 and singles[5].name == "L0:5"
    with pytest.raises(KnockoutError, match="no heads; scan --unit layer or --unit neurons:K"):
        scan_units(mlp_sites, "head")
    assert len(scan_units(mlp_sites, "neurons:64")) == 2


@pytest.mark.parametrize("unit", ["heads", "neurons", "neurons:0", "neurons:x", "neuron:4", ""])
def test_bad_units(unit):
    with pytest.raises(KnockoutError, match="unknown scan unit"):
        parse_unit(unit)


def test_complement_is_what_keeping_a_set_ablates(sites):
    from knockout.components import complement

    kept = components("L1.H2,L0:3-5", sites)
    outside = complement(kept, sites)
    assert same(outside, expect({0: [i for i in range(32) if i not in (3, 4, 5)], 1: [*range(16), *range(24, 32)]}))
    assert same(complement(outside, sites), kept)
    nothing = [torch.zeros(0, dtype=torch.long) for _ in sites]
    assert same(complement(nothing, sites), expect({0: range(32), 1: range(32)}))
    assert same(complement(complement(nothing, sites), sites), nothing)
    with pytest.raises(KnockoutError, match="1 layers of neurons for 2 sites"):
        complement(kept[:1], sites)
