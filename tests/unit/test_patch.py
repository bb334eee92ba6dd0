"""Counterfactual prompts and ``patch``: the ioi ABC counterfactuals, aligned counterfactual batches, and patching
checked against a hand-written forward pre-hook (no knockout hooks) that copies the counterfactual run's pre-out."""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest
import torch

import tiny
from knockout.ablation import METHODS, MethodContext, methods_for
from knockout.data import prompts as P
from knockout.data.tasks import DataSpec, ModelInputs, counterfactual_eval_batches, eval_batches
from knockout.errors import KnockoutError
from knockout.evaluation import Metrics, evaluate
from knockout.sites import find_sites

# Counterfactuals of the same length in characters (the tiny tokenizer has one token per character).
ITEMS = [
    P.Prompt("Then, Ann and Bob went home. Bob gave it to", correct=" Ann", incorrect=" Bob",
             counterfactual="Then, Cid and Dan went home. Eve gave it to"),
    P.Prompt("Kim saw Lee. Lee gave a pen to", correct=" Kim", incorrect=" Lee",
             counterfactual="Max saw Ned. Ora gave a pen to"),
    P.Prompt("Al met Jo; Jo paid", correct=" Al", incorrect=" Jo", counterfactual="Bo met Cy; Di paid"),
]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


out_projections, hand_patched_logits = tiny.out_projections, tiny.hand_patched_logits


def make_patch(model, sites, tok, cf_batches, cache=True):
    from knockout.ablation.options import ResampleOptions

    ctx = MethodContext(model, sites, processor=tok, counterfactual_batches=cf_batches,
                        resample=ResampleOptions(cache=cache))  # fmt: skip
    return METHODS["patch"](ctx)


def random_neurons(sites, share=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(s.width, generator=g)[: int(share * s.width)].sort().values for s in sites]


@torch.no_grad()
def patched_logits(method, batches, neurons) -> list[torch.Tensor]:
    out = []
    with method.ablate(neurons):
        for i, b in enumerate(batches):
            method.on_batch(i, b)
            out.append(method.ctx.model(**b.inputs).logits)
    return out


# -- counterfactual batches -------------------------------------------------------------------------------------------


def test_counterfactual_batches_align_with_the_task_batches(tok):
    batches = P.task_batches(tok, ITEMS, 2, 64, 0)
    cfs = P.counterfactual_batches(tok, ITEMS, 2, 64, 0)
    assert len(cfs) == len(batches) == 2
    for b, cf, items in zip(batches, cfs, (ITEMS[:2], ITEMS[2:])):
        assert cf.inputs["input_ids"].shape == b.inputs["input_ids"].shape
        assert torch.equal(cf.inputs["attention_mask"], b.inputs["attention_mask"]) and torch.equal(cf.valid, b.valid)
        assert bool((cf.targets == -100).all())
        for r, item in enumerate(items):  # the counterfactual is encoded as its prompt is (here: up to the answer)
            n = int(b.valid[r].sum())
            assert cf.inputs["input_ids"][r, :n].tolist() == tok(item.counterfactual + " ")["input_ids"]


def test_counterfactuals_of_another_length_or_missing_are_refused(tok):
    longer = P.Prompt("Kim saw Lee. Lee gave a pen to", correct=" Kim", incorrect=" Lee",
                      counterfactual="Maxi saw Ned. Ora gave a pen to")  # fmt: skip
    with pytest.raises(KnockoutError, match=r"prompt 1 .* has 32 input tokens but the prompt has 31"):
        P.counterfactual_batches(tok, [ITEMS[0], longer], 2, 64, 0)
    with pytest.raises(KnockoutError, match="prompt 0 .* has no counterfactual"):
        P.counterfactual_batches(tok, [P.Prompt("ab", correct="c", incorrect="d")], 2, 64, 0)
    with pytest.raises(KnockoutError, match="more than --max-length 20"):
        P.counterfactual_batches(tok, ITEMS, 2, 20, 0)


