"""Batches sorted by length (opt-in) score exactly the same targets as the batches built in document order, with
less padding; evaluation and statistics agree within float rounding."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import tiny
from knockout import collect_stats, evaluate, find_sites
from knockout.config import SweepConfig
from knockout.data.batch import IGNORE
from knockout.data.packing import scored_fraction, sort_by_length
from knockout.data.tasks import ModelInputs, eval_batches, stats_batches


def _targets(batches) -> Counter:
    """Multiset of (sequence, position, target): the sequence is its real input ids."""
    out = Counter()
    for b in batches:
        lengths = b.inputs["attention_mask"].sum(1).tolist()
        for r, n in enumerate(lengths):
            seq = tuple(b.inputs["input_ids"][r, :n].tolist())
            for t in range(n):
                if b.targets[r, t] != IGNORE:
                    out[(seq, t, int(b.targets[r, t]))] += 1
    return out


def _valid(batches) -> Counter:
    out = Counter()
    for b in batches:
        for r, n in enumerate(b.inputs["attention_mask"].sum(1).tolist()):
            out[(tuple(b.inputs["input_ids"][r, :n].tolist()), tuple(b.valid[r, :n].tolist()))] += 1
    return out


def _specs(tmp_path, task: str, **extra):
    corpus = tiny.write_corpus(tmp_path / "corpus.txt", n_docs=60)
    n = 150 if task == "causal" else 30
    kwargs = dict(model="m", data=corpus, eval_tokens=n, stats_tokens=n, max_length=20, batch_size=4, **extra)
    plain = SweepConfig(**kwargs).data_spec()
    packed = SweepConfig(**kwargs, sort_by_length=True).data_spec()
    assert (plain.sort_by_length, packed.sort_by_length) == (False, True)
    return plain, packed


@pytest.mark.parametrize("task", ["causal", "masked"])
def test_sorted_batches_score_the_same_targets_with_less_padding(tmp_path, task):
    plain, packed = _specs(tmp_path, task, stats_skip_first=1)
    inputs = ModelInputs(task, tiny.tokenizer(task), tiny.masked_lm().config if task == "masked" else None)
    a, b = eval_batches(plain, inputs, seed=3), eval_batches(packed, inputs, seed=3)
    assert _targets(a) == _targets(b) and sum(x.n_scored for x in a) == (150 if task == "causal" else 30)
    assert all(x.size <= 4 for x in b) and len(b) >= len(a)
    lengths = [n for x in b for n in x.inputs["attention_mask"].sum(1).tolist()]
    assert lengths == sorted(lengths, reverse=True)
    for x in b:  # no row pads more than a quarter of its batch's width; a batch is cut early only for that
        rows = x.inputs["attention_mask"].sum(1)
        assert (rows >= 0.75 * x.valid.shape[1]).all()
    assert scored_fraction(b) >= scored_fraction(a) > 0
    assert scored_fraction(a) == sum(x.n_scored for x in a) / sum(x.valid.numel() for x in a)
    sa, sb = stats_batches(plain, inputs), stats_batches(packed, inputs)
    assert _valid(sa) == _valid(sb)  # the same positions counted (the first of each left out)
    assert scored_fraction(sb, "valid") >= scored_fraction(sa, "valid")


def test_results_on_sorted_batches_equal_the_unsorted_ones(tmp_path):
    plain, packed = _specs(tmp_path, "causal")
    model = tiny.causal_lm("llama")
    inputs = ModelInputs("causal", tiny.tokenizer(), model.config)
    a, b = evaluate(model, eval_batches(plain, inputs, 0)), evaluate(model, eval_batches(packed, inputs, 0))
    assert (a.n, a.n_correct) == (b.n, b.n_correct)
    assert a.ce == pytest.approx(b.ce, rel=1e-6)
    sites = find_sites(model)
    sa = collect_stats(model, sites, stats_batches(plain, inputs), progress=False)
    sb = collect_stats(model, sites, stats_batches(packed, inputs), progress=False)
    for x, y in zip(sa.layers, sb.layers):
        assert x.count == y.count
        torch.testing.assert_close(x.mean, y.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.min, y.min, rtol=1e-5, atol=1e-6)


def test_sort_by_length_keeps_rows_of_equal_length_in_order():
    from knockout.data.text import causal_batches

    seqs = [[5, 6], [7, 8, 9], [10, 11], [12, 13, 14]]
    out = sort_by_length(causal_batches(seqs, 3, pad=0), 2, pad=0)
    assert [x.inputs["input_ids"].tolist() for x in out] == [[[7, 8, 9], [12, 13, 14]], [[5, 6], [10, 11]]]


def test_sort_by_length_closes_a_batch_before_a_much_shorter_row():
    """Four rows of 8 tokens and a cut last document of 2: one batch would compute 40 positions for 34 tokens;
    split, 34. A row of 6 (= 0.75 * 8) still joins the batch of 8s; rows keep their targets."""
    from knockout.data.text import causal_batches

    seqs = [list(range(1, 9)), list(range(11, 19)), [30, 31], list(range(21, 29)), list(range(41, 47))]
    out = sort_by_length(causal_batches(seqs, 5, pad=0), 5, pad=0)
    assert [tuple(x.inputs["input_ids"].shape) for x in out] == [(4, 8), (1, 2)]
    assert out[0].inputs["input_ids"][3, :6].tolist() == list(range(41, 47)) and out[1].inputs[
        "input_ids"
    ].tolist() == [[30, 31]]
    assert _targets(out) == _targets(causal_batches(seqs, 5, pad=0))
    assert scored_fraction(out) == sum(len(s) - 1 for s in seqs) / (4 * 8 + 2)
