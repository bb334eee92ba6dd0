"""Activation resampling: an ablated neuron takes the value it has when the *unablated* model reads a random input.

Methods (registry names):

- ``resample-chars`` (RS1): random printable ASCII characters (``chr(32)`` .. ``chr(126)``), tokenised the way the
  model normally reads text (with the tokenizer's special tokens, e.g. ``<s> ... </s>``), cut to the batch length;
- ``resample-tokens`` (RS2): token ids drawn uniformly from the vocabulary without the special tokens
  (``tokenizer.all_special_ids``), no special tokens added;
- ``resample-text`` (RS3): text sampled (temperature 1, full softmax) from a causal LM, starting from a short prompt
  (``--resample-prompt``, default ``"The"``). The LM is the evaluated model when it is causal, or the model named
  by ``--resample-model`` (required for masked LMs); another model's text is decoded and re-tokenised
  with the evaluated model's tokenizer;
- ``resample-pixels`` (image models): pixels uniform in [0, 1] per channel, normalised like the evaluation images
  (the image processor's ``image_mean`` / ``image_std`` when the model has a processor, else ``--image-mean`` /
  ``--image-std``, 0.5 by default), in the shape of ``pixel_values``.

Alignment. For an evaluation batch of shape ``[batch, pos]`` the random inputs are a ``[batch, pos]`` batch too (full
attention mask), and the hook sets ``z[b, t, i] := z_rand[b, t, i]``: row ``b``, position ``t`` of the evaluation
input takes the neuron's value at position ``t`` of *its own* random input. The authors' implementation indexed the
batch dimension of the random activations as if it were positions, so with batch size > 1 or long inputs the
replacement silently became a no-op (zero ablation effect). Here a shape mismatch between the cached activations
and the pre-out raises :class:`KnockoutError` instead of broadcasting or truncating.

Seeding. The random inputs of evaluation batch ``index`` are drawn from generators seeded by
``(ctx.seed, index)`` (never the global RNG), so every fraction and every method of a seed sees the same random
inputs, and reruns reproduce them. ``--resample-fixed`` reproduces the paper instead: one random sequence
(or image), drawn once per seed, for every row of every batch (cut to each batch's length).

Cost and memory. The random-input activations are computed with one forward pass of the unablated model per
evaluation batch (plus, for ``resample-text``, the sampling loop) the first time :meth:`on_batch` sees that batch,
and cached by batch index for the later fractions of the same seed. The cache holds, for every evaluation batch and
layer, the full pre-out ``[batch, pos, width]`` in the model's dtype and on its device:
``n_batches * batch * pos * n_layers * width * bytes`` in all (e.g. 4096 positions x 24 layers x 2048 neurons in
bfloat16 = 400 MB). ``--no-resample-cache`` keeps only the current batch and recomputes it for every
fraction (one extra forward pass per batch and fraction). With ``--resample-fixed`` only one ``[1, pos, width]`` per
layer is kept.

Settings (:class:`~knockout.ablation.options.ResampleOptions`, :attr:`MethodContext.resample`; CLI
``--resample-*``): ``fixed`` (default False), ``cache`` (default True), ``prompt`` (default ``"The"``), ``model``
(the causal LM that writes ``resample-text``'s text; the sweep loads it into :attr:`MethodContext.generator`);
``resample-pixels`` normalises with :attr:`MethodContext.image` (see :func:`knockout.data.images.normalisation`).
The random inputs themselves are made in :mod:`knockout.ablation.random_inputs`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from knockout.ablation.methods import AblationMethod, MethodContext, register
from knockout.ablation.options import ResampleOptions
from knockout.ablation.random_inputs import (
    embedding_size,
    generated_ids,
    random_char_ids,
    random_pixels,
    random_seed,
    random_token_ids,
)
from knockout.data.batch import Batch
from knockout.data.images import normalisation
from knockout.errors import KnockoutError
from knockout.hooks import capture, edit_preout

_FIXED = -1  # batch "index" whose seed draws the single fixed random input


def _full_mask(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class ActivationReplacement(AblationMethod):
    """Base class of methods whose ablated neurons take values from another forward pass of the model, per
    evaluation batch: the resampling methods (random inputs) and ``patch`` (counterfactual prompts). A subclass's
    ``on_batch`` sets :attr:`_current` (per layer ``[batch, pos, width]``, from :meth:`activations_of`, cached per
    batch index unless ``--no-resample-cache``); :meth:`ablate` puts those values in, position by position."""

    #: What the replacing activations are, for messages.
    replaced_by: ClassVar[str] = "replacing"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.use_cache = ctx.resample.cache
        self._cache: dict[int, list[torch.Tensor]] = {}  # batch index -> per layer [batch, pos, width]
        self._current: list[torch.Tensor] | None = None
        self._paused = False

    @contextmanager
    def unablated(self) -> Iterator[None]:
        """Inside, this method's hook lets the pre-out through: the model runs unablated."""
        paused, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = paused

    def activations_of(self, inputs: dict[str, torch.Tensor], **extra) -> list[torch.Tensor]:
        """Per layer, the unablated model's pre-out ``[batch, pos, width]`` on ``inputs`` (one forward pass; ``extra``
        keyword arguments go to the model)."""
        acts: list[Any] = [None] * len(self.ctx.sites)

        def keep(site, z):
            acts[site.layer] = z.detach().clone()

        with self.unablated(), torch.no_grad(), capture(self.ctx.sites, keep):
            self.ctx.model(**inputs, **extra)
        return acts

    @contextmanager
    def ablate(self, neurons: Sequence[torch.Tensor]) -> Iterator[None]:
        """Hook each site: ``z[..., i] := z_other[..., i]`` for ``i in neurons[l]``, ``z_other`` the current
        batch's replacing activations (set by ``on_batch``); cleared on exit."""
        idx = {s.layer: neurons[s.layer] for s in self.ctx.sites}
        what = self.replaced_by

        def fn(site, z):
            i = idx[site.layer]
            if i.device != z.device:  # moved once, to where the layer runs (not its weight's: may be offloaded)
                i = idx[site.layer] = i.to(z.device)
            if self._paused or i.numel() == 0:
                return None
            if self._current is None:
                raise KnockoutError(
                    f"{self.name}: no {what} activations for this forward pass; call method.on_batch(index, batch) "
                    "before each forward (evaluate(..., on_batch=method.on_batch))"
                )
            src = self._current[site.layer]
            if src.shape[:-1] != z.shape[:-1]:
                raise KnockoutError(
                    f"{self.name}: {what} activations have shape {tuple(src.shape)} but layer {site.layer}'s pre-out "
                    f"has {tuple(z.shape)}; on_batch must be given the batch that is evaluated next"
                )
            z = z.clone()
            z[..., i] = src[..., i].to(device=z.device, dtype=z.dtype)
            return z

        try:
            with edit_preout(self.ctx.sites, fn):
                yield
        finally:
            self._current = None


