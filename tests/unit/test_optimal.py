"""The ``optimal`` method: the collection split is divided into training rows and a held-out part, the constants kept
are never worse than zero, mean or peak on the held-out part (checked by an independent evaluation), stay within
their shift limit, leave the weights untouched, are saved and reused, and work for causal LMs, masked LMs and ViT."""

import pytest
import torch

import tiny
from knockout import MethodContext, NeuronSelection, find_sites, get_method
from knockout.ablation.optimal import OptimalAblation
from knockout.ablation.options import OptimalOptions
from knockout.data.batch import Batch
from knockout.data.text import causal_batches
from knockout.stats import collect_stats

OPTIONS = OptimalOptions(steps=20, lr=0.05, held_out_tokens=40)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    yield
    torch.set_num_threads(threads)


def _text_batches(kind):
    tok = tiny.tokenizer(kind)
    words = tiny.TEXT.split()
    texts = [" ".join(words[i : i + 6]) for i in range(0, len(words) - 6, 2)]
    seqs = [tok(t)["input_ids"][:40] for t in texts]
    return tok, causal_batches(seqs, 4, tok.pad_token_id)


def _setup(task, tmp_path):
    if task == "causal":
        model = tiny.causal_lm("llama")
        tok, batches = _text_batches("causal")
    elif task == "masked":
        model = tiny.masked_lm("roberta")
        tok, batches = _text_batches("masked")
    else:
        model, tok = tiny.vit_classifier(), None
        g = torch.Generator().manual_seed(0)
        batches = [
            Batch({"pixel_values": torch.randn(4, 3, 32, 32, generator=g)}, torch.ones(4, 17, dtype=torch.bool),
                  torch.randint(0, 5, (4,), generator=g))
            for _ in range(3)
        ]  # fmt: skip
    sites = find_sites(model)
    stats = collect_stats(model, sites, batches, progress=False)
    ctx = MethodContext(
        model, sites, stats, seed=0, task=task, processor=tok, train_batches=batches,
        optimal=OPTIONS.replace(held_out_tokens={"causal": 40, "masked": 10, "image": 2}[task]),  # a quarter at most
        artifacts=tmp_path / "artifacts",
    )  # fmt: skip
    return model, sites, ctx


def _held_out_ce(model, sites, neurons, values, batches) -> float:
    """Mean CE on ``batches`` with ``neurons`` replaced by ``values`` through a plain hook (not the method's code)."""
    from knockout.data.batch import IGNORE
    from knockout.hooks import replace_with_constants

    total, n = 0.0, 0
    with torch.no_grad(), replace_with_constants(sites, neurons, values):
        for b in batches:
            logits = model(**b.inputs).logits
            scored = b.targets != IGNORE
            total += float(
                torch.nn.functional.cross_entropy(logits[scored].double(), b.targets[scored], reduction="sum")
            )
            n += int(scored.sum())
    return total / n


