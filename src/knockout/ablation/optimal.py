"""``optimal``: per ablated neuron, the constant that hurts the model least, learned by gradient descent.

For one neuron set (a seed and a fraction), the constants ``c_i`` of the ablated neurons are the only trainable
parameters; the model is frozen (its weights are never written: the constants enter through a forward pre-hook on
the out-projection, ``z[..., idx] := c``, which is the folded form ``W_O[:, idx] @ c`` of :func:`fold_constants`
written as a hook so that autograd sees it). They minimise the task's cross-entropy (next-token, masked-token or
class) on the **collection** split (:attr:`MethodContext.train_batches`; never the evaluation batches), starting at
the mean, with Adam on ``u`` where ``c = mean + std * u`` (so the learning rate is in units of each neuron's spread).

Guarantee: after training, the candidates zero, mean, peak and the learned constants are scored on the same training
tokens and the one with the lowest mean CE is kept, so on the training data ``optimal`` is never worse than zero,
mean or peak for the same neuron set (gradient descent alone does not promise that for a short run).

Masked LMs: the collection batches are unmasked text, so they are BERT-masked here with the evaluation protocol of
:mod:`knockout.data.masked`, drawn from the generator of the run's seed (deterministic, so a resumed run trains on the
same inputs).

Settings (:class:`~knockout.ablation.options.OptimalOptions`, CLI ``--optimal-*``): ``steps`` (default 100 Adam
steps), ``lr`` (0.02, in units of the neuron's std), ``batch_size`` (rows per step, default: the collection batches as
they are), ``tokens`` (scored training targets used, default all of the collection split).

The learned constants are saved in ``artifacts/optimal/seed{s}-{hash}.safetensors`` (the hash covers the neuron set
and the settings) with a checksum of their tensors, and reused when present and intact, so a resumed run does not
train again. A damaged (edited, truncated) file is an error that names it: delete it and it is learned again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from knockout.ablation.methods import AblationMethod, get_method, register
from knockout.data.batch import IGNORE, Batch
from knockout.errors import KnockoutError
from knockout.hooks import edit_preout, fold_constants

log = logging.getLogger(__name__)

#: The constant methods whose constants are scored beside the learned ones (the best on the training data is kept).
CANDIDATES = ("zero", "mean", "peak")


def neuron_set_hash(neurons: Sequence[torch.Tensor]) -> str:
    """A short hash of the neuron set (per layer, the sorted indices)."""
    h = hashlib.sha256()
    for layer, idx in enumerate(neurons):
        h.update(f"|{layer}:".encode())
        h.update(torch.sort(idx.detach().cpu().long()).values.numpy().tobytes())
    return h.hexdigest()[:16]


@register("optimal")
class OptimalAblation(AblationMethod):
    """z_i := c_i learned to minimise the task's loss on the collection split (see the module docstring)."""

    needs_stats = True
    needs_train_batches = True
    in_all = False
    is_bound = True

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
        key = hashlib.sha256((neuron_set_hash(neurons) + opts).encode()).hexdigest()[:16]
        return self.ctx.artifacts / "optimal" / f"seed{self.ctx.seed}-{key}.safetensors"

    def learned(self, neurons: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, ``[width]`` constants for ``neurons`` (entries outside the set are the means): loaded from the
        artifacts folder when this set was learned before, else learned and saved there."""
        from safetensors.torch import save

        from knockout.runfolder import CHECKSUM_KEY, tensors_sha256, write_atomic

        path = self.artifact_path(neurons)
        if path is not None and path.is_file():
            log.info("optimal: reusing learned constants from %s", path)
            return self.load_learned(path)
        values, meta = self.learn(neurons)
        if path is not None and self.ctx.world.is_main:  # under torchrun every rank learns the same; rank 0 writes
            tensors = {f"layer{s.layer}": v.contiguous() for s, v in zip(self.ctx.sites, values)}
            meta = {k: str(v) for k, v in meta.items()}
            meta[CHECKSUM_KEY] = tensors_sha256(tensors)
            write_atomic(path, save(tensors, metadata=meta))
        return values

    def load_learned(self, path) -> list[torch.Tensor]:
        """The constants stored in ``path``, checked (:func:`knockout.runfolder.load_artifact`: readable, matching
        their checksum) to hold one ``[width]`` tensor per site."""
        from knockout.runfolder import load_artifact

        tensors = load_artifact(path)
        values = [tensors.get(f"layer{s.layer}") for s in self.ctx.sites]
        if any(v is None or tuple(v.shape) != (s.width,) for v, s in zip(values, self.ctx.sites)):
            raise KnockoutError(
                f"{str(path)!r} does not hold constants for this model's sites; delete it (they are learned again "
                "on the next run) and re-run"
            )
        return values

    def train_batches(self) -> list[Batch]:
        """The training batches: the collection split (BERT-masked for masked LMs), cut to ``optimal_tokens``
        scored targets and split into ``optimal_batch_size`` rows."""
        batches = list(self.ctx.train_batches)
        if not batches:
            raise KnockoutError("method 'optimal' needs the collection batches (MethodContext.train_batches)")
        if self.ctx.task == "masked":
            batches = _masked(
                batches, self.ctx.processor, self.ctx.seed, getattr(self.ctx.model.config, "vocab_size", None)
            )
        size = self.ctx.optimal.batch_size
        if size:
            batches = [_rows(b, i, i + size) for b in batches for i in range(0, b.size, size)]
        limit = self.ctx.optimal.tokens
        if limit:
            kept, total = [], 0
            for b in batches:
                if total >= limit:
                    break
                kept.append(b)
                total += b.n_scored
            batches = kept
        batches = [b for b in batches if b.n_scored > 0]
        if not batches:
            raise KnockoutError("the collection split has no scored targets to learn the optimal constants on")
        return batches

    def learn(self, neurons: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """Learn the constants of ``neurons``; returns per layer ``[width]`` values and a record of the choice."""
        ctx, model = self.ctx, self.ctx.model
        device = next(model.parameters()).device
        batches = [b.to(device) for b in self.train_batches()]
        means = [m.float() for m in ctx.stats.means()]
        idx = {s.layer: neurons[s.layer].to(device).long() for s in ctx.sites if neurons[s.layer].numel()}
        # c = mean + std * u with u trainable (init 0): the learning rate is in units of each neuron's spread, so one
        # setting suits models whose pre-out scales differ.
        stds = [s.std.float().clamp_min(1e-4) for s in ctx.stats.layers]
        base = {k: means[k].to(device)[i] for k, i in idx.items()}
        scale = {k: stds[k].to(device)[i] for k, i in idx.items()}
        params = {k: torch.nn.Parameter(torch.zeros_like(base[k])) for k in idx}
        values = {k: (lambda k=k: base[k] + scale[k] * params[k]) for k in idx}
        steps, lr = ctx.optimal.steps, ctx.optimal.lr

        if params and steps > 0:
            opt = torch.optim.Adam(list(params.values()), lr=lr)
            flags = [p.requires_grad for p in model.parameters()]
            try:
                for p in model.parameters():
                    p.requires_grad_(False)
                with torch.enable_grad(), _replace(ctx.sites, idx, values):
                    bar = tqdm(range(steps), desc=f"optimal seed {ctx.seed}", unit="step", leave=False)
                    for step in bar:
                        batch = batches[step % len(batches)]
                        loss = _loss(model, batch, reduction="mean")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        bar.set_postfix_str(f"CE {float(loss.detach()):.4f}")
            finally:
                for p, f in zip(model.parameters(), flags):
                    p.requires_grad_(f)

        learned = [m.clone() for m in means]
        for k, value in values.items():
            learned[k][idx[k].cpu()] = value().detach().float().cpu()
        candidates = {name: get_method(name)(ctx).constants() for name in CANDIDATES}
        candidates["learned"] = learned
        losses = {name: self.training_loss(neurons, values, batches) for name, values in candidates.items()}
        best = min(losses, key=lambda k: (losses[k], k != "learned"))  # ties keep the learned constants
        log.info("optimal seed %d: training CE %s; kept %s", ctx.seed, losses, best)
        meta = {"chosen": best, **{f"train_ce_{k}": v for k, v in losses.items()}, "steps": steps, "lr": lr}
        return [v.clone() for v in candidates[best]], meta

    @torch.no_grad()
    def training_loss(self, neurons, values: Sequence[torch.Tensor], batches: Sequence[Batch]) -> float:
        """Mean CE over all scored targets of ``batches`` with ``neurons`` ablated to ``values`` (folded)."""
        total, n = 0.0, 0
        with fold_constants(self.ctx.sites, neurons, values):
            for batch in batches:
                total += float(_loss(self.ctx.model, batch, reduction="sum"))
                n += batch.n_scored
        return total / n


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
