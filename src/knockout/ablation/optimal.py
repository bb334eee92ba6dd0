"""``optimal``: per ablated neuron, the constant that hurts the model least, learned by gradient descent.

For one neuron set (a seed and a fraction), the constants ``c_i`` of the ablated neurons are the only trainable
parameters; the model is frozen (its weights are never written: the constants enter through a forward pre-hook on
the out-projection, ``z[..., idx] := c``, which is the folded form ``W_O[:, idx] @ c`` of :func:`fold_constants`
written as a hook so that autograd sees it). They minimise the task's cross-entropy (next-token, masked-token or
class) on the **collection** split (:attr:`MethodContext.train_batches`; never the evaluation batches), starting at
the mean, with Adam on ``u`` where ``c = mean + std * u`` (so the learning rate is in units of each neuron's spread).

The collection split's rows, cut to their first ``train_length`` tokens (so that a step, and the held-out part, see
more documents for their cost), are divided in two: a **held-out part** (every fourth row, until it holds
``held_out_tokens`` scored targets; never trained on) and **training rows** (the others in order, each seen once with
the defaults: ``steps`` x ``batch_size`` rows). Three measures keep the learned constants from overfitting the few
training documents:

- the held-out part scores the constants at the end (and, with ``eval_every``, every so many steps: training stops
  once they got worse, and the best scored point is kept: early stopping);
- every constant stays within ``max_shift`` of its neuron's stds of its mean (regularisation toward the mean);
- the candidates zero, mean, peak and the learned constants are scored on the held-out part and the one with the
  lowest CE is kept. **Guarantee**: on the held-out part of the collection split, tokens the constants were not
  trained on, ``optimal`` is never worse than zero, mean or peak for the same neuron set. The candidates are scored
  row by row and stop as soon as their CE sum exceeds the best total so far (a sum of non-negative terms), which
  gives the same choice at a fraction of the cost.

The training CE (mean over the steps' batches, each before its update) and the held-out CE of every candidate are
saved with the constants and shown in the report; the answer flags a set where ``optimal``'s evaluation CE is above
a contender's (then the bound is not one there).

Masked LMs: the collection batches are unmasked text, so they are BERT-masked here with the evaluation protocol of
:mod:`knockout.data.masked`, drawn from the generator of the run's seed (deterministic, so a resumed run trains on the
same inputs).

Settings: :class:`~knockout.ablation.options.OptimalOptions` (CLI ``--optimal-*``).

The learned constants are saved in ``artifacts/optimal/seed{s}-{hash}.safetensors`` (the hash covers the neuron set
and the settings) with a checksum of their tensors, and reused when present and intact, so a resumed run does not
train again. A damaged (edited, truncated) file is an error that names it: delete it and it is learned again.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from knockout.ablation.methods import AblationMethod, get_method, register
from knockout.data.batch import IGNORE, Batch
from knockout.errors import KnockoutError
from knockout.files import load_artifact, neuron_set_hash, save_checked, text_sha256
from knockout.hooks import edit_preout, fold_constants

log = logging.getLogger(__name__)

#: The constant methods whose constants are scored beside the learned ones (the best on the held-out part of the
#: collection split is kept).
CANDIDATES = ("zero", "mean", "peak")


@register("optimal")
class OptimalAblation(AblationMethod):
    """z_i := c_i learned to minimise the task's loss on the collection split (see the module docstring)."""

    needs_stats = True
    needs_train_batches = True
    in_all = False
    is_bound = True

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.train_batches:  # refuse a collection split too small for the settings before anything is written
            self.split()

    @contextmanager
    def ablate(self, neurons: Sequence[torch.Tensor]) -> Iterator[None]:
        values = self.learned(neurons)
        with fold_constants(self.ctx.sites, neurons, values):
            yield

    # -- learning ---------------------------------------------------------------------------------------------
    def artifact_path(self, neurons: Sequence[torch.Tensor]):
        if self.ctx.artifacts is None:
            return None
        opts = json.dumps(self.ctx.optimal.to_dict(), sort_keys=True)
        key = text_sha256(neuron_set_hash(neurons) + opts)[:16]
        return self.ctx.artifacts / "optimal" / f"seed{self.ctx.seed}-{key}.safetensors"

    def learned(self, neurons: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, ``[width]`` constants for ``neurons`` (entries outside the set are the means): loaded from the
        artifacts folder when this set was learned before, else learned and saved there."""
        path = self.artifact_path(neurons)
        if path is not None and path.is_file():
            log.info("optimal: reusing learned constants from %s", path)
            return self.load_learned(path)
        values, meta = self.learn(neurons)
        if path is not None and self.ctx.world.is_main:  # under torchrun every rank learns the same; rank 0 writes
            tensors = {f"layer{s.layer}": v.contiguous() for s, v in zip(self.ctx.sites, values)}
            save_checked(path, tensors, {k: str(v) for k, v in meta.items()})
        return values

    def load_learned(self, path) -> list[torch.Tensor]:
        """The constants stored in ``path``, checked (:func:`knockout.files.load_artifact`: readable, matching
        their checksum) to hold one ``[width]`` tensor per site."""
        tensors = load_artifact(path)
        values = [tensors.get(f"layer{s.layer}") for s in self.ctx.sites]
        if any(v is None or tuple(v.shape) != (s.width,) for v, s in zip(values, self.ctx.sites)):
            raise KnockoutError(
                f"{str(path)!r} does not hold constants for this model's sites; delete it (they are learned again "
                "on the next run) and re-run"
            )
        return values

    def split(self) -> tuple[list[Batch], list[Batch]]:
        """``(training rows, held-out rows)`` of the collection split (BERT-masked for masked LMs), one row per batch,
        each cut to its first ``train_length`` tokens (text). Every fourth row is held out until the held-out part has
        ``held_out_tokens`` scored targets (spread over the split, so it is like it); the training rows are the others
        in order (``tokens`` scored targets, default ``steps * batch_size`` rows). The two never overlap. Made once per
        instance (it does not depend on the neuron set; masking is seeded by the seed)."""
        if not hasattr(self, "_split"):
            self._split = self._make_split()
        return self._split

    def _make_split(self) -> tuple[list[Batch], list[Batch]]:
        batches = list(self.ctx.train_batches)
        if not batches:
            raise KnockoutError("method 'optimal' needs the collection batches (MethodContext.train_batches)")
        if self.ctx.task == "masked":
            batches = _masked(
                batches, self.ctx.processor, self.ctx.seed, getattr(self.ctx.model.config, "vocab_size", None)
            )
        opts = self.ctx.optimal
        rows = [r for b in batches for r in (_rows(b, i, i + 1) for i in range(b.size))]
        if opts.train_length and self.ctx.task != "image":
            rows = [_cut(r, opts.train_length) for r in rows]
        rows = [r for r in rows if r.n_scored > 0]
        held, n_held, rest = [], 0, []
        for i, r in enumerate(rows):
            if i % 4 == 3 and n_held < opts.held_out_tokens:
                held.append(r)
                n_held += r.n_scored
            else:
                rest.append(r)
        want = opts.tokens
        train, n_train = [], 0
        for r in rest:
            if (want is not None and n_train >= want) or (want is None and len(train) >= opts.steps * opts.batch_size):
                break
            train.append(r)
            n_train += r.n_scored
        if not train or n_held < opts.held_out_tokens:
            raise KnockoutError(
                f"the collection split ({sum(r.n_scored for r in rows)} scored targets) is too small for optimal's "
                f"{opts.held_out_tokens} held-out targets (every fourth row) and its training rows: raise "
                "--stats-tokens or lower --optimal-held-out-tokens"
            )
        return train, held

    def learn(self, neurons: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """Learn the constants of ``neurons`` (see the module docstring); returns per layer ``[width]`` values and a
        record of the training and the choice."""
        ctx, model, opts = self.ctx, self.ctx.model, self.ctx.optimal
        device = next(model.parameters()).device
        train, held = self.split()
        train, held = [b.to(device) for b in train], [b.to(device) for b in held]
        means = [m.float() for m in ctx.stats.means()]
        idx = {s.layer: neurons[s.layer].to(device).long() for s in ctx.sites if neurons[s.layer].numel()}
        # c = mean + std * u with u trainable (init 0): the learning rate is in units of each neuron's spread, so one
        # setting suits models whose pre-out scales differ.
        stds = [s.std.float().clamp_min(1e-4) for s in ctx.stats.layers]
        base = {k: means[k].to(device)[i] for k, i in idx.items()}
        scale = {k: stds[k].to(device)[i] for k, i in idx.items()}
        params = {k: torch.nn.Parameter(torch.zeros_like(base[k])) for k in idx}
        values = {k: (lambda k=k: base[k] + scale[k] * params[k]) for k in idx}

        def current() -> list[torch.Tensor]:
            out = [m.clone() for m in means]
            for k, value in values.items():
                out[k][idx[k].cpu()] = value().detach().float().cpu()
            return out

        candidates = self.candidates()
        best_ce, best, best_step, train_ces = math.inf, None, 0, []
        groups = [[train[(i * opts.batch_size + j) % len(train)] for j in range(opts.batch_size)]
                  for i in range(opts.steps)]  # fmt: skip
        if params and opts.steps > 0:
            opt = torch.optim.Adam(list(params.values()), lr=opts.lr)
            flags = [p.requires_grad for p in model.parameters()]
            try:
                for p in model.parameters():
                    p.requires_grad_(False)
                with _replace(ctx.sites, idx, values):
                    bar = tqdm(
                        groups,
                        desc=f"optimal seed {ctx.seed}",
                        unit="step",
                        leave=False,
                        disable=not (ctx.progress and ctx.world.is_main),
                    )
                    for step, group in enumerate(bar, 1):
                        n = sum(b.n_scored for b in group)
                        opt.zero_grad(set_to_none=True)
                        total = 0.0
                        with torch.enable_grad():
                            for b in group:
                                loss = _loss(model, b, reduction="sum") / n
                                loss.backward()
                                total += float(loss.detach())
                        opt.step()
                        if opts.max_shift is not None:
                            with torch.no_grad():
                                for p in params.values():
                                    p.clamp_(-opts.max_shift, opts.max_shift)
                        train_ces.append(total)
                        bar.set_postfix_str(f"CE {total:.4f}")
                        if step == opts.steps or (opts.eval_every and step % opts.eval_every == 0):
                            now = current()
                            ce = self.held_out_ce(neurons, now, held)
                            if ce >= best_ce:  # worse than at the last check: stop, keeping the best
                                break
                            best_ce, best, best_step = ce, now, step
            finally:
                for p, f in zip(model.parameters(), flags):
                    p.requires_grad_(f)
        if best is None:  # nothing to train
            best = current()
            best_ce = self.held_out_ce(neurons, best, held)
        scores = {"learned": best_ce}
        bound = best_ce
        for name in ("mean", "peak", "zero"):  # row by row, stopped once they cannot win: the same choice, cheaper
            scores[name] = self.held_out_ce(neurons, candidates[name], held, bound)
            bound = min(bound, scores[name])
        chosen = min(scores, key=lambda k: (scores[k], k != "learned"))  # ties keep the learned constants
        values_out = best if chosen == "learned" else [v.clone() for v in candidates[chosen]]
        log.info("optimal seed %d: held-out CE %s; kept %s", ctx.seed, _scores_text(scores), chosen)
        meta = {
            "chosen": chosen,
            "seed": ctx.seed,
            "n_ablated": sum(int(n.numel()) for n in neurons),
            "train_ce": sum(train_ces) / len(train_ces) if train_ces else float("nan"),
            "best_step": best_step,
            "train_tokens": sum(b.n_scored for b in train),
            "held_out_tokens": sum(b.n_scored for b in held),
            **{f"held_out_ce_{k}": v for k, v in scores.items()},
        }
        return values_out, meta

    def candidates(self) -> dict[str, list[torch.Tensor]]:
        """The constants of :data:`CANDIDATES` (computed once per instance: they do not depend on the neuron set)."""
        if not hasattr(self, "_candidates"):
            self._candidates = {name: get_method(name)(self.ctx).constants() for name in CANDIDATES}
        return self._candidates

    @torch.no_grad()
    def held_out_ce(
        self, neurons, values: Sequence[torch.Tensor], batches: Sequence[Batch], stop_above: float = math.inf
    ) -> float:
        """Mean CE over the scored targets of ``batches`` with ``neurons`` ablated to ``values`` (folded). Scored
        batch by batch: once the sum exceeds ``stop_above`` times all targets (it cannot come below that mean any
        more, CE being non-negative) the rest is skipped and ``inf`` returned."""
        total, n = 0.0, sum(b.n_scored for b in batches)
        with fold_constants(self.ctx.sites, neurons, values):
            for batch in batches:
                total += float(_loss(self.ctx.model, batch, reduction="sum"))
                if total > stop_above * n:
                    return math.inf
        return total / n


def _scores_text(scores: dict[str, float]) -> str:
    """``learned 4.3427, mean 4.5012, peak worse (stopped), ...``: the candidates' held-out CE, ``inf`` (scoring
    stopped once a candidate could not win) in words."""
    return ", ".join(f"{k} worse (stopped)" if math.isinf(v) else f"{k} {v:.4f}" for k, v in scores.items())


def _loss(model: torch.nn.Module, batch: Batch, reduction: str) -> torch.Tensor:
    """Cross-entropy of ``model`` on ``batch``'s scored targets (tokens or image classes)."""
    logits = model(**batch.inputs).logits
    scored = batch.targets != IGNORE
    return F.cross_entropy(logits[scored].float(), batch.targets[scored], reduction=reduction)


