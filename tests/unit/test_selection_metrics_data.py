"""Nested neuron selection, metrics on hand-built logits, and token-exact data."""

import math

import pytest
import torch

import tiny
from knockout import KnockoutError, Metrics, NeuronSelection
from knockout.ablation.selection import count_for, validate_fractions
from knockout.data import IGNORE
from knockout.data.text import causal_batches, load_texts, tokenize_exact

FRACTIONS = [round(0.1 * i, 10) for i in range(11)]


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_selection_is_nested_and_reaches_everything(mode):
    widths = [48, 48, 20]
    sel = NeuronSelection(widths, seed=3, mode=mode)
    previous = [set() for _ in widths]
    for f in FRACTIONS:
        chosen = sel.at(f)
        sets = [set(c.tolist()) for c in chosen]
        assert all(p <= s for p, s in zip(previous, sets))  # nested
        assert all(len(s) == len(c) for s, c in zip(sets, chosen))  # no duplicates
        assert all(0 <= i < w for s, w in zip(sets, widths) for i in s)
        assert sum(map(len, sets)) == sel.n_ablated(f)
        previous = sets
    assert [len(s) for s in previous] == widths  # 100% is everything
    assert sel.n_ablated(0.0) == 0


def test_per_layer_counts_are_rounded_and_equal_across_layers():
    sel = NeuronSelection([576, 576], seed=0)
    for f in FRACTIONS:
        n = math.floor(f * 576 + 0.5)
        assert [len(c) for c in sel.at(f)] == [n, n]
    assert count_for(0.3, 576) == 173 and count_for(0.5, 5) == 3 and count_for(1.0, 7) == 7


def test_global_mode_counts_over_all_neurons():
    sel = NeuronSelection([10, 30], seed=0, mode="global")
    assert sum(len(c) for c in sel.at(0.25)) == 10
    assert sel.n_ablated(0.25) == 10


def test_selection_depends_on_seed_only():
    a, b, c = (NeuronSelection([64, 64], seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.at(0.5), b.at(0.5)))
    assert not all(torch.equal(x, y) for x, y in zip(a.at(0.5), c.at(0.5)))
    assert sorted(a.state_dict()) == ["seed1.layer0", "seed1.layer1"]


@pytest.mark.parametrize("bad", [[], [1.5], [-0.1], [float("nan")], ["a"], [True]])
def test_invalid_fractions(bad):
    with pytest.raises(KnockoutError, match="fraction"):
        validate_fractions(bad)


def test_fractions_sorted_and_deduplicated():
    assert validate_fractions([0.5, 0, 0.5, 1]) == (0.0, 0.5, 1.0)


def test_metrics_on_hand_built_logits():
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 0, 1] = 5  # target 1: correct
    logits[0, 1, 2] = 5  # target 3: wrong
    logits[0, 2] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # ignored position
    logits[1, 0] = 0.0  # uniform: argmax = 0 (first of ties), target 0: correct
    targets = torch.tensor([[1, 3, IGNORE], [0, IGNORE, IGNORE]])
    m = Metrics()
    m.add(logits[:1], targets[:1])
    m.add(logits[1:], targets[1:])
    assert m.n == 3 and m.n_correct == 2 and m.top1 == pytest.approx(2 / 3)
    lse = math.log(math.exp(5) + 3 * math.exp(-10))
    expected_ce = [lse - 5, lse - (-10), math.log(4)]
    assert m.ce == pytest.approx(sum(expected_ce) / 3, rel=1e-6)


def test_metrics_for_class_labels():
    m = Metrics()
    m.add(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([1, 1]))
    assert m.top1 == 0.5
    assert m.ce == pytest.approx((math.log(1 + math.e**-1) + math.log(1 + math.e**2)) / 2, rel=1e-6)


