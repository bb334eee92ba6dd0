"""Inside ``with method.ablate(...)`` the model is the same plain Hugging Face model: its own ``generate`` and forward
see the ablation (equal to a hook-based replacement of the pre-out), and afterwards it is exactly as before. So any
other evaluation (lm-evaluation-harness's ``HFLM(pretrained=model)``, a custom loop) can run on an ablated model."""

from __future__ import annotations

import torch
import transformers as tf

import tiny
from knockout import MethodContext, NeuronSelection, find_sites, get_method, replace_with_constants
from knockout.stats import Statistics


def _greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by hand: argmax of the last position, n times (no KV cache, no generate)."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generate_and_forward_of_the_ablated_hf_model():
    model = tiny.causal_lm("llama")
    sites = find_sites(model)
    stats = Statistics([s.width for s in sites])
    for s, layer in zip(sites, stats.layers):  # statistics of made-up activations, so mean != 0
        layer.add(torch.randn(200, s.width) * 2 + torch.linspace(-3, 3, s.width))
    method = get_method("mean")(MethodContext(model, sites, stats))
    neurons = NeuronSelection([s.width for s in sites], seed=0).at(0.75)
    ids = torch.tensor([[5, 17, 33, 8, 61, 2]])
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before_logits = model(ids).logits.detach()
    before = model.generate(ids, **gen)

    with replace_with_constants(sites, neurons, stats.means()):  # the reference: a hook on the pre-out
        want_logits = model(ids).logits.detach()
        want = _greedy(model, ids, 8)

    with method.ablate(neurons):
        assert type(model) is tf.LlamaForCausalLM and isinstance(model, tf.PreTrainedModel)
        torch.testing.assert_close(model(ids).logits, want_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(ids, **gen), want)  # HF's own generate, with its KV cache
        assert not torch.allclose(model(ids).logits, before_logits, atol=1e-3)  # the ablation is visible

    assert torch.equal(model.generate(ids, **gen), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # restored bit for bit
    assert torch.equal(model(ids).logits, before_logits)
