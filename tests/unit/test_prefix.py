"""Skipping the layers below an ablation (reusing their recorded unablated outputs) gives the logits of a full
forward pass, bit for bit, on several families; models it cannot handle are evaluated in full."""

import pytest
import torch
import transformers as tf

import tiny
from knockout import find_sites
from knockout.data.text import causal_batches
from knockout.evaluation import evaluate
from knockout.evaluation.prefix import LayerCache, decoder_layers
from knockout.hooks import fold_constants


def _batches(n: int = 6, length: int = 10, batch_size: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, tiny.VOCAB, (length - i % 3,), generator=g).tolist() for i in range(n)]
    return causal_batches(seqs, batch_size, 0)  # rows of different lengths: padding too


def _four_layer_llama():
    cfg = tf.LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4, intermediate_size=64,
        vocab_size=tiny.VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


MODELS = {
    "llama4": _four_layer_llama,
    "gpt2": lambda: tiny.causal_lm("gpt2"),
    "opt": lambda: tiny.causal_lm("opt"),
    "gpt_neox": lambda: tiny.causal_lm("gpt_neox"),
    "gemma3_text": lambda: tiny.causal_lm("gemma3_text"),
    "roberta": lambda: tiny.masked_lm("roberta"),
}


def _logits_per_batch(model, batches, on_batch=None):
    out = []
    with torch.inference_mode():
        for i, b in enumerate(batches):
            if on_batch is not None:
                on_batch(i, b)
            out.append(model(**b.inputs).logits)
    return out


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_skipping_the_layers_below_gives_the_same_logits(family, kind):
    model = MODELS[family]()
    sites = find_sites(model, kind=kind)
    layers = decoder_layers(model, sites)
    assert layers is not None and len(layers) == len(sites)
    batches = _batches()
    n = len(sites)
    cache = LayerCache(layers, range(n - 1))
    with cache.record():
        clean = _logits_per_batch(model, batches, cache.on_batch())
    for layer in range(1, n):
        neurons = [torch.arange(3, 9) if i == layer else torch.zeros(0, dtype=torch.long) for i in range(n)]
        values = [torch.randn(s.width) for s in sites]
        with fold_constants(sites, neurons, values):
            full = _logits_per_batch(model, batches)
            with cache.skip_below(layer):
                skipped = _logits_per_batch(model, batches, cache.on_batch())
        for a, b in zip(full, skipped):
            assert torch.equal(a, b)
        assert any(not torch.equal(a, c) for a, c in zip(full, clean))  # the ablation changed something
    # the stubs are gone: the layers compute again
    assert all("forward" not in m.__dict__ for m in layers)
    assert all(torch.equal(a, b) for a, b in zip(clean, _logits_per_batch(model, batches)))


def test_skipping_keeps_evaluate_metrics_identical():
    model = _four_layer_llama()
    sites = find_sites(model)
    layers = decoder_layers(model, sites)
    batches = _batches(n=7)
    cache = LayerCache(layers, [2])
    with cache.record():
        evaluate(model, batches, on_batch=cache.on_batch())
    neurons = [torch.arange(8, 16) if i == 3 else torch.zeros(0, dtype=torch.long) for i in range(4)]
    with fold_constants(sites, neurons, [torch.zeros(32)] * 4):
        full = evaluate(model, batches, per_doc=True)
        with cache.skip_below(3):
            fast = evaluate(model, batches, on_batch=cache.on_batch(), per_doc=True)
    assert (fast.n, fast.n_correct, fast.ce_sum) == (full.n, full.n_correct, full.ce_sum)
    assert all((fast.doc_sums()[k] == full.doc_sums()[k]).all() for k in ("n", "ce_sum", "correct"))


def test_stubs_are_removed_after_an_exception():
    model = _four_layer_llama()
    sites = find_sites(model)
    layers = decoder_layers(model, sites)
    cache = LayerCache(layers, [1])
    batches = _batches()
    with cache.record():
        _logits_per_batch(model, batches, cache.on_batch())
    with pytest.raises(RuntimeError, match="boom"), cache.skip_below(2):
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in layers)


def test_models_it_cannot_handle_are_left_alone():
    model = _four_layer_llama()
    sites = find_sites(model)
    model.hf_device_map = {"model.layers.0": "cpu", "model.layers.1": "disk"}  # placed by accelerate
    assert decoder_layers(model, sites) is None
    del model.hf_device_map
    shared = _four_layer_llama()
    sites = find_sites(shared)
    shared.model.layers[1] = shared.model.layers[0]  # one module run as two layers
    assert decoder_layers(shared, sites) is None
