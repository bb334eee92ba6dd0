"""The captured pre-out equals softmax(QK^T / sqrt(d)) V recomputed by hand from the weights."""

import math

import pytest
import torch

import tiny
from knockout import capture, find_sites


def _attention(q, k, v, causal):
    """q: [b, h, t, d]; k, v: [b, h_kv, t, d] -> [b, t, h * d]."""
    b, h, t, d = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v  # [b, h, t, d]
    return out.transpose(1, 2).reshape(b, t, h * d)


def _heads(x, d):
    b, t, _ = x.shape
    return x.view(b, t, -1, d).transpose(1, 2)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _recompute(family, attn, hidden, kwargs, d):
    """Independent recomputation of the pre-out from the attention block's input and its weights."""
    if family == "gpt2":
        q, k, v = attn.c_attn(hidden).split(hidden.shape[-1], dim=-1)
        return _attention(_heads(q, d), _heads(k, d), _heads(v, d), causal=True)
    if family == "opt":
        return _attention(
            _heads(attn.q_proj(hidden), d), _heads(attn.k_proj(hidden), d), _heads(attn.v_proj(hidden), d), causal=True
        )
    if family == "llama":
        cos, sin = kwargs["position_embeddings"]
        q = _rotate(_heads(attn.q_proj(hidden), d), cos, sin)
        k = _rotate(_heads(attn.k_proj(hidden), d), cos, sin)
        return _attention(q, k, _heads(attn.v_proj(hidden), d), causal=True)
    if family == "bert":
        return _attention(
            _heads(attn.query(hidden), d), _heads(attn.key(hidden), d), _heads(attn.value(hidden), d), causal=False
        )
    if family == "vit":
        return _attention(
            _heads(attn.q_proj(hidden), d), _heads(attn.k_proj(hidden), d), _heads(attn.v_proj(hidden), d), causal=False
        )
    raise ValueError(family)


def _model_and_attention(family):
    if family in ("gpt2", "opt", "llama"):
        model = tiny.causal_lm(family)
        blocks = {
            "gpt2": lambda m: m.transformer.h,
            "opt": lambda m: m.model.decoder.layers,
            "llama": lambda m: m.model.layers,
        }[family](model)
        attn = [b.attn if family == "gpt2" else b.self_attn for b in blocks]
        inputs = {"input_ids": torch.randint(5, tiny.VOCAB, (3, 11))}
    elif family == "bert":
        model = tiny.masked_lm("bert")
        attn = [layer.attention.self for layer in model.bert.encoder.layer]
        inputs = {"input_ids": torch.randint(5, tiny.VOCAB, (3, 11))}
    else:
        model = tiny.vit_classifier()
        attn = [layer.attention for layer in model.vit.layers]
        inputs = {"pixel_values": torch.randn(3, 3, 32, 32)}
    return model, attn, inputs


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "bert", "vit"])
def test_captured_preout_equals_recomputation(family):
    model, attn_modules, inputs = _model_and_attention(family)
    sites = find_sites(model)
    seen_in, seen_out = {}, {}
    handles = [
        a.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen_in.__setitem__(i, (args, kwargs)), with_kwargs=True
        )
        for i, a in enumerate(attn_modules)
    ]
    try:
        with torch.no_grad(), capture(sites, lambda site, z: seen_out.__setitem__(site.layer, z.clone())):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen_out) == list(range(len(sites))) == sorted(seen_in)
    for layer, site in enumerate(sites):
        args, kwargs = seen_in[layer]
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        with torch.no_grad():
            expected = _recompute(family, attn_modules[layer], hidden, kwargs, site.d_head)
        assert seen_out[layer].shape == expected.shape == (*hidden.shape[:2], site.width)
        torch.testing.assert_close(seen_out[layer], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "mistral", "gemma3_text", "gpt_neox", "qwen2"])
def test_capture_leaves_logits_bit_identical(family):
    model = tiny.causal_lm(family)
    ids = torch.randint(5, tiny.VOCAB, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with capture(find_sites(model), lambda site, z: z.sum()):
            during = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(before, during) and torch.equal(before, after)