@pytest.mark.parametrize("task", ["causal", "masked", "image"])
def test_kept_constants_are_no_worse_than_zero_mean_peak_on_the_held_out_part(task, tmp_path):
    model, sites, ctx = _setup(task, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    method = get_method("optimal")(ctx)
    neurons = NeuronSelection([s.width for s in sites], seed=0).at(0.5)
    train, held = method.split()
    values, meta = method.learn(neurons)
    ce = {
        m: _held_out_ce(model, sites, neurons, get_method(m)(ctx).constants(), held) for m in ("zero", "mean", "peak")
    }
    kept = _held_out_ce(model, sites, neurons, values, held)
    assert kept <= min(ce.values()) + 1e-5
    assert meta["chosen"] in ("learned", "zero", "mean", "peak")
    for m in ("zero", "mean", "peak"):  # scored in full, or stopped (inf) because it could not beat what was kept
        got = float(meta[f"held_out_ce_{m}"])
        assert got == pytest.approx(ce[m], rel=1e-5) if got != float("inf") else ce[m] > kept
    if meta["chosen"] == "learned":
        assert kept == pytest.approx(float(meta["held_out_ce_learned"]), rel=1e-5)
        for layer, stats in enumerate(ctx.stats.layers):  # every constant within max_shift stds of its mean
            shift = (values[layer] - stats.mean.float()).abs() / stats.std.float().clamp_min(1e-4)
            assert float(shift.max()) <= OPTIONS.max_shift + 1e-4
    with method.ablate(neurons), torch.no_grad():
        model(**train[0].inputs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored bit-exactly
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())


def test_training_and_held_out_rows_are_disjoint_and_sized_by_the_settings(tmp_path):
    from knockout import KnockoutError

    _, _, ctx = _setup("causal", tmp_path)
    rows = [b.inputs["input_ids"][i] for b in ctx.train_batches for i in range(b.size)]
    key = lambda ids: tuple(ids.tolist())  # noqa: E731
    ctx.optimal = OptimalOptions(steps=3, batch_size=2, held_out_tokens=30, train_length=None)
    train, held = get_method("optimal")(ctx).split()
    assert len(train) == 6 and all(b.size == 1 for b in [*train, *held])
    assert sum(b.n_scored for b in held) >= 30 > sum(b.n_scored for b in held[:-1])  # just enough
    held_rows = [key(rows[i]) for i in range(3, len(rows), 4)][: len(held)]  # every fourth row
    assert [key(b.inputs["input_ids"][0]) for b in held] == held_rows
    others = [key(r) for i, r in enumerate(rows) if i % 4 != 3 or key(r) not in held_rows]
    assert [key(b.inputs["input_ids"][0]) for b in train] == others[:6]  # the others, in order, each once
    ctx.optimal = OptimalOptions(steps=3, batch_size=2, held_out_tokens=8, train_length=5)
    cut, cut_held = get_method("optimal")(ctx).split()  # rows cut to 5 tokens (4 targets) before the split
    assert all(b.inputs["input_ids"].shape[1] <= 5 for b in [*cut, *cut_held])
    assert [key(b.inputs["input_ids"][0]) for b in cut_held] == [key(rows[i][:5]) for i in (3, 7)]
    assert [key(b.inputs["input_ids"][0]) for b in cut] == [key(rows[i][:5]) for i in (0, 1, 2, 4, 5, 6)]
    ctx.optimal = OptimalOptions(held_out_tokens=10**6)
    with pytest.raises(KnockoutError, match="too small for optimal's 1000000 held-out targets"):
        get_method("optimal")(ctx).split()


def test_scoring_a_candidate_stops_early_only_when_it_cannot_win(tmp_path):
    """``held_out_ce(..., stop_above=x)``: the full CE when it is at most x, ``inf`` (after fewer rows) when above."""
    model, sites, ctx = _setup("causal", tmp_path)
    method = get_method("optimal")(ctx)
    neurons = NeuronSelection([s.width for s in sites], seed=0).at(0.9)
    _, held = method.split()
    zero = get_method("zero")(ctx).constants()
    full = method.held_out_ce(neurons, zero, held)
    assert full == pytest.approx(_held_out_ce(model, sites, neurons, zero, held), rel=1e-5)
    assert method.held_out_ce(neurons, zero, held, stop_above=full + 1e-3) == full
    assert method.held_out_ce(neurons, zero, held, stop_above=full - 1e-3) == float("inf")


def test_saved_constants_are_reused_without_training(tmp_path, monkeypatch):
    model, sites, ctx = _setup("causal", tmp_path)
    neurons = NeuronSelection([s.width for s in sites], seed=0).at(0.5)
    first = get_method("optimal")(ctx).learned(neurons)
    assert len(list((tmp_path / "artifacts" / "optimal").glob("seed0-*.safetensors"))) == 1
    calls = []
    monkeypatch.setattr(OptimalAblation, "learn", lambda self, n: calls.append(1))
    again = get_method("optimal")(ctx).learned(neurons)  # a new instance, as a resumed run makes
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(first, again))
    other = NeuronSelection([s.width for s in sites], seed=0).at(0.25)
    with pytest.raises(TypeError):  # a different set is not found, so it would train (stubbed to return None)
        get_method("optimal")(ctx).learned(other)
    assert calls == [1]


def test_optimal_is_registered_but_not_in_all():
    from knockout.ablation import methods_for

    cls = get_method("optimal")
    assert cls.needs_stats and cls.needs_train_batches and "optimal" not in methods_for("causal")


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": -1},
        {"steps": 1.5},
        {"lr": 0},
        {"lr": float("nan")},
        {"batch_size": 0},
        {"tokens": "many"},
        {"held_out_tokens": 0},
        {"eval_every": -1},
        {"max_shift": 0},
    ],
)
def test_bad_options_are_refused_when_the_settings_are_made(bad):
    from knockout import KnockoutError

    name = next(iter(bad))
    with pytest.raises(KnockoutError, match=f"optimal.{name} \\(--optimal-{name.replace('_', '-')}\\)"):
        OptimalOptions(**bad)
