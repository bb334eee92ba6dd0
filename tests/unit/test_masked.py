"""Masked-LM evaluation: per-seed deterministic BERT-style masks, 80/10/10, scoring only chosen tokens."""

import math

import pytest
import torch

import tiny
from knockout.config import SweepConfig
from knockout.data import tasks
from knockout.data.batch import IGNORE, Batch
from knockout.data.masked import (
    mask_generator,
    mask_sequence,
    masked_batches,
    masked_sequences,
    n_chosen,
    replacement_ids,
    special_ids,
)
from knockout.errors import KnockoutError
from knockout.evaluation.metrics import Metrics
from knockout.loading import LoadedModel
from knockout.runfolder import RunFolder


def _inputs(loaded):
    return tasks.ModelInputs(loaded.task, loaded.processor, loaded.model.config)


def eval_batches(cfg, loaded, seed):
    return tasks.eval_batches(cfg.data_spec(), _inputs(loaded), seed)


def stats_batches(cfg, loaded):
    return tasks.stats_batches(cfg.data_spec(), _inputs(loaded))


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer("masked")


@pytest.fixture
def corpus(tmp_path):
    return tiny.write_corpus(tmp_path / "corpus.txt", n_docs=60)


def _loaded(tok):
    return LoadedModel(tiny.masked_lm("roberta"), tok, "masked", "tiny-roberta", torch.device("cpu"))


def _cfg(corpus, tmp_path, **kw):
    base = dict(
        model="tiny",
        out=str(tmp_path / "run"),
        data=corpus,
        methods=("zero", "mean", "peak"),
        fractions=(0.0, 0.5, 1.0),
        seeds=(0, 1),
        eval_tokens=60,
        stats_tokens=400,
        max_length=64,
        batch_size=4,
        device="cpu",
    )
    return SweepConfig(**{**base, **kw})


def test_same_masks_within_a_seed_and_different_between_seeds(tok, corpus, tmp_path):
    loaded, cfg = _loaded(tok), _cfg(corpus, tmp_path)
    torch.manual_seed(123)  # the global RNG must not matter
    a = eval_batches(cfg, loaded, 0)
    torch.rand(1000)
    b = eval_batches(cfg, loaded, 0)
    c = eval_batches(cfg, loaded, 1)
    assert len(a) == len(b) == len(c)
    for x, y in zip(a, b):
        assert torch.equal(x.inputs["input_ids"], y.inputs["input_ids"])
        assert torch.equal(x.targets, y.targets)
        assert torch.equal(x.valid, y.valid)
    # The same texts for every seed (same lengths), but other choices and replacements.
    assert all(torch.equal(x.valid, z.valid) for x, z in zip(a, c))
    assert any(not torch.equal(x.targets, z.targets) for x, z in zip(a, c))
    assert any(not torch.equal(x.inputs["input_ids"], z.inputs["input_ids"]) for x, z in zip(a, c))


def test_eval_tokens_counts_chosen_tokens(tok, corpus, tmp_path):
    loaded = _loaded(tok)
    for n in (1, 7, 60, 61):
        batches = eval_batches(_cfg(corpus, tmp_path, eval_tokens=n), loaded, 0)
        assert sum(b.n_scored for b in batches) == n


def test_chosen_count_per_text_and_specials_never_chosen(tok, corpus, tmp_path):
    loaded = _loaded(tok)
    specials = torch.tensor(sorted(special_ids(tok)))
    for seed in (0, 1, 2):
        for b in eval_batches(_cfg(corpus, tmp_path, eval_tokens=100), loaded, seed):
            scored = b.targets != IGNORE
            ids = b.inputs["input_ids"]
            # Specials (incl. padding, <s>, </s>) are never chosen: positions holding them are never scored...
            assert not (torch.isin(ids, specials) & scored & (ids != tok.mask_token_id)).any()
            # ... and targets are never special ids.
            assert not torch.isin(b.targets[scored], specials).any()
            assert (ids[:, 0] == tok.bos_token_id).all()  # <s> kept in place
            for row in range(ids.shape[0]):
                n_real = int(b.valid[row].sum())
                n_content = n_real - 2  # <s> ... </s>
                assert int(scored[row].sum()) <= n_chosen(n_content)
                assert ids[row, n_real - 1] == tok.eos_token_id  # </s> kept, also on the cut last text


