"""Resampling ablations: alignment per row and position, seeding, caching, and an independent hook reference."""

from __future__ import annotations

import random

import pytest
import torch

import tiny
from knockout.ablation import METHODS, MethodContext, NeuronSelection
from knockout.ablation.options import ResampleOptions
from knockout.ablation.random_inputs import random_token_ids, token_pool
from knockout.ablation.resample import TokenResample
from knockout.data.batch import Batch
from knockout.data.images import ImageOptions
from knockout.data.text import causal_batches
from knockout.errors import KnockoutError
from knockout.evaluation.evaluate import evaluate
from knockout.hooks import capture, edit_preout
from knockout.loading import LoadedModel
from knockout.sites import find_sites

TEXT_METHODS = ("resample-chars", "resample-tokens", "resample-text")


@pytest.fixture(scope="module")
def gpt2():
    model = tiny.causal_lm("gpt2")
    return model, find_sites(model), tiny.tokenizer("causal")


def text_batches(n_seqs: int = 7, batch_size: int = 3, seed: int = 1) -> list[Batch]:
    """Right-padded causal batches of random printable-character ids, of varying lengths (several batches)."""
    rng = random.Random(seed)
    seqs = [[rng.randrange(5, tiny.VOCAB) for _ in range(rng.randint(6, 14))] for _ in range(n_seqs)]
    return causal_batches(seqs, batch_size, pad=0)


def make(name_or_cls, model, sites, tok, task="causal", batches=(), seed=0, generator=None, image=None, **resample):
    """The method with ``resample`` settings (``fixed=True``, ``cache=False``) and ``image`` settings (a dict)."""
    cls = METHODS[name_or_cls] if isinstance(name_or_cls, str) else name_or_cls
    ctx = MethodContext(
        model, sites, None, seed, task, tok, list(batches), resample=ResampleOptions(**resample),
        image=ImageOptions(**(image or {})), generator=generator,
    )  # fmt: skip
    return cls(ctx)


def all_neurons(sites):
    return [torch.arange(s.width) for s in sites]


@torch.no_grad()
def preout(model, sites, inputs) -> list[torch.Tensor]:
    acts = [None] * len(sites)

    def keep(site, z):
        acts[site.layer] = z.clone()

    with capture(sites, keep):
        model(**inputs)
    return acts


@torch.no_grad()
def reference_logits(model, sites, inputs, neurons, source_acts) -> torch.Tensor:
    """Hand-written resampling: z[..., i] := source_acts[l][..., i] for i in neurons[l]."""

    def fn(site, z):
        z = z.clone()
        i = neurons[site.layer]
        z[..., i] = source_acts[site.layer][..., i]
        return z

    with edit_preout(sites, fn):
        return model(**inputs).logits


@torch.no_grad()
def method_logits(method, model, batches, neurons) -> list[torch.Tensor]:
    out = []
    with method.ablate(neurons):
        for i, b in enumerate(batches):
            method.on_batch(i, b)
            out.append(model(**b.inputs).logits)
    return out


class _SelfResample(TokenResample):
    """Test-only: the "random" input of a batch is the batch itself."""

    def random_inputs(self, index, batch):
        return dict(batch.inputs)


