"""Task prompts: the metrics on hand-built logits, how prompts become scored tokens, task files, the ioi task."""

import json
import math

import numpy as np
import pytest
import torch

import tiny
from knockout import KnockoutError
from knockout.data import prompts as P
from knockout.data.batch import IGNORE
from knockout.evaluation import Metrics, evaluate

# -- metrics on hand-built logits --------------------------------------------------------------------------------------


def _ce(row: list[float], target: int) -> float:
    """-log softmax(row)[target], by hand."""
    top = max(row)
    return -(row[target] - top - math.log(sum(math.exp(v - top) for v in row)))


def test_logit_difference_accuracy_and_ce_on_hand_built_logits():
    # two prompts (rows), 3 positions, 4 tokens; one scored position per row (the last real one)
    logits = torch.tensor(
        [
            [[0.0, 0, 0, 0], [1.0, 2.0, 0.5, -1.0], [9.0, 9, 9, 9]],  # row 0: scored at position 1
            [[0.0, 0, 0, 0], [0.0, 0, 0, 0], [3.0, 1.0, 3.0, 0.0]],  # row 1: scored at 2, a tie
        ]
    )
    targets = torch.full((2, 3), IGNORE)
    contrast = torch.full((2, 3), IGNORE)
    targets[0, 1], contrast[0, 1] = 1, 0  # correct token 1 (logit 2.0), incorrect 0 (1.0): diff +1, right
    targets[1, 2], contrast[1, 2] = 0, 2  # 3.0 vs 3.0: diff 0, not a win (strictly greater is needed)
    m = Metrics(per_doc=True)
    m.add(logits, targets, contrast)
    assert m.n == 2 and m.n_contrast == 2 and m.n_correct == 1
    assert m.logit_diff == pytest.approx((1.0 + 0.0) / 2)
    assert m.top1 == 0.5
    expected_ce = _ce([1.0, 2.0, 0.5, -1.0], 1) + _ce([3.0, 1.0, 3.0, 0.0], 0)
    assert m.ce == pytest.approx(expected_ce / 2, rel=1e-6)
    docs = m.doc_sums()
    assert docs["n"].tolist() == [1, 1] and docs["correct"].tolist() == [1, 0]
    np.testing.assert_allclose(docs["ld_sum"], [1.0, 0.0])
    np.testing.assert_allclose(docs["ce_sum"], [_ce([1.0, 2.0, 0.5, -1.0], 1), _ce([3.0, 1.0, 3.0, 0.0], 0)])


def test_answer_tokens_are_scored_by_argmax_and_ce():
    logits = torch.tensor([[[0.1, 0.9, 0.0], [2.0, 2.0, 1.0], [0.0, 0.0, 5.0]]])
    targets = torch.tensor([[IGNORE, 1, 2]])  # two answer tokens: position 1 (tie: argmax is 0) and 2 (right)
    m = Metrics(per_doc=True)
    m.add(logits, targets)
    assert m.n == 2 and m.n_correct == 1 and m.logit_diff is None
    assert m.ce == pytest.approx((_ce([2.0, 2.0, 1.0], 1) + _ce([0.0, 0.0, 5.0], 2)) / 2, rel=1e-6)
    assert "ld_sum" not in m.doc_sums()


def test_batches_with_and_without_contrast_do_not_mix():
    m = Metrics(per_doc=True)
    m.add(torch.zeros(1, 2, 3), torch.tensor([[IGNORE, 1]]))
    m.add(torch.zeros(1, 2, 3), torch.tensor([[IGNORE, 1]]), torch.tensor([[IGNORE, 2]]))
    with pytest.raises(ValueError, match="contrast"):
        m.doc_sums()


# -- prompts to tokens ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()  # one token per character, no special tokens added


def _ids(tok, text):
    return tok(text)["input_ids"]


def test_answer_prompt_scores_every_answer_token_given_the_previous_ones(tok):
    ids, targets, contrast = P.encode(tok, P.Prompt("ab c", answer="de"))
    full = _ids(tok, "ab cde")
    assert ids == full[:-1] and contrast is None
    assert targets == [IGNORE, IGNORE, IGNORE, full[4], full[5]]  # 'c' predicts 'd', 'd' predicts 'e'


def test_contrast_prompt_scores_the_first_differing_token(tok):
    ids, targets, contrast = P.encode(tok, P.Prompt("gave it to", correct=" Mary", incorrect=" John"))
    # characters: the shared space joins the input, and 'M' is compared with 'J' after it
    assert ids == _ids(tok, "gave it to ")
    assert targets[:-1] == [IGNORE] * (len(ids) - 1) and contrast[:-1] == targets[:-1]
    assert targets[-1] == _ids(tok, "M")[0] and contrast[-1] == _ids(tok, "J")[0]


@pytest.mark.parametrize(
    "item, message",
    [
        (P.Prompt("abc", correct=" Jo", incorrect=" John"), "no differing token"),
        (P.Prompt("x", correct="a", incorrect="b"), None),  # differs right after the prompt: fine
    ],
)
def test_contrast_edge_cases(tok, item, message):
    if message is None:
        ids, targets, contrast = P.encode(tok, item)
        assert len(ids) == 1 and targets == [_ids(tok, "a")[0]] and contrast == [_ids(tok, "b")[0]]
    else:
        with pytest.raises(KnockoutError, match=message):
            P.encode(tok, item)


