"""Build the collection and evaluation batches of a run, by task.

- ``causal``: evaluation scores next-token predictions on exactly ``eval_tokens`` targets; the same batches for
  every seed.
- ``masked``: evaluation scores exactly ``eval_tokens`` chosen tokens of fixed texts, BERT-style corrupted (80% mask
  token, 10% random token, 10% unchanged) with draws from a generator seeded per seed: the same inputs for every
  method and fraction of a seed, different masks for different seeds (see :mod:`knockout.data.masked`).
- ``image``: evaluation scores the class of ``eval_tokens`` images of the evaluation split, the same for every seed
  (see :mod:`knockout.data.images`).

Statistics are collected on unmodified inputs of the collection split (``stats_tokens`` real positions; for images,
whole images until at least that many pre-out positions): masked LMs see their collection text unmasked. For text,
``stats_skip_first`` leaves the first positions of every sequence out of the statistics (see docs/design.md).
"""

from __future__ import annotations

from knockout.data.batch import Batch
from knockout.data.text import causal_batches, load_texts, pad_id, tokenize_exact
from knockout.errors import KnockoutError


def stats_batches(cfg, loaded) -> list[Batch]:
    """Batches of the collection split for :func:`knockout.stats.collect_stats`."""
    if loaded.task in ("causal", "masked"):
        tok = loaded.processor
        skip = cfg.stats_skip_first
        seqs = tokenize_exact(tok, load_texts(cfg.data, "collect"), cfg.stats_tokens, cfg.max_length, "positions", skip)
        batches = causal_batches(seqs, cfg.batch_size, pad_id(tok))
        for batch in batches:
            batch.valid[:, :skip] = False  # left out of the statistics
        return batches
    if loaded.task == "image":
        from knockout.data.images import image_stats_batches

        return image_stats_batches(cfg, loaded)
    raise KnockoutError(f"task {loaded.task!r} is not supported")


SEED_DEPENDENT_TASKS = ("masked",)  # tasks whose evaluation inputs depend on the seed (the masks)


def eval_batches(cfg, loaded, seed: int) -> list[Batch]:
    """The fixed evaluation batches of ``seed`` (the same for every method and fraction of that seed)."""
    if loaded.task == "causal":
        tok = loaded.processor
        seqs = tokenize_exact(tok, load_texts(cfg.data, "eval"), cfg.eval_tokens, cfg.max_length, "targets")
        return causal_batches(seqs, cfg.batch_size, pad_id(tok))
    if loaded.task == "masked":
        from knockout.data.masked import masked_batches, masked_sequences

        tok = loaded.processor
        seqs = masked_sequences(tok, load_texts(cfg.data, "eval"), cfg.eval_tokens, cfg.max_length)
        vocab = getattr(loaded.model.config, "vocab_size", None)
        return masked_batches(tok, seqs, cfg.batch_size, seed, pad_id(tok), vocab)
    if loaded.task == "image":
        from knockout.data.images import image_eval_batches

        return image_eval_batches(cfg, loaded)
    raise KnockoutError(f"task {loaded.task!r} is not supported")