def test_resampling_from_the_input_itself_changes_nothing(gpt2):
    model, sites, tok = gpt2
    batches = text_batches()
    method = make(_SelfResample, model, sites, tok)
    got = method_logits(method, model, batches, all_neurons(sites))
    for b, logits in zip(batches, got):
        assert torch.allclose(logits, model(**b.inputs).logits, atol=1e-5)


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_equals_hand_written_hook_on_random_activations(gpt2, name):
    model, sites, tok = gpt2
    batches = text_batches()
    method = make(name, model, sites, tok, batches=batches, seed=3)
    selection = NeuronSelection([s.width for s in sites], seed=3)
    for fraction in (0.5, 1.0):  # the second fraction uses the cached activations
        neurons = selection.at(fraction)
        got = method_logits(method, model, batches, neurons)
        for i, b in enumerate(batches):
            rand = method.random_inputs(i, b)
            assert rand["input_ids"].shape == b.inputs["input_ids"].shape
            assert bool(rand["attention_mask"].all())
            want = reference_logits(model, sites, b.inputs, neurons, preout(model, sites, rand))
            assert torch.allclose(got[i], want, atol=1e-5)
            assert (got[i] - model(**b.inputs).logits).abs().max() > 1e-3  # the ablation does something
    # evaluate() drives on_batch itself and gives the same metrics as the hand-written hook
    neurons = selection.at(0.5)
    with method.ablate(neurons):
        m = evaluate(model, batches, on_batch=method.on_batch)
    from knockout.evaluation.metrics import Metrics

    ref = Metrics()
    for i, b in enumerate(batches):
        ref.add(
            reference_logits(model, sites, b.inputs, neurons, preout(model, sites, method.random_inputs(i, b))),
            b.targets,
        )
    assert m.n == ref.n and m.top1 == pytest.approx(ref.top1) and m.ce == pytest.approx(ref.ce, abs=1e-5)


def test_each_row_and_batch_gets_its_own_random_input(gpt2):
    """Batch size > 1 and several batches: row r of batch i takes the activations of random row r of batch i.

    The reference runs every row alone, with activations captured on that row's random input alone. (The authors'
    code indexed the batch dimension as positions, which made this ablation a no-op: caught by the last assert.)
    """
    model, sites, tok = gpt2
    batches = text_batches(n_seqs=8, batch_size=3)
    method = make("resample-tokens", model, sites, tok, seed=5)
    neurons = all_neurons(sites)
    got = method_logits(method, model, batches, neurons)
    firsts = []
    for i, b in enumerate(batches):
        rand = method.random_inputs(i, b)
        assert len({tuple(r) for r in rand["input_ids"].tolist()}) == b.size  # rows differ
        firsts.append(rand["input_ids"][0, :6])
        base = model(**b.inputs).logits
        for r in range(b.size):
            row = {k: v[r : r + 1] for k, v in b.inputs.items()}
            src = preout(model, sites, {k: v[r : r + 1] for k, v in rand.items()})
            want = reference_logits(model, sites, row, neurons, src)
            assert torch.allclose(got[i][r : r + 1], want, atol=1e-5)
            assert (got[i][r] - base[r]).abs().max() > 1e-2
    assert not torch.equal(firsts[0], firsts[1])  # batches differ


def test_random_inputs_fixed_per_seed_and_index(gpt2):
    model, sites, tok = gpt2
    b = text_batches()[0]
    for name in ("resample-chars", "resample-tokens"):
        a = make(name, model, sites, tok, seed=0).random_inputs(0, b)["input_ids"]
        assert torch.equal(a, make(name, model, sites, tok, seed=0).random_inputs(0, b)["input_ids"])
        assert not torch.equal(a, make(name, model, sites, tok, seed=1).random_inputs(0, b)["input_ids"])
        assert not torch.equal(a, make(name, model, sites, tok, seed=0).random_inputs(1, b)["input_ids"])


def test_random_tokens_never_special():
    for kind in ("causal", "masked"):
        tok = tiny.tokenizer(kind)
        ids = random_token_ids(tok, 64, 128, seed=7)
        special = set(tok.all_special_ids)
        assert special and not special & set(ids.unique().tolist())
        assert set(ids.unique().tolist()) == set(token_pool(tok).tolist())  # the rest of the vocabulary is used
    assert not set(random_token_ids(tok, 4, 500, seed=0, vocab_size=50).tolist()[0]) - set(range(5, 50))


def test_random_chars_are_printable_text(gpt2):
    model, sites, tok = gpt2
    b = text_batches()[0]
    ids = make("resample-chars", model, sites, tok).random_inputs(0, b)["input_ids"]
    assert ids.shape == b.inputs["input_ids"].shape
    assert ids.min() >= 5  # printable characters only: no <unk>, no padding (every char of 32..123 is in the vocab)
    masked = tiny.tokenizer("masked")
    row = make("resample-chars", model, sites, masked).random_inputs(0, b)["input_ids"][0]
    assert row[0] == 2  # tokenised as the model reads text: <s> first