def test_task_files_may_give_a_counterfactual_per_line(tmp_path, tok):
    lines = [{"prompt": i.prompt, "correct": i.correct, "incorrect": i.incorrect, "counterfactual": i.counterfactual}
             for i in ITEMS] * 4  # fmt: skip
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    read = P.read_task_file(path)
    assert read[:3] == ITEMS and P.has_counterfactuals(str(path)) and P.has_counterfactuals("ioi")
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(json.dumps(x) for x in [lines[0], {"prompt": "a", "correct": "b", "incorrect": "c"}]))
    assert not P.has_counterfactuals(str(partial))
    spec = DataSpec(str(path), eval_tokens=8, stats_tokens=64, max_length=64, batch_size=2)
    inputs = ModelInputs("causal", tok, None)
    batches, cfs = eval_batches(spec, inputs, 0), counterfactual_eval_batches(spec, inputs)
    assert [c.valid.tolist() for c in cfs] == [b.valid.tolist() for b in batches]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "answer": "b", "counterfactual": 3}) + "\n")
    with pytest.raises(KnockoutError, match="'counterfactual' must be a non-empty string"):
        P.read_task_file(bad)
    with pytest.raises(KnockoutError, match="not task data"):
        counterfactual_eval_batches(DataSpec("wiki", 8, 64, 64, 2), inputs)


def _take(it, n):
    return list(itertools.islice(it, n))


def test_ioi_counterfactuals_are_abc_prompts_and_leave_the_prompts_unchanged():
    names = P.ioi_data()["names"]
    for split, part in (("eval", set(names[0::2])), ("collect", set(names[1::2]))):
        items = _take(P.prompts("ioi", split), 300)
        assert items == _take(P.prompts("ioi", split), 300)  # deterministic, counterfactuals included
        for p in items:
            io, s = p.correct.strip(), p.incorrect.strip()
            cf_words = p.counterfactual.replace(",", " ").replace(".", " ").split()
            words = p.prompt.replace(",", " ").replace(".", " ").split()
            new = [w for w in cf_words if w in part]
            assert len(new) == 3 and len(set(new)) == 3 and not {io, s} & set(new)  # A, B, C: three other names
            assert [w for w, v in zip(words, cf_words) if w != v] == [w for w in words if w in (io, s)]  # same frame
    # the prompts themselves are those generated before counterfactuals existed (the first 500 of each part)
    expected = {
        "eval": "0472732e07b5e0ec3c5c176082702b3f2a6ca60f2c49eb653980a90107da4552",
        "collect": "91bc83bb1cd8ece08f0887b6e946bf0164840e4f1616af7bedd36a75af79df89",
    }
    for split, digest in expected.items():
        h = hashlib.sha256()
        for p in _take(P.prompts("ioi", split), 500):
            h.update((p.prompt + "|" + p.correct + "|" + p.incorrect + "\n").encode())
        assert h.hexdigest() == digest


def test_abc_names_keep_lengths_where_the_part_allows():
    import random

    names = ["Ann", "Bob", "Cid", "Dan", "Eve", "Fay", "Kimberly", "Jo"]
    a, b, c = P.abc_names(names, ("Ann", "Bob", "Bob"), random.Random(0))
    assert len({a, b, c} | {"Ann", "Bob"}) == 5 and all(len(n) == 3 for n in (a, b, c))
    a, b, c = P.abc_names(names, ("Kimberly", "Jo", "Kimberly"), random.Random(0))
    assert len({a, b, c, "Kimberly", "Jo"}) == 5  # no other 8- or 2-letter name: any unused name
    with pytest.raises(KnockoutError, match="at least"):
        P.abc_names(names[:4], ("Ann", "Bob", "Bob"), random.Random(0))


# -- patch ------------------------------------------------------------------------------------------------------------


def test_patch_is_registered_for_causal_lms_and_asked_for_by_name():
    assert "patch" in METHODS and METHODS["patch"].needs_counterfactuals
    assert "patch" not in methods_for("causal") and METHODS["patch"].tasks == ("causal",)