def test_task_batches_pad_and_name_the_scored_positions(tok):
    items = [P.Prompt("ab", correct="c", incorrect="d"), P.Prompt("abcde", correct="f", incorrect="g")]
    (batch,) = P.task_batches(tok, items, 4, 40, 0)
    assert batch.inputs["input_ids"].shape == (2, 5)
    assert batch.inputs["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.keep.tolist() == [1, 4]  # the last real position of each row
    assert batch.targets[0, 1] == _ids(tok, "c")[0] and batch.contrast[1, 4] == _ids(tok, "g")[0]
    assert int((batch.targets != IGNORE).sum()) == 2
    with pytest.raises(KnockoutError, match="more than --max-length 3"):
        P.task_batches(tok, items, 4, 3, 0)


def test_evaluate_keeps_logits_at_scored_positions_only_and_matches_a_full_forward(tok):
    model = tiny.causal_lm("llama")
    items = [P.Prompt(p, correct=" Mary", incorrect=" John") for p in ("Then John gave it to", "Mary said to", "x")]
    batches = P.task_batches(tok, items, 2, 40, 0)
    m = evaluate(model, batches, per_doc=True)
    diffs, wins = [], 0
    with torch.inference_mode():  # by hand: the full logits, read at each row's last real position
        for b in batches:
            logits = model(**b.inputs).logits
            for r in range(b.size):
                t = int(b.inputs["attention_mask"][r].sum()) - 1
                d = float(logits[r, t, b.targets[r, t]] - logits[r, t, b.contrast[r, t]])
                diffs.append(d)
                wins += d > 0
    assert m.n == 3 and m.n_contrast == 3
    assert m.logit_diff == pytest.approx(sum(diffs) / 3, abs=1e-5)
    assert m.n_correct == wins
    np.testing.assert_allclose(m.doc_sums()["ld_sum"], diffs, atol=1e-5)


# -- task files -------------------------------------------------------------------------------------------------------


def _write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return str(path)


def test_task_files_are_recognised_and_read(tmp_path):
    answers = _write(tmp_path / "a.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}])
    text = _write(tmp_path / "t.jsonl", [{"text": "just text"}, {"text": "more"}])
    assert P.is_task_source(answers) and not P.is_task_source(text) and P.is_task_source("ioi")
    assert not P.is_task_source("wiki") and not P.is_task_source(str(tmp_path / "missing.jsonl"))
    items = P.read_task_file(answers)
    assert items == [P.Prompt("1+1=", answer="2"), P.Prompt("2+2=", answer="4")]
    assert [p.text for p in items] == ["1+1=2", "2+2=4"]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"prompt": "a", "answer": "b"}, {"prompt": "c", "correct": "d", "incorrect": "e"}], r":2 is a contrast"),
        ([{"prompt": "a", "answer": "b"}, {"prompt": "c"}], r":2: expected .* got the fields prompt"),
        ([{"prompt": "a", "answer": ""}, {"prompt": "c", "answer": "d"}], r":1: 'answer' must be a non-empty"),
        ([{"prompt": "a", "correct": "x", "incorrect": "x"}, {"prompt": "b", "answer": "c"}], r"are the same"),
        ([{"prompt": "a", "answer": "b"}, "{oops"], r":2 is not valid JSON"),
        ([{"prompt": "a", "answer": "b"}], r"holds 1 prompt\(s\); it needs at least two"),
        ([{"prompt": "a", "answer": "b"}, ["list"]], r":2: expected an object"),
    ],
)
def test_bad_task_files(tmp_path, lines, message):
    with pytest.raises(KnockoutError, match=message):
        P.read_task_file(_write(tmp_path / "bad.jsonl", lines))


# -- the built-in ioi task ---------------------------------------------------------------------------------------------


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_ioi_is_deterministic_and_its_parts_are_disjoint():
    a, b = _take(P.prompts("ioi", "eval"), 200), _take(P.prompts("ioi", "eval"), 200)
    assert a == b
    collect = _take(P.prompts("ioi", "collect"), 200)
    names = P.ioi_data()["names"]
    eval_names, collect_names = set(names[0::2]), set(names[1::2])
    for items, allowed in ((a, eval_names), (collect, collect_names)):
        for p in items:
            io, s = p.correct.strip(), p.incorrect.strip()
            assert io != s and {io, s} <= allowed
            words = p.prompt.replace(",", " ").replace(".", " ").split()
            assert words.count(s) == 2 and words.count(io) == 1  # the subject is repeated, the answer is not
            assert p.correct.startswith(" ") and not p.prompt.endswith(" ")
    assert not {p.prompt for p in a} & {p.prompt for p in collect}
    orders = {p.prompt.index(p.correct.strip()) < p.prompt.index(p.incorrect.strip()) for p in a}
    assert orders == {True, False}  # both orders of first mention (ABBA and BABA)
    assert P.identity("ioi") == P.identity("ioi") and len(P.identity("ioi")["sha256"]) == 64


def test_eval_prompts_takes_at_most_n(tmp_path):
    assert len(P.eval_prompts("ioi", 7)) == 7
    path = _write(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "answer": "a"} for i in range(10)])
    assert len(P.eval_prompts(path, 100)) == 2  # the evaluation part: a fifth of 10 prompts