def test_resample_text_deterministic_per_seed(gpt2):
    model, sites, tok = gpt2
    b = text_batches()[1]
    ids = make("resample-text", model, sites, tok, seed=0).random_inputs(0, b)["input_ids"]
    assert ids.shape == b.inputs["input_ids"].shape
    assert ids[:, 0].eq(tok("The")["input_ids"][0]).all()  # starts with the prompt
    assert torch.equal(ids, make("resample-text", model, sites, tok, seed=0).random_inputs(0, b)["input_ids"])
    assert not torch.equal(ids, make("resample-text", model, sites, tok, seed=1).random_inputs(0, b)["input_ids"])
    # generated by the *unablated* model, also when asked inside the ablation
    method = make("resample-text", model, sites, tok, seed=0)
    with method.ablate(all_neurons(sites)):
        inside = method.random_inputs(0, b)["input_ids"]
    assert torch.equal(ids, inside)


def test_resample_text_for_masked_lm_needs_a_causal_model(gpt2):
    gen, _, causal_tok = gpt2
    model = tiny.masked_lm("roberta")
    sites, tok = find_sites(model), tiny.tokenizer("masked")
    with pytest.raises(KnockoutError, match="--resample-model"):
        make("resample-text", model, sites, tok, task="masked")
    loaded = LoadedModel(gen, causal_tok, "causal", "tiny-gpt2", torch.device("cpu"))
    ids = torch.randint(5, tiny.VOCAB, (2, 9))
    b = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.ones_like(ids, dtype=torch.bool), ids)
    method = make("resample-text", model, sites, tok, task="masked", generator=loaded)
    rand = method.random_inputs(0, b)["input_ids"]
    assert rand.shape == (2, 9) and bool((rand[:, 0] == 2).all())  # re-tokenised: <s> first
    again = make("resample-text", model, sites, tok, task="masked", generator=loaded).random_inputs(0, b)
    assert torch.equal(rand, again["input_ids"])
    neurons = all_neurons(sites)
    (got,) = method_logits(method, model, [b], neurons)
    assert torch.allclose(
        got, reference_logits(model, sites, b.inputs, neurons, preout(model, sites, again)), atol=1e-5
    )


def test_resample_pixels_on_vit():
    model = tiny.vit_classifier()
    sites = find_sites(model)
    g = torch.Generator().manual_seed(0)
    batches = [
        Batch(
            {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)},
            torch.ones(n, 1, dtype=torch.bool),
            torch.tensor([0, 1, 2][:n]),
        )
        for n in (3, 2)
    ]
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    method = make("resample-pixels", model, sites, None, task="image", seed=2, image={"mean": mean, "std": std})
    neurons = NeuronSelection([s.width for s in sites], seed=2).at(0.7)
    got = method_logits(method, model, batches, neurons)
    for i, b in enumerate(batches):
        rand = method.random_inputs(i, b)["pixel_values"]
        assert rand.shape == b.inputs["pixel_values"].shape
        raw = rand * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6 and raw.std() > 0.2
        assert not torch.equal(rand[0], rand[1])
        want = reference_logits(model, sites, b.inputs, neurons, preout(model, sites, {"pixel_values": rand}))
        assert torch.allclose(got[i], want, atol=1e-5)
        assert (got[i] - model(**b.inputs).logits).abs().max() > 1e-3
    # normalised like the evaluation images: default 0.5 / 0.5 without a processor, else the processor's values
    plain = make("resample-pixels", model, sites, None, task="image").random_inputs(0, batches[0])["pixel_values"]
    assert plain.min() >= -1 and plain.max() <= 1 and plain.min() < -0.9 and plain.max() > 0.9

    class Processor:
        image_mean, image_std = [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]

    proc = make("resample-pixels", model, sites, Processor(), task="image", image={"mean": mean, "std": std})
    proc = proc.random_inputs(0, batches[0])["pixel_values"]
    assert proc.min() >= 0 and proc.max() <= 2 and proc.max() > 1.9


