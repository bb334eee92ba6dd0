"""The MLP site: its table, the captured activations against a hand computation from the weights, and the folded
ablation against a hook."""

import pytest
import torch
import torch.nn.functional as F

import tiny
from knockout import KnockoutError, MethodContext, NeuronSelection, capture, find_sites, get_method
from knockout.hooks import replace_with_constants
from knockout.sites import MLP_SITE_PATTERNS, SITE_PATTERNS
from knockout.stats import Statistics

GATED = ("llama", "mistral", "qwen2", "gemma3_text")
FAMILIES = [*GATED, "opt", "gpt2", "gpt_neox", "bert", "roberta", "vit"]

EXPECTED_NAMES = {
    "llama": "model.layers.{i}.mlp.down_proj",
    "mistral": "model.layers.{i}.mlp.down_proj",
    "qwen2": "model.layers.{i}.mlp.down_proj",
    "gemma3_text": "model.layers.{i}.mlp.down_proj",
    "opt": "model.decoder.layers.{i}.fc2",
    "gpt2": "transformer.h.{i}.mlp.c_proj",
    "gpt_neox": "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
    "bert": "bert.encoder.layer.{i}.output.dense",
    "roberta": "roberta.encoder.layer.{i}.output.dense",
    "vit": "vit.layers.{i}.mlp.fc2",
}

# Activations written out with torch.nn.functional, independent of the models' activation classes.
ACTS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,  # the exact (erf) GELU
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _model(family):
    if family in ("bert", "roberta"):
        return tiny.masked_lm(family), {"input_ids": torch.randint(5, tiny.VOCAB, (3, 9))}
    if family == "vit":
        return tiny.vit_classifier(), {"pixel_values": torch.randn(2, 3, 32, 32)}
    return tiny.causal_lm(family), {"input_ids": torch.randint(5, tiny.VOCAB, (3, 9))}


def inputs_shape(inputs):
    """``[batch, pos]`` of the pre-out on ``inputs``: tokens, or ViT's patches and class token."""
    if "pixel_values" in inputs:
        return (inputs["pixel_values"].shape[0], (32 // 8) ** 2 + 1)
    return tuple(inputs["input_ids"].shape)


def _linear(x, layer, transposed=False):
    """x @ W^T + b by hand (``transposed``: GPT-2's Conv1D stores W as [in, out])."""
    w = layer.weight if transposed else layer.weight.T
    return x @ w + (0 if layer.bias is None else layer.bias)


def _mlp_input_modules(family, model):
    """Per layer: (the module whose input is the MLP's input x, function x -> expected MLP neurons)."""
    c = model.config
    act = ACTS[getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None) or c.activation_function]
    if family in GATED:
        return [
            (m.mlp, lambda x, m=m.mlp: act(_linear(x, m.gate_proj)) * _linear(x, m.up_proj)) for m in model.model.layers
        ]
    if family == "opt":
        return [(m.fc1, lambda x, m=m: act(_linear(x, m.fc1))) for m in model.model.decoder.layers]
    if family == "gpt2":
        return [(m.mlp, lambda x, m=m.mlp: act(_linear(x, m.c_fc, transposed=True))) for m in model.transformer.h]
    if family == "gpt_neox":
        return [(m.mlp, lambda x, m=m.mlp: act(_linear(x, m.dense_h_to_4h))) for m in model.gpt_neox.layers]
    if family in ("bert", "roberta"):
        layers = getattr(model, family).encoder.layer
        return [(m.intermediate, lambda x, m=m.intermediate: act(_linear(x, m.dense))) for m in layers]
    return [(m.mlp, lambda x, m=m.mlp: act(_linear(x, m.fc1))) for m in model.vit.layers]


def test_mlp_table_covers_the_attention_table_except_mixture_of_experts():
    assert set(SITE_PATTERNS) - set(MLP_SITE_PATTERNS) == {"mixtral"}
    assert set(MLP_SITE_PATTERNS) <= set(SITE_PATTERNS)
    model = tiny.causal_lm("llama")
    model.config.model_type = "mixtral"
    with pytest.raises(KnockoutError, match="no single MLP output projection"):
        find_sites(model, kind="mlp")
    with pytest.raises(KnockoutError, match="no heads"):
        find_sites(tiny.causal_lm("llama"), n_heads=4, kind="mlp")
    with pytest.raises(KnockoutError, match="site must be one of"):
        find_sites(model, kind="ffn")
    sites = find_sites(tiny.causal_lm("llama"), site_module="model.layers.{i}.mlp.down_proj", kind="mlp")
    assert [s.width for s in sites] == [64, 64]


def test_unknown_type_auto_detects_the_mlp_site():
    model = tiny.masked_lm("bert")
    model.config.model_type = "my-bert"  # ViT's and BERT's patterns both find the same modules: one candidate
    assert [s.name for s in find_sites(model, kind="mlp")] == [f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_mlp_neurons_equal_hand_computation(family):
    model, inputs = _model(family)
    sites = find_sites(model, kind="mlp")
    assert [s.name for s in sites] == [EXPECTED_NAMES[family].format(i=i) for i in range(2)]
    width = 128 if family == "gpt2" else 64  # GPT-2's MLP is 4 x n_embd; the others' intermediate size is 64
    assert all((s.kind, s.n_heads, s.d_head, s.width) == ("mlp", 1, width, width) for s in sites)
    assert [s.kind for s in find_sites(model)] == ["attention"] * 2  # the default is unchanged
    modules = _mlp_input_modules(family, model)
    seen_x, seen_z = {}, {}

    def keep_input(i):
        return lambda mod, args, kwargs: seen_x.__setitem__(i, args[0] if args else next(iter(kwargs.values())))

    handles = [m.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, (m, _) in enumerate(modules)]
    try:
        with torch.no_grad(), capture(sites, lambda site, z: seen_z.__setitem__(site.layer, z.clone())):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    for layer, (_, expected_of) in enumerate(modules):
        with torch.no_grad():
            expected = expected_of(seen_x[layer])
        # OPT flattens [batch, pos] before its MLP; capture gives every site as [batch, pos, width]
        assert expected.shape == (*seen_x[layer].shape[:-1], sites[layer].width)
        assert seen_z[layer].shape == (*inputs_shape(inputs), sites[layer].width)
        torch.testing.assert_close(seen_z[layer], expected.reshape(seen_z[layer].shape), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])  # no bias / Conv1D / encoder with bias
def test_folded_zero_and_mean_ablation_on_the_mlp_site_equal_a_hook(family):
    model, inputs = _model(family)
    sites = find_sites(model, kind="mlp")
    stats = Statistics([s.width for s in sites])
    for layer, s in enumerate(sites):
        stats.add(layer, torch.randn(64, s.width) * 0.5 + 0.3)
    neurons = NeuronSelection.for_sites(sites, seed=1).at(0.6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        clean = model(**inputs).logits
        for name, values in (("zero", [torch.zeros(s.width) for s in sites]), ("mean", stats.means())):
            with get_method(name)(MethodContext(model, sites, stats)).ablate(neurons):
                folded = model(**inputs).logits
            with replace_with_constants(sites, neurons, values):
                hooked = model(**inputs).logits
            assert not torch.allclose(hooked, clean, atol=1e-4)
            torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