def test_eighty_ten_ten_split():
    specials = {0, 1, 2, 3, 4}
    mask_id, vocab = 4, 97
    replacements = torch.arange(5, vocab)
    gen = mask_generator(0)
    n_mask = n_random = n_same = 0
    for _ in range(400):
        ids = [2] + torch.randint(5, vocab, (98,)).tolist() + [3]
        inputs, targets = mask_sequence(ids, specials, mask_id, replacements, gen)
        chosen = targets != IGNORE
        assert int(chosen.sum()) == n_chosen(98) == 15
        original = torch.tensor(ids)
        n_mask += int((inputs[chosen] == mask_id).sum())
        n_same += int((inputs[chosen] == original[chosen]).sum())
        n_random += int(((inputs[chosen] != mask_id) & (inputs[chosen] != original[chosen])).sum())
        assert torch.equal(inputs[~chosen], original[~chosen])
        assert torch.equal(targets[chosen], original[chosen])
    n = n_mask + n_random + n_same
    assert n == 400 * 15
    hit = 1 / len(replacements)  # a random replacement may draw the original token
    for got, p in ((n_mask, 0.8), (n_random, 0.1 * (1 - hit)), (n_same, 0.1 * (1 + hit))):
        assert abs(got / n - p) < 4 * math.sqrt(p * (1 - p) / n), (got / n, p)


def test_random_replacements_are_never_special(tok):
    ids = replacement_ids(tok)
    assert not set(ids.tolist()) & special_ids(tok)
    assert len(ids) == len(tok) - len(special_ids(tok))
    assert replacement_ids(tok, vocab_size=50).max() < 50


def test_only_chosen_positions_are_scored(tok):
    seqs = masked_sequences(tok, ["abcdefghijklmnopqrst", "hello world"], n_scored=5, max_length=64)
    [batch] = masked_batches(tok, seqs, batch_size=2, seed=0, pad=tok.pad_token_id)
    targets = batch.targets
    chosen = targets != IGNORE
    assert int(chosen.sum()) == batch.n_scored == 5
    vocab = len(tok)
    # Hand-built logits: right at chosen positions except the first one, which is wrong with a known margin;
    # everywhere else (not scored) confidently wrong, which must not count.
    logits = torch.zeros(*targets.shape, vocab)
    positions = chosen.nonzero().tolist()
    for b, t in positions:
        logits[b, t, targets[b, t]] = 2.0
    b0, t0 = positions[0]
    logits[b0, t0, (targets[b0, t0] + 1) % vocab] = 3.0
    logits[~chosen] = 0.0
    logits[~chosen, 7] = 50.0
    m = Metrics()
    m.add(logits, targets)
    assert m.n == 5
    assert m.top1 == pytest.approx(4 / 5)
    ce_right = -math.log(math.exp(2) / (math.exp(2) + vocab - 1))
    ce_wrong = -math.log(math.exp(2) / (math.exp(2) + math.exp(3) + vocab - 2))
    assert m.ce == pytest.approx((4 * ce_right + ce_wrong) / 5, rel=1e-5)


def test_statistics_are_collected_on_unmasked_text(tok, corpus, tmp_path):
    batches = stats_batches(_cfg(corpus, tmp_path), _loaded(tok))
    ids = torch.cat([b.inputs["input_ids"][b.valid] for b in batches])
    assert not (ids == tok.mask_token_id).any()
    assert sum(int(b.valid.sum()) for b in batches) == 400


def test_too_little_text_is_a_clear_error(tok, tmp_path):
    with pytest.raises(KnockoutError, match="masked tokens"):
        masked_sequences(tok, ["short text"], n_scored=100, max_length=64)
    seqs = masked_sequences(tok, ["short text"], n_scored=1, max_length=64)
    notok = tiny.tokenizer("causal")
    with pytest.raises(KnockoutError, match="mask token"):
        masked_batches(notok, seqs, 1, 0, 0)


def test_full_sweep_on_tiny_roberta(tmp_path):
    import knockout

    folder = tiny.save(tiny.masked_lm("roberta"), "masked", tmp_path / "model")
    corpus = tiny.write_corpus(tmp_path / "corpus.txt", n_docs=60)
    cfg = _cfg(corpus, tmp_path, model=folder)
    out = knockout.run_sweep(cfg, progress=False)
    rows = RunFolder(out).row_dicts()
    assert {(r["method"], r["fraction"], r["seed"]) for r in rows} == {
        *((m, f, s) for m in ("zero", "mean", "peak") for f in (0.0, 0.5, 1.0) for s in (0, 1)),
        ("baseline", 0.0, 0),
        ("baseline", 0.0, 1),
    }
    assert all(r["n_eval"] == 60 for r in rows)
    assert all(math.isfinite(r["ce"]) for r in rows)
    assert all(0.0 <= r["top1"] <= 1.0 for r in rows)


def test_bert_tokenizer_style_batches_are_valid():
    # Batches are plain tensors usable by any AutoModelForMaskedLM: run a tiny BERT on them.
    tok = tiny.tokenizer("masked")
    model = tiny.masked_lm("bert")
    seqs = masked_sequences(tok, ["some text to mask here", "and more"], n_scored=4, max_length=64)
    [batch] = masked_batches(tok, seqs, 2, seed=3, pad=0, vocab_size=model.config.vocab_size)
    assert isinstance(batch, Batch)
    logits = model(**batch.inputs).logits
    assert logits.shape[:2] == batch.targets.shape