def test_methods_check_the_task(gpt2):
    model, sites, tok = gpt2
    with pytest.raises(KnockoutError, match="does not apply"):
        make("resample-pixels", model, sites, tok)
    vit = tiny.vit_classifier()
    for name in TEXT_METHODS:
        with pytest.raises(KnockoutError, match="does not apply"):
            make(name, vit, find_sites(vit), None, task="image")


def test_fixed_option_gives_one_random_input_for_all_rows(gpt2):
    model, sites, tok = gpt2
    batches = text_batches()
    for name in ("resample-chars", "resample-tokens"):
        method = make(name, model, sites, tok, batches=batches, fixed=True)
        longest = max(b.valid.shape[1] for b in batches)
        rows = []
        for i, b in enumerate(batches):
            ids = method.random_inputs(i, b)["input_ids"]
            assert ids.shape == b.inputs["input_ids"].shape
            assert bool((ids == ids[0]).all())  # identical rows
            rows.append(ids[0])
        for r in rows:  # and the same sequence in every batch, cut to its length
            assert torch.equal(r, rows[0][: len(r)] if len(r) <= len(rows[0]) else r)
        assert max(len(r) for r in rows) <= longest
        assert not bool((make(name, model, sites, tok).random_inputs(0, batches[0])["input_ids"] == rows[0]).all())
    neurons = all_neurons(sites)
    got = method_logits(method, model, batches, neurons)
    for i, b in enumerate(batches):
        src = preout(model, sites, method.random_inputs(i, b))  # causal: a prefix has the same activations
        assert torch.allclose(got[i], reference_logits(model, sites, b.inputs, neurons, src), atol=1e-5)


def test_cache_computes_once_per_batch_and_can_be_turned_off(gpt2, monkeypatch):
    model, sites, tok = gpt2
    batches = text_batches()
    neurons = NeuronSelection([s.width for s in sites], seed=0).at(0.5)
    results = {}
    for cache in (True, False):
        method = make("resample-tokens", model, sites, tok, cache=cache)
        calls = []
        original = method.activations_of
        monkeypatch.setattr(method, "activations_of", lambda inputs, o=original, c=calls: c.append(1) or o(inputs))
        results[cache] = [method_logits(method, model, batches, neurons) for _ in range(2)]
        assert len(calls) == (len(batches) if cache else 2 * len(batches))
    for a, b in zip(results[True][1], results[False][1]):
        assert torch.equal(a, b)


def test_forward_without_on_batch_raises(gpt2):
    model, sites, tok = gpt2
    b = text_batches()[0]
    method = make("resample-tokens", model, sites, tok)
    with method.ablate(all_neurons(sites)), pytest.raises(KnockoutError, match="on_batch"):
        model(**b.inputs)
    method.on_batch(0, b)
    other = text_batches(n_seqs=2, batch_size=2, seed=9)[0]
    with method.ablate(all_neurons(sites)):
        method.on_batch(0, b)
        with pytest.raises(KnockoutError, match="shape"):
            model(**other.inputs)  # activations of another batch are never broadcast or cut to fit
    assert model(**b.inputs).logits.shape[0] == b.size  # hooks removed


def test_generation_longer_than_the_generators_context_restarts_from_the_prompt():
    from knockout.ablation.random_inputs import sample_long

    model = tiny.causal_lm("opt")  # max_position_embeddings = 64
    prompt = torch.tensor([[5, 6, 7]])
    ids = sample_long(model, prompt, 150, seed=3)
    assert ids.shape[1] >= 150
    assert torch.equal(ids[:, :3], prompt) and torch.equal(ids[:, 64:67], prompt)  # second segment restarts
    assert not torch.equal(ids[:, 3:64], ids[:, 67:128])  # with its own random stream
    assert torch.equal(ids, sample_long(model, prompt, 150, seed=3))  # deterministic


def test_all_methods_of_a_masked_lm_include_resample_text_only_with_a_generator():
    from knockout.ablation.methods import methods_for

    assert "resample-text" in methods_for("causal")
    assert "resample-text" not in methods_for("masked")
    assert "resample-text" in methods_for("masked", ResampleOptions(model="facebook/opt-1.3b"))
    assert methods_for("image") == ["zero", "mean", "peak", "resample-pixels"]