@contextmanager
def _replace(sites, idx: dict[int, torch.Tensor], values: dict) -> Iterator[None]:
    """Differentiable ``z[..., idx[l]] := values[l]()`` on each layer's pre-out (the hook form of the folded edit)."""

    def fn(site, z):
        if site.layer not in idx:
            return None
        z = z.clone()
        z[..., idx[site.layer]] = values[site.layer]().to(z.dtype)
        return z

    with edit_preout(sites, fn):
        yield


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    return Batch(
        {k: v[start:stop] for k, v in batch.inputs.items()}, batch.valid[start:stop], batch.targets[start:stop]
    )


def _cut(batch: Batch, length: int) -> Batch:
    """``batch`` cut to its first ``length`` positions."""
    return Batch(
        {k: v[:, :length] for k, v in batch.inputs.items()}, batch.valid[:, :length], batch.targets[:, :length]
    )


def _masked(batches: Sequence[Batch], tokenizer, seed: int, vocab_size: int | None) -> list[Batch]:
    """The texts of ``batches`` (their attended positions), BERT-masked as the evaluation is (seeded by ``seed``)."""
    from knockout.data.masked import masked_batches
    from knockout.data.text import pad_id

    if tokenizer is None:
        raise KnockoutError("method 'optimal' on a masked LM needs the tokenizer (MethodContext.processor)")
    seqs = []
    for b in batches:
        mask = b.inputs.get("attention_mask", b.valid.long()).bool()
        for row in range(b.size):
            seqs.append(b.inputs["input_ids"][row][mask[row]].tolist())
    return masked_batches(tokenizer, seqs, batches[0].size, seed, pad_id(tokenizer), vocab_size)
