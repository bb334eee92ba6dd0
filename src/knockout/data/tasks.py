"""Build the collection and evaluation batches of a run, by task.

- ``causal``: evaluation scores next-token predictions on exactly ``eval_tokens`` targets; the same batches for
  every seed.
Statistics are collected on unmodified inputs of the collection split (``stats_tokens`` real tokens).
"""

from __future__ import annotations

from knockout.data.batch import Batch
from knockout.data.text import causal_batches, load_texts, pad_id, tokenize_exact
from knockout.errors import KnockoutError


def stats_batches(cfg, loaded) -> list[Batch]:
    """Batches of the collection split for :func:`knockout.stats.collect_stats`."""
    if loaded.task in ("causal", "masked"):
        tok = loaded.processor
        seqs = tokenize_exact(tok, load_texts(cfg.data, "collect"), cfg.stats_tokens, cfg.max_length, "positions")
        return causal_batches(seqs, cfg.batch_size, pad_id(tok))
    raise KnockoutError(f"task {loaded.task!r} is not supported yet")


def eval_batches(cfg, loaded, seed: int) -> list[Batch]:
    """The fixed evaluation batches of ``seed`` (the same for every method and fraction of that seed)."""
    if loaded.task == "causal":
        tok = loaded.processor
        seqs = tokenize_exact(tok, load_texts(cfg.data, "eval"), cfg.eval_tokens, cfg.max_length, "targets")
        return causal_batches(seqs, cfg.batch_size, pad_id(tok))
    raise KnockoutError(f"task {loaded.task!r} is not supported yet")