class ResampleAblation(ActivationReplacement):
    """Base class: replace ablated neurons by their values on random inputs (see the module docstring).

    Subclasses implement :meth:`random_rows`; everything else (seeding, fixed mode, caching, the hook) is here.
    """

    tasks = ("causal", "masked")
    replaced_by = "random-input"
    #: Whether inputs have token positions (text: random inputs are cut to the batch length; images: not).
    has_positions: ClassVar[bool] = True

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.fixed = ctx.resample.fixed
        self._fixed_acts: list[torch.Tensor] | None = None  # per layer [1, pos_max, width]

    # --- random inputs -------------------------------------------------------------------------------------------

    @abstractmethod
    def random_rows(self, n_rows: int, like: Batch, seed: int, n_pos: int | None = None) -> dict[str, torch.Tensor]:
        """Model inputs (on the CPU) of ``n_rows`` random inputs shaped like ``like``'s rows (``n_pos`` positions if
        given), drawn from ``seed``."""

    def random_inputs(self, index: int, batch: Batch) -> dict[str, torch.Tensor]:
        """The random inputs aligned with evaluation batch ``index`` (same ``[batch, pos]``), on its device.

        Default: a fresh random input per row, seeded by ``(ctx.seed, index)``. With ``ctx.resample.fixed``: the seed's
        single random input, repeated for every row (and cut to the batch length).
        """
        if self.fixed:
            inputs = {k: self._spread(v, batch) for k, v in self._fixed_rows(batch).items()}
        else:
            inputs = self.random_rows(batch.size, batch, random_seed(self.ctx.seed, index))
        return {k: v.to(batch.valid.device) for k, v in inputs.items()}

    def _fixed_rows(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The single fixed random input (one row), as long as the longest evaluation batch (text)."""
        n_pos = None
        if self.has_positions:
            n_pos = max(b.valid.shape[1] for b in [*self.ctx.eval_batches, batch])
        return self.random_rows(1, batch, random_seed(self.ctx.seed, _FIXED), n_pos)

    def _spread(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``[1, L, ...]`` -> ``[batch, pos, ...]``: cut to the batch length (text) and repeat for every row."""
        if self.has_positions:
            x = x[:, : batch.valid.shape[1]]
        return x.expand(batch.size, *x.shape[1:])

    # --- activations ---------------------------------------------------------------------------------------------

    def random_activations(self, index: int, batch: Batch) -> list[torch.Tensor]:
        """Per layer ``[batch, pos, width]``: the pre-out on the random inputs of evaluation batch ``index``."""
        with self.unablated():
            if not self.fixed:
                return self.activations_of(self.random_inputs(index, batch))
            need = batch.valid.shape[1] if self.has_positions else 0
            if self._fixed_acts is None or (self.has_positions and self._fixed_acts[0].shape[1] < need):
                one = {k: v.to(batch.valid.device) for k, v in self._fixed_rows(batch).items()}
                self._fixed_acts = self.activations_of(one)
        return [self._spread(a, batch) for a in self._fixed_acts]

    def _fits(self, acts: list[torch.Tensor], batch: Batch) -> bool:
        a = acts[0]
        return a.shape[0] == batch.size and (not self.has_positions or a.shape[1] == batch.valid.shape[1])

    def on_batch(self, index: int, batch: Batch) -> None:
        """Make the random-input activations of batch ``index`` current (computed once, then cached)."""
        acts = self._cache.get(index)
        if acts is None or not self._fits(acts, batch):  # not seen, or a different batch under the same index
            acts = self.random_activations(index, batch)
            if self.use_cache:
                self._cache[index] = acts
        self._current = acts


class _TextResample(ResampleAblation):
    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        if ctx.processor is None:
            raise KnockoutError(f"method {self.name!r} needs the model's tokenizer")

    def random_rows(self, n_rows, like, seed, n_pos=None):
        return _full_mask(self.random_ids(n_rows, n_pos or like.valid.shape[1], seed))

    @abstractmethod
    def random_ids(self, n_rows: int, n_pos: int, seed: int) -> torch.Tensor:
        """``[n_rows, n_pos]`` random token ids."""


@register("resample-chars")
class CharResample(_TextResample):
    """RS1: values on random printable characters."""

    def random_ids(self, n_rows, n_pos, seed):
        return random_char_ids(self.ctx.processor, n_rows, n_pos, seed)


@register("resample-tokens")
class TokenResample(_TextResample):
    """RS2: values on uniformly random non-special token ids."""

    def random_ids(self, n_rows, n_pos, seed):
        return random_token_ids(self.ctx.processor, n_rows, n_pos, seed, embedding_size(self.ctx.model))


@register("resample-text")
class TextResample(_TextResample):
    """RS3: values on text sampled from a causal LM (the evaluated one, or :attr:`MethodContext.generator`)."""

    @classmethod
    def applies(cls, task: str, resample: ResampleOptions | None = None) -> bool:
        """A masked LM cannot write text itself: it needs ``resample.model``."""
        return super().applies(task, resample) and (task == "causal" or bool(resample and resample.model))

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.prompt = ctx.resample.prompt
        if ctx.generator is None and ctx.task != "causal":
            raise KnockoutError(
                f"method {self.name!r} on a {ctx.task} model needs a causal LM to generate the random text: "
                "give one with --resample-model, e.g. a hub name or local folder "
                "(Python: MethodContext(..., generator=load_model(name, task='causal')))"
            )
        if ctx.generator is not None and ctx.generator.task != "causal":
            raise KnockoutError(f"--resample-model must be a causal LM, got a {ctx.generator.task} model")

    def generator(self) -> tuple[torch.nn.Module, Any]:
        """The causal LM that writes the random text, and its tokenizer."""
        if self.ctx.generator is None:
            return self.ctx.model, self.ctx.processor
        return self.ctx.generator.model, self.ctx.generator.processor

    def random_ids(self, n_rows, n_pos, seed):
        model, gen_tok = self.generator()
        with self.unablated():
            return generated_ids(model, gen_tok, self.ctx.processor, n_rows, n_pos, seed, self.prompt)


@register("resample-pixels")
class PixelResample(ResampleAblation):
    """Values on images of uniform random pixels (normalised like the model's inputs)."""

    tasks = ("image",)
    has_positions = False

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.mean, self.std = normalisation(ctx.processor, ctx.image) or (None, None)

    def random_rows(self, n_rows, like, seed, n_pos=None):
        pixels = like.inputs["pixel_values"]
        shape = (n_rows, *pixels.shape[1:])
        return {"pixel_values": random_pixels(shape, seed, self.mean, self.std, pixels.dtype)}