def test_tokenize_exact_gives_exactly_n_targets():
    tok = tiny.tokenizer()
    texts = ["abcdef", "x", "", "ghijklmnop", "qrstuvwxyz" * 3]
    for n in (1, 5, 6, 14, 25):  # 5 + 9 + 11 targets available
        seqs = tokenize_exact(tok, texts, n, max_length=12)
        assert sum(len(s) - 1 for s in seqs) == n
        assert all(2 <= len(s) <= 12 for s in seqs)
    seqs = tokenize_exact(tok, texts, 7, max_length=12, count="positions")
    assert sum(map(len, seqs)) == 7
    with pytest.raises(KnockoutError, match="only"):
        tokenize_exact(tok, texts, 26, max_length=12)
    with pytest.raises(KnockoutError, match="positive"):
        tokenize_exact(tok, texts, 0, max_length=12)


def test_causal_batches_shift_targets_and_pad():
    batches = causal_batches([[5, 6, 7], [8, 9]], batch_size=2, pad=0)
    (b,) = batches
    assert b.inputs["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b.targets.tolist() == [[6, 7, IGNORE], [9, IGNORE, IGNORE]]
    assert b.valid.tolist() == [[True, True, True], [True, True, False]]
    assert b.n_scored == 3


def test_local_and_builtin_splits_are_disjoint(tmp_path):
    path = tiny.write_corpus(tmp_path / "c.txt", n_docs=50)
    collect, evaluate = list(load_texts(path, "collect")), list(load_texts(path, "eval"))
    assert len(evaluate) == 10 and len(collect) == 40
    assert not set(collect) & set(evaluate)
    wiki_eval = list(load_texts("wiki", "eval"))
    wiki_collect = list(load_texts("wiki", "collect"))
    assert len(wiki_eval) + len(wiki_collect) > 10000 and not set(wiki_eval) & set(wiki_collect)
    assert list(load_texts("wiki", "eval"))[:5] == wiki_eval[:5]  # deterministic


def test_data_errors(tmp_path):
    with pytest.raises(KnockoutError, match="does not exist"):
        load_texts(str(tmp_path / "none.txt"), "eval")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(KnockoutError, match="no text"):
        load_texts(str(tmp_path / "empty.txt"), "eval")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(KnockoutError, match="bad.jsonl:2"):
        load_texts(str(tmp_path / "bad.jsonl"), "eval")


def test_eval_docs_gives_the_same_documents_whatever_the_tokenizer(tmp_path):
    """--eval-docs N: the first N documents whole (cut at max_length), for two different tokenizers the same texts;
    refused for masked LMs, with an error naming --eval-tokens."""
    import tiny
    from knockout.data.tasks import DataSpec, ModelInputs, eval_batches
    from knockout.data.text import load_texts, tokenize_docs
    from knockout.errors import KnockoutError

    corpus = tiny.write_corpus(tmp_path / "corpus.txt", n_docs=40)
    texts = list(load_texts(corpus, "eval"))
    chars, words = tiny.tokenizer("causal"), tiny.tokenizer("masked")
    a, b = tokenize_docs(chars, texts, 5, 400), tokenize_docs(words, texts, 5, 400)
    assert len(a) == len(b) == 5
    joined = lambda tok, seq: "".join(t for t in tok.convert_ids_to_tokens(seq) if t not in ("<s>", "</s>"))  # noqa: E731
    assert [joined(chars, s) for s in a] == [joined(words, s) for s in b] == texts[:5]  # whole documents, in order
    spec = DataSpec(corpus, eval_tokens=1, stats_tokens=10, max_length=30, batch_size=2, eval_docs=5)
    batches = eval_batches(spec, ModelInputs("causal", chars, None), seed=0)
    assert sum(bt.size for bt in batches) == 5
    assert all(int(bt.inputs["attention_mask"].sum(1).max()) <= 30 for bt in batches)
    with pytest.raises(KnockoutError, match="--eval-docs counts whole documents .* give --eval-tokens"):
        eval_batches(spec, ModelInputs("masked", words, tiny.masked_lm().config), seed=0)
    with pytest.raises(KnockoutError, match=f"only {len(texts)} documents"):
        tokenize_docs(chars, texts, 1000, 400)
    with pytest.raises(KnockoutError, match="eval_docs must be a positive integer"):
        DataSpec(corpus, eval_tokens=1, stats_tokens=10, max_length=30, batch_size=2, eval_docs=0)
