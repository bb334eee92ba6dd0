"""The ``optimal`` method: learned constants beat zero, mean and peak on the training data, leave the weights
untouched, are saved and reused, and work for causal LMs, masked LMs and ViT."""

import pytest
import torch

import tiny
from knockout import MethodContext, NeuronSelection, find_sites, get_method
from knockout.ablation.optimal import OptimalAblation
from knockout.ablation.options import OptimalOptions
from knockout.data.batch import Batch
from knockout.data.text import causal_batches
from knockout.stats import collect_stats

OPTIONS = OptimalOptions(steps=20, lr=0.05)


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
        model, sites, stats, seed=0, task=task, processor=tok, optimal=OPTIONS, train_batches=batches,
        artifacts=tmp_path / "artifacts",
    )  # fmt: skip
    return model, sites, ctx


@pytest.mark.parametrize("task", ["causal", "masked", "image"])
def test_learned_constants_are_no_worse_than_zero_mean_peak_on_the_training_data(task, tmp_path):
    model, sites, ctx = _setup(task, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    method = get_method("optimal")(ctx)
    neurons = NeuronSelection([s.width for s in sites], seed=0).at(0.5)
    train = method.train_batches()
    values = method.learned(neurons)
    losses = {m: method.training_loss(neurons, get_method(m)(ctx).constants(), train) for m in ("zero", "mean", "peak")}
    learned = method.training_loss(neurons, values, train)
    assert learned <= min(losses.values()) + 1e-6
    assert learned < losses["mean"]  # 20 Adam steps do improve on the mean on a random tiny model
    with method.ablate(neurons), torch.no_grad():
        model(**train[0].inputs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored bit-exactly
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())


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
    "bad", [{"steps": -1}, {"steps": 1.5}, {"lr": 0}, {"lr": float("nan")}, {"batch_size": 0}, {"tokens": "many"}]
)
def test_bad_options_are_refused_when_the_settings_are_made(bad):
    from knockout import KnockoutError

    name = next(iter(bad))
    with pytest.raises(KnockoutError, match=f"optimal.{name} \\(--optimal-{name.replace('_', '-')}\\)"):
        OptimalOptions(**bad)
