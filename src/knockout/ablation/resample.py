"""Activation resampling: an ablated neuron takes the value it has when the *unablated* model reads a random input.

Methods (registry names):

- ``resample-chars`` (RS1): random printable ASCII characters (``chr(32)`` .. ``chr(126)``), tokenised the way the
  model normally reads text (with the tokenizer's special tokens, e.g. ``<s> ... </s>``), cut to the batch length;
- ``resample-tokens`` (RS2): token ids drawn uniformly from the vocabulary without the special tokens
  (``tokenizer.all_special_ids``), no special tokens added;
- ``resample-text`` (RS3): text sampled (temperature 1, full softmax) from a causal LM, starting from a short prompt
  (option ``resample_prompt``, default ``"The"``). The LM is the evaluated model when it is causal, or the model
  named by option ``resample_model`` (required for masked LMs); another model's text is decoded and re-tokenised
  with the evaluated model's tokenizer;
- ``resample-pixels`` (image models): pixels uniform in [0, 1] per channel, normalised like the evaluation images
  (the image processor's ``image_mean`` / ``image_std`` when the model has a processor, else the options
  ``image_mean`` / ``image_std``, 0.5 by default), in the shape of ``pixel_values``.

Alignment. For an evaluation batch of shape ``[batch, pos]`` the random inputs are a ``[batch, pos]`` batch too (full
attention mask), and the hook sets ``z[b, t, i] := z_rand[b, t, i]``: row ``b``, position ``t`` of the evaluation
input takes the neuron's value at position ``t`` of *its own* random input. The authors' implementation indexed the
batch dimension of the random activations as if it were positions, so with batch size > 1 or long inputs the
replacement silently became a no-op (zero ablation effect). Here a shape mismatch between the cached activations
and the pre-out raises :class:`KnockoutError` instead of broadcasting or truncating.

Seeding. The random inputs of evaluation batch ``index`` are drawn from generators seeded by
``(ctx.seed, index)`` (never the global RNG), so every fraction and every method of a seed sees the same random
inputs, and reruns reproduce them. Option ``resample_fixed=True`` reproduces the paper instead: one random sequence
(or image), drawn once per seed, for every row of every batch (cut to each batch's length).

Cost and memory. The random-input activations are computed with one forward pass of the unablated model per
evaluation batch (plus, for ``resample-text``, the sampling loop) the first time :meth:`on_batch` sees that batch,
and cached by batch index for the later fractions of the same seed. The cache holds, for every evaluation batch and
layer, the full pre-out ``[batch, pos, width]`` in the model's dtype and on its device:
``n_batches * batch * pos * n_layers * width * bytes`` in all (e.g. 4096 positions x 24 layers x 2048 neurons in
bfloat16 = 400 MB). Option ``resample_cache=False`` keeps only the current batch and recomputes it for every
fraction (one extra forward pass per batch and fraction). With ``resample_fixed`` only one ``[1, pos, width]`` per
layer is kept.

Options read from :attr:`MethodContext.options`: ``resample_fixed`` (bool, default False), ``resample_cache`` (bool,
default True), ``resample_model`` (model spec for :func:`knockout.loading.load_model`, or a ``LoadedModel``),
``resample_prompt`` (str, default ``"The"``), ``image_mean`` / ``image_std`` (one float or one per channel; used only
when the model has no image processor, as for the evaluation images).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import random
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from knockout.ablation.methods import AblationMethod, MethodContext, register
from knockout.data.batch import Batch
from knockout.data.masked import replacement_ids
from knockout.data.text import pad_id
from knockout.errors import KnockoutError
from knockout.hooks import capture, edit_preout

log = logging.getLogger(__name__)

PRINTABLE = "".join(chr(c) for c in range(32, 127))  # space, letters, digits, punctuation
DEFAULT_PROMPT = "The"
_FIXED = -1  # batch "index" whose seed draws the single fixed random input


def random_seed(seed: int, index: int) -> int:
    """A 63-bit seed for the random inputs of evaluation batch ``index`` under run seed ``seed``.

    A hash, so that neighbouring (seed, index) pairs give unrelated streams.
    """
    digest = hashlib.sha256(f"knockout-resample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _flag(options: dict, key: str, default: bool) -> bool:
    value = options.get(key, default)
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise KnockoutError(f"option {key!r} must be true or false, got {value!r}")
    return bool(value)


def _full_mask(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _fit(tokenizer, texts: Sequence[str], n_pos: int) -> torch.Tensor:
    """``[len(texts), n_pos]`` ids: each text tokenised with the tokenizer's special tokens, cut to ``n_pos``;
    a text too short is padded with the pad id (it still gets a full attention mask)."""
    out = torch.full((len(texts), n_pos), pad_id(tokenizer), dtype=torch.long)
    for row, text in enumerate(texts):
        ids = tokenizer(text, truncation=True, max_length=n_pos)["input_ids"][:n_pos]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def random_char_ids(tokenizer, n_rows: int, n_pos: int, seed: int) -> torch.Tensor:
    """RS1: ``[n_rows, n_pos]`` token ids of random printable characters (special tokens as the tokenizer adds them).

    Each row is a fresh random string, made long enough to give at least ``n_pos`` tokens, then cut.
    """
    rng = random.Random(seed)
    out = torch.empty((n_rows, n_pos), dtype=torch.long)
    for row in range(n_rows):
        n_chars = 2 * n_pos + 8
        text = ""
        while True:
            text += "".join(rng.choice(PRINTABLE) for _ in range(n_chars - len(text)))
            ids = tokenizer(text, truncation=True, max_length=n_pos)["input_ids"]
            if len(ids) >= n_pos:
                break
            n_chars *= 2
            if n_chars > 64 * n_pos + 1024:
                raise KnockoutError(f"random characters do not tokenise to {n_pos} tokens with this tokenizer")
        out[row] = torch.tensor(ids[:n_pos], dtype=torch.long)
    return out


def token_pool(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """RS2's candidates: all ids below ``min(len(tokenizer), vocab_size)`` that are not special tokens (the same
    set a masked LM's random replacements are drawn from)."""
    return replacement_ids(tokenizer, vocab_size)


