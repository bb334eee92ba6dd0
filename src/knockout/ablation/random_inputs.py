"""Random inputs for resampling ablations: characters (RS1), token ids (RS2), sampled text (RS3), pixels.

Every generator here is a pure function of its arguments and an explicit seed (never the global RNG), so the same
seed gives the same inputs in every run. :func:`random_seed` derives the seed of one evaluation batch from the run's
seed. The ablation classes that use these inputs are in :mod:`knockout.ablation.resample`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import random
from collections.abc import Sequence

import torch

from knockout.data.masked import replacement_ids
from knockout.data.text import pad_id
from knockout.devices import input_device
from knockout.errors import KnockoutError
from knockout.sites import text_config

log = logging.getLogger(__name__)

PRINTABLE = "".join(chr(c) for c in range(32, 127))  # space, letters, digits, punctuation
DEFAULT_PROMPT = "The"


def random_seed(seed: int, index: int) -> int:
    """A 63-bit seed for the random inputs of evaluation batch ``index`` under run seed ``seed``.

    A hash, so that neighbouring (seed, index) pairs give unrelated streams.
    """
    digest = hashlib.sha256(f"knockout-resample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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


def embedding_size(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding (may be fewer than the tokenizer's ids), or ``None``."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    return getattr(emb, "num_embeddings", None)


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
    config = text_config(model.config)
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
    device = input_device(model)
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