def test_patch_without_counterfactuals_is_refused(tok):
    model = tiny.causal_lm("gpt2")
    with pytest.raises(KnockoutError, match="needs task prompts with counterfactuals"):
        METHODS["patch"](MethodContext(model, find_sites(model), processor=tok))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("cache", [True, False])
def test_patch_equals_a_hand_written_interchange_hook(tok, family, cache):
    model = tiny.causal_lm(family)
    sites = find_sites(model)
    batches = P.task_batches(tok, ITEMS, 2, 64, 0)
    cfs = P.counterfactual_batches(tok, ITEMS, 2, 64, 0)
    method = make_patch(model, sites, tok, cfs, cache)
    neurons = random_neurons(sites)
    for _ in range(2):  # the second pass reads the cache (or recomputes it)
        got = patched_logits(method, batches, neurons)
        for b, cf, g in zip(batches, cfs, got):
            want = hand_patched_logits(model, family, b.inputs, cf.inputs, neurons)
            torch.testing.assert_close(g, want, rtol=0, atol=0)
            with torch.no_grad():
                plain = model(**b.inputs).logits
            real = b.valid
            assert not torch.allclose(g[real], plain[real])  # the patch did something at the real positions
    assert len(method._cache) == (2 if cache else 0)


def test_patch_inside_evaluate_matches_the_hand_written_hook(tok):
    model = tiny.causal_lm("llama")  # takes logits_to_keep: the scored positions only
    sites = find_sites(model)
    batches = P.task_batches(tok, ITEMS, 2, 64, 0)
    cfs = P.counterfactual_batches(tok, ITEMS, 2, 64, 0)
    method = make_patch(model, sites, tok, cfs)
    neurons = random_neurons(sites, 0.75, seed=3)
    with method.ablate(neurons):
        got = evaluate(model, batches, on_batch=method.on_batch, per_doc=True)
    want = Metrics(per_doc=True)
    for b, cf in zip(batches, cfs):
        want.add(hand_patched_logits(model, "llama", b.inputs, cf.inputs, neurons), b.targets, b.contrast)
    for k, v in want.doc_sums().items():
        torch.testing.assert_close(torch.as_tensor(got.doc_sums()[k]), torch.as_tensor(v), rtol=1e-5, atol=1e-5)


def test_patching_nothing_or_everything_from_the_prompt_itself_changes_nothing(tok):
    model = tiny.causal_lm("gpt2")
    sites = find_sites(model)
    batches = P.task_batches(tok, ITEMS, 2, 64, 0)
    with torch.no_grad():
        plain = [model(**b.inputs).logits for b in batches]
    method = make_patch(model, sites, tok, P.counterfactual_batches(tok, ITEMS, 2, 64, 0))
    none = [torch.zeros(0, dtype=torch.long) for _ in sites]
    for g, p in zip(patched_logits(method, batches, none), plain):
        assert torch.equal(g, p)
    itself = [P.Prompt(i.prompt, correct=i.correct, incorrect=i.incorrect, counterfactual=i.prompt) for i in ITEMS]
    method = make_patch(model, sites, tok, P.counterfactual_batches(tok, itself, 2, 64, 0))
    every = [torch.arange(s.width) for s in sites]
    for g, p in zip(patched_logits(method, batches, every), plain):
        assert torch.equal(g, p)


def test_patch_refuses_misaligned_or_missing_counterfactual_batches(tok):
    model = tiny.causal_lm("gpt2")
    sites = find_sites(model)
    batches = P.task_batches(tok, ITEMS, 2, 64, 0)
    method = make_patch(model, sites, tok, P.counterfactual_batches(tok, ITEMS, 3, 64, 0))  # other batch size
    with pytest.raises(KnockoutError, match="does not align"), method.ablate(random_neurons(sites)):
        method.on_batch(0, batches[0])
    with pytest.raises(KnockoutError, match="has no counterfactual batch"):
        method.on_batch(1, batches[1])
    with pytest.raises(KnockoutError, match="call method.on_batch"), method.ablate(random_neurons(sites)):
        with torch.no_grad():
            model(**batches[0].inputs)