def random_token_ids(tokenizer, n_rows: int, n_pos: int, seed: int, vocab_size: int | None = None) -> torch.Tensor:
    """RS2: ``[n_rows, n_pos]`` ids uniform over the non-special vocabulary (see :func:`token_pool`)."""
    pool = token_pool(tokenizer, vocab_size)
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randint(pool.numel(), (n_rows, n_pos), generator=g)]


def _cache_kw(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def sample_ids(model: torch.nn.Module, prompt: torch.Tensor, n_new: int, seed: int) -> torch.Tensor:
    """Ancestral sampling (temperature 1, full softmax) of ``n_new`` tokens after ``prompt: [rows, p]``.

    Returns ``[rows, p + n_new]`` on ``prompt``'s device. The draws come from a CPU ``torch.Generator`` seeded
    with ``seed``, so the same seed gives the same ids (on a given device and dtype).
    """
    g = torch.Generator().manual_seed(seed)
    kw = _cache_kw(model)
    ids, step, cache = prompt, prompt, None
    for _ in range(n_new):
        out = model(input_ids=step, use_cache=True, **{kw: cache})
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        probs = torch.softmax(out.logits[:, -1].float().cpu(), dim=-1)
        step = torch.multinomial(probs, 1, generator=g).to(prompt.device)
        ids = torch.cat([ids, step], dim=1)
    return ids


def sample_long(model: torch.nn.Module, prompt: torch.Tensor, n_tokens: int, seed: int) -> torch.Tensor:
    """At least ``n_tokens`` ids per row: ``prompt`` + sampled text, restarted from the prompt (with a derived
    seed) whenever the generator's context (``max_position_embeddings``) is full. One segment when it fits."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(config, "max_position_embeddings", None) or (n_tokens + prompt.shape[1])
    room = limit - prompt.shape[1]
    if room < 1:
        raise KnockoutError(f"the resampling prompt ({prompt.shape[1]} tokens) fills the generator's context")
    parts, have = [], 0
    while have < n_tokens:
        n_new = min(room, max(0, n_tokens - have - prompt.shape[1]))
        parts.append(sample_ids(model, prompt, n_new, seed if not parts else random_seed(seed, len(parts))))
        have += parts[-1].shape[1]
    return torch.cat(parts, dim=1)


def generated_ids(
    model: torch.nn.Module,
    gen_tokenizer,
    tokenizer,
    n_rows: int,
    n_pos: int,
    seed: int,
    prompt: str = DEFAULT_PROMPT,
) -> torch.Tensor:
    """RS3: ``[n_rows, n_pos]`` ids of text sampled from the causal LM ``model`` after ``prompt``.

    When ``gen_tokenizer is tokenizer`` (the evaluated model generates), the sampled ids are used as they are
    (prompt included). Otherwise the text is decoded and re-tokenised with ``tokenizer``; sampling is repeated with
    twice as many tokens (same seed) until every row is long enough, and a row still too short is padded.
    """
    device = next(model.parameters()).device
    p = torch.tensor(gen_tokenizer(prompt)["input_ids"], dtype=torch.long, device=device)
    if p.numel() == 0:
        raise KnockoutError("the resampling prompt tokenises to nothing; give a non-empty resample_prompt")
    p = p.unsqueeze(0).expand(n_rows, -1)
    if gen_tokenizer is tokenizer:
        return sample_long(model, p, n_pos, seed)[:, :n_pos].cpu()
    n_new = n_pos + 8
    for _ in range(4):
        ids = sample_long(model, p, p.shape[1] + n_new, seed)
        texts = gen_tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)
        lengths = [len(tokenizer(t, truncation=True, max_length=n_pos)["input_ids"]) for t in texts]
        if min(lengths) >= n_pos:
            break
        n_new *= 2
    else:
        log.warning("some generated resampling texts are shorter than %d tokens; they are padded", n_pos)
    return _fit(tokenizer, texts, n_pos)


def random_pixels(
    shape: Sequence[int],
    seed: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``shape = [batch, channels, height, width]`` pixels uniform in [0, 1], then ``(x - mean[c]) / std[c]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tuple(shape), generator=g)
    if mean is not None or std is not None:
        c = shape[1]
        m = torch.tensor(mean if mean is not None else [0.0] * c, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std if std is not None else [1.0] * c, dtype=torch.float32).view(1, -1, 1, 1)
        if m.shape[1] not in (1, c) or s.shape[1] not in (1, c):
            raise KnockoutError(f"image_mean/image_std must have 1 or {c} values, got {m.shape[1]} and {s.shape[1]}")
        x = (x - m) / s
    return x.to(dtype)


def pixel_normalisation(processor, options: dict) -> tuple[list[float] | None, list[float] | None]:
    """``(image_mean, image_std)`` as the evaluation images get them (see :func:`knockout.data.images.preprocess`):
    the image processor's own values when there is a processor (``None, None`` if it does not normalise), else the
    options ``image_mean`` / ``image_std`` (one number or one per channel), 0.5 by default (ViT's)."""
    if processor is not None:
        if getattr(processor, "do_normalize", True) is False:
            return None, None
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is not None and std is not None:
            return _per_channel(mean), _per_channel(std)
    return _per_channel(options.get("image_mean", 0.5)), _per_channel(options.get("image_std", 0.5))


def _per_channel(value) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


class ResampleAblation(AblationMethod):
    """Base class: replace ablated neurons by their values on random inputs (see the module docstring).

    Subclasses implement :meth:`random_rows`; everything else (seeding, fixed mode, caching, the hook) is here.
    """

    tasks = ("causal", "masked")
    #: Whether inputs have token positions (text: random inputs are cut to the batch length; images: not).
    has_positions: ClassVar[bool] = True

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.fixed = _flag(ctx.options, "resample_fixed", False)
        self.use_cache = _flag(ctx.options, "resample_cache", True)
        self._cache: dict[int, list[torch.Tensor]] = {}  # batch index -> per layer [batch, pos, width]
        self._fixed_acts: list[torch.Tensor] | None = None  # per layer [1, pos_max, width]
        self._current: list[torch.Tensor] | None = None
        self._paused = False

    # --- random inputs -------------------------------------------------------------------------------------------

    @abstractmethod
    def random_rows(self, n_rows: int, like: Batch, seed: int, n_pos: int | None = None) -> dict[str, torch.Tensor]:
        """Model inputs (on the CPU) of ``n_rows`` random inputs shaped like ``like``'s rows (``n_pos`` positions if
        given), drawn from ``seed``."""

    def random_inputs(self, index: int, batch: Batch) -> dict[str, torch.Tensor]:
        """The random inputs aligned with evaluation batch ``index`` (same ``[batch, pos]``), on its device.

        Default: a fresh random input per row, seeded by ``(ctx.seed, index)``. With ``resample_fixed``: the seed's
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

    @contextmanager
    def unablated(self) -> Iterator[None]:
        """Inside, this method's hook lets the pre-out through: the model runs unablated."""
        paused, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = paused

    def activations_of(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, the unablated model's pre-out ``[batch, pos, width]`` on ``inputs`` (one forward pass)."""
        acts: list[Any] = [None] * len(self.ctx.sites)

        def keep(site, z):
            acts[site.layer] = z.detach().clone()

        with self.unablated(), torch.no_grad(), capture(self.ctx.sites, keep):
            self.ctx.model(**inputs)
        return acts

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

    # --- ablation ------------------------------------------------------------------------------------------------

    @contextmanager
    def ablate(self, neurons: Sequence[torch.Tensor]) -> Iterator[None]:
        """Hook each site: ``z[..., i] := z_rand[..., i]`` for ``i in neurons[l]``, with ``z_rand`` the current
        batch's random-input activations (set by :meth:`on_batch`)."""
        idx = {s.layer: neurons[s.layer].to(s.weight().device) for s in self.ctx.sites}

        def fn(site, z):
            i = idx[site.layer]
            if self._paused or i.numel() == 0:
                return None
            if self._current is None:
                raise KnockoutError(
                    f"{self.name}: no random-input activations for this forward pass; call "
                    "method.on_batch(index, batch) before each forward (evaluate(..., on_batch=method.on_batch))"
                )
            src = self._current[site.layer]
            if src.shape[:-1] != z.shape[:-1]:
                raise KnockoutError(
                    f"{self.name}: random-input activations have shape {tuple(src.shape)} but layer {site.layer}'s "
                    f"pre-out has {tuple(z.shape)}; on_batch must be given the batch that is evaluated next"
                )
            z = z.clone()
            z[..., i] = src[..., i].to(device=z.device, dtype=z.dtype)
            return z

        try:
            with edit_preout(self.ctx.sites, fn):
                yield
        finally:
            self._current = None


def _vocab_size(model) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    return getattr(emb, "num_embeddings", None)


class _TextResample(ResampleAblation):
    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        if ctx.tokenizer is None:
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
        return random_char_ids(self.ctx.tokenizer, n_rows, n_pos, seed)


@register("resample-tokens")
class TokenResample(_TextResample):
    """RS2: values on uniformly random non-special token ids."""

    def random_ids(self, n_rows, n_pos, seed):
        return random_token_ids(self.ctx.tokenizer, n_rows, n_pos, seed, _vocab_size(self.ctx.model))


@functools.lru_cache(maxsize=1)
def _load_generator(spec: str, dtype: str, device: str):
    from knockout.loading import load_model

    return load_model(spec, task="causal", dtype=dtype, device=device)


def _dtype_name(model) -> str:
    from knockout.loading import DTYPES

    dtype = next(model.parameters()).dtype
    return next((k for k, v in DTYPES.items() if v == dtype), "auto")


@register("resample-text")
class TextResample(_TextResample):
    """RS3: values on text sampled from a causal LM (the evaluated one, or option ``resample_model``)."""

    @classmethod
    def applies(cls, task: str, options: dict | None = None) -> bool:
        """A masked LM cannot write text itself: it needs option ``resample_model``."""
        return super().applies(task, options) and (task == "causal" or bool((options or {}).get("resample_model")))

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.prompt = str(ctx.options.get("resample_prompt", DEFAULT_PROMPT))
        spec = ctx.options.get("resample_model")
        if spec is None and ctx.task != "causal":
            raise KnockoutError(
                f"method {self.name!r} on a {ctx.task} model needs a causal LM to generate the random text: "
                "give one with --resample-model (option resample_model), e.g. a hub name or local folder"
            )
        if isinstance(spec, str):
            from knockout.loading import resolve_source

            resolve_source(spec)  # a missing local path fails here, before the sweep writes anything
        self._spec = spec
        self._generator = None

    def generator(self) -> tuple[torch.nn.Module, Any]:
        """The causal LM that writes the random text, and its tokenizer (loaded on first use)."""
        if self._spec is None:
            return self.ctx.model, self.ctx.tokenizer
        if self._generator is None:
            spec = self._spec
            if isinstance(spec, str):
                device = str(next(self.ctx.model.parameters()).device)
                spec = _load_generator(spec, _dtype_name(self.ctx.model), device)
            if getattr(spec, "task", "causal") != "causal":
                raise KnockoutError(f"resample_model must be a causal LM, got a {spec.task} model")
            self._generator = (spec.model, spec.processor)
        return self._generator

    def random_ids(self, n_rows, n_pos, seed):
        model, gen_tok = self.generator()
        with self.unablated():
            return generated_ids(model, gen_tok, self.ctx.tokenizer, n_rows, n_pos, seed, self.prompt)


@register("resample-pixels")
class PixelResample(ResampleAblation):
    """Values on images of uniform random pixels (normalised like the model's inputs)."""

    tasks = ("image",)
    has_positions = False

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.mean, self.std = pixel_normalisation(ctx.tokenizer, ctx.options)

    def random_rows(self, n_rows, like, seed, n_pos=None):
        pixels = like.inputs["pixel_values"]
        shape = (n_rows, *pixels.shape[1:])
        return {"pixel_values": random_pixels(shape, seed, self.mean, self.std, pixels.dtype)}
