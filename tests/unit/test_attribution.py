"""Attribution patching: the estimate is the exact first-order change of the metric, checked against finite
differences of an independent hook that moves the unit's pre-out towards the constant.

The tiny GPT-2 runs in float64 throughout (SDPA attention keeps its softmax in float64; Llama's RMSNorm computes in
float32, so a Llama is checked at a tolerance that float32 rounding allows), and the differences are central ones at
two steps with Richardson's extrapolation, which cancels their O(step**2) error."""

import pytest
import torch
import torch.nn.functional as F

import tiny
from knockout import MethodContext, components, find_sites, get_method
from knockout.data import prompts as P
from knockout.data.batch import IGNORE
from knockout.data.text import causal_batches
from knockout.evaluation.attribution import attribution_sums, estimate, metric_name
from knockout.stats import collect_stats


def _text_batches(seed: int, n: int = 6, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, tiny.VOCAB, (length - i % 4,), generator=g).tolist() for i in range(n)]
    return causal_batches(seqs, 4, 0)


@pytest.fixture(scope="module")
def setup():
    model = tiny.causal_lm("gpt2").double()
    model.config._attn_implementation = (
        "sdpa"  # float64 throughout: GPT-2 has no float32 RMSNorm, SDPA no float32 softmax
    )
    sites = find_sites(model)
    stats = collect_stats(model, sites, _text_batches(1), progress=False)
    return model, sites, stats


def _metric(model, batches, sites, neurons, constants, t: float) -> float:
    """By hand, in float64: the mean CE (or logit difference) with each chosen neuron moved a fraction ``t`` of the
    way from its activation to its constant, at every position (t = 1: the ablation)."""

    def make(layer):
        def hook(module, args):
            idx = neurons[layer]
            if not idx.numel():
                return None
            z = args[0].clone()
            z[..., idx] = z[..., idx] + t * (constants[layer][idx].to(z) - z[..., idx])
            return (z,)

        return hook

    handles = [s.module.register_forward_pre_hook(make(s.layer)) for s in sites]
    total, n = 0.0, 0
    try:
        with torch.inference_mode():
            for b in batches:
                logits = model(**b.inputs).logits.double()
                scored = b.targets != IGNORE
                lg, tg = logits[scored], b.targets[scored]
                if b.contrast is None:
                    total += float(F.cross_entropy(lg, tg, reduction="sum"))
                else:
                    ct = b.contrast[scored]
                    total += float((lg.gather(1, tg[:, None]) - lg.gather(1, ct[:, None])).sum())
                n += int(scored.sum())
    finally:
        for h in handles:
            h.remove()
    return total / n


def _derivative(model, batches, sites, neurons, constants, h: float = 1e-3) -> float:
    """d metric / dt at t = 0: central differences at steps h and h/2, extrapolated (Richardson)."""
    m = lambda t: _metric(model, batches, sites, neurons, constants, t)  # noqa: E731
    d1, d2 = (m(h) - m(-h)) / (2 * h), (m(h / 2) - m(-h / 2)) / h
    return (4 * d2 - d1) / 3


@pytest.mark.parametrize("method", ["zero", "mean", "peak"])
@pytest.mark.parametrize("spec", ["L1.H2", "L0:3-11", "L0.H1,L1:30"])
def test_estimate_is_the_derivative_along_the_ablation(setup, method, spec):
    model, sites, stats = setup
    batches = _text_batches(2)
    constants = get_method(method)(MethodContext(model, sites, stats)).constants()
    neurons = components(spec, sites)
    sums = attribution_sums(model, sites, batches)
    est = estimate(sums, constants, neurons)
    assert est == pytest.approx(_derivative(model, batches, sites, neurons, constants), rel=1e-6, abs=1e-12)
    assert abs(est) > 1e-6  # not trivially zero
    # first order: a small step of the way to the ablation changes the metric by about t times the estimate
    t = 1e-2
    step = _metric(model, batches, sites, neurons, constants, t) - _metric(model, batches, sites, neurons, constants, 0)
    assert step == pytest.approx(t * est, rel=5e-2)


def test_estimate_of_the_logit_difference(setup):
    model, sites, stats = setup
    tok = tiny.tokenizer()
    items = [P.Prompt(p, correct=" Mary", incorrect=" John") for p in ("Then John gave it to", "Mary said to", "ab")]
    batches = P.task_batches(tok, items, 2, 40, 0)
    assert metric_name(batches) == "logit_diff"
    constants = get_method("mean")(MethodContext(model, sites, stats)).constants()
    neurons = components("L1.H0,L0.H3", sites)
    est = estimate(attribution_sums(model, sites, batches), constants, neurons)
    assert est == pytest.approx(_derivative(model, batches, sites, neurons, constants), rel=1e-6, abs=1e-12)


def test_estimate_on_a_llama_with_grouped_query_attention():
    model = tiny.causal_lm("llama").double()
    sites = find_sites(model)
    stats = collect_stats(model, sites, _text_batches(1), progress=False)
    batches = _text_batches(2)
    constants = get_method("peak")(MethodContext(model, sites, stats)).constants()
    neurons = components("L1.H2,L0:3-11", sites)
    est = estimate(attribution_sums(model, sites, batches), constants, neurons)
    assert est == pytest.approx(_derivative(model, batches, sites, neurons, constants, h=1e-2), rel=5e-3)


def test_attribution_leaves_the_model_alone(setup):
    model, sites, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attribution_sums(model, sites, _text_batches(3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
