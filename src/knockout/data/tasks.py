"""Build the collection and evaluation batches of a run, by task.

- ``causal``: evaluation scores next-token predictions on exactly ``eval_tokens`` targets; the same batches for
  every seed.
- ``masked``: evaluation scores exactly ``eval_tokens`` chosen tokens of fixed texts, BERT-style corrupted (80% mask
  token, 10% random token, 10% unchanged) with draws from a generator seeded per seed: the same inputs for every
  method and fraction of a seed, different masks for different seeds (see :mod:`knockout.data.masked`).
- ``image``: evaluation scores the class of ``eval_tokens`` images of the evaluation split, the same for every seed
  (see :mod:`knockout.data.images`).

Task prompts (``ioi``, a task ``.jsonl`` file) are evaluated prompt by prompt (:mod:`knockout.data.prompts`; causal LMs
only); ``eval_tokens`` then counts prompts.

Statistics are collected on unmodified inputs of the collection split (``stats_tokens`` real positions; for images,
whole images until at least that many pre-out positions): masked LMs see their collection text unmasked. For text,
``stats_skip_first`` leaves the first positions of every sequence out of the statistics (see docs/design.md).
``stats_source`` (``--stats-data``) collects them on another source's collection split.

Nothing here runs the model: what the batches need to know about it is passed in (its task, tokenizer or image
processor, config, and for images the pre-out sequence length, measured by :func:`knockout.hooks.preout_length`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from knockout.data.batch import Batch
from knockout.data.images import ImageOptions
from knockout.data.text import causal_batches, load_texts, pad_id, tokenize_docs, tokenize_exact
from knockout.errors import KnockoutError

SEED_DEPENDENT_TASKS = ("masked",)  # tasks whose evaluation inputs depend on the seed (the masks)


@dataclass(frozen=True)
class DataSpec:
    """What a run's batches are built from (the data fields of :class:`knockout.config.SweepConfig`)."""

    source: str
    """``wiki``, a local text file or image folder, a Hugging Face datasets name, or task data (``ioi``, a task
    ``.jsonl`` file: see :mod:`knockout.data.prompts`)."""
    eval_tokens: int
    """Scored evaluation targets: next tokens (causal), chosen tokens (masked) or images (image)."""
    stats_tokens: int
    """Pre-out positions of the collection set (for images: whole images until at least this many)."""
    max_length: int
    """Longest text sequence, in tokens."""
    batch_size: int
    """Sequences (or images) per batch."""
    stats_skip_first: int = 0
    """Text: positions at the start of every collection sequence left out of the statistics."""
    image: ImageOptions = field(default_factory=ImageOptions)
    """Image models without an image processor: size and normalisation."""
    sort_by_length: bool = False
    """Text: regroup the batches' rows by length (less padding; the same scored targets), see
    :mod:`knockout.data.packing`. Task prompts are batched in their order."""
    revision: str | None = None
    """A Hugging Face dataset's branch, tag or commit (``None``: its main branch); it applies to ``source``."""
    eval_docs: int | None = None
    """Causal text: evaluate the first ``eval_docs`` documents whole (up to ``max_length`` tokens) instead of exactly
    ``eval_tokens`` targets: the same documents for every tokenizer, so that runs of two models are paired by
    document."""
    stats_source: str | None = None
    """Where statistics are collected (its collection part); ``None``: ``source``'s collection part."""

    @property
    def collection_source(self) -> str:
        """The source whose collection part the statistics come from."""
        return self.stats_source or self.source

    @property
    def collection_revision(self) -> str | None:
        """The revision of :attr:`collection_source` (``revision`` when it is ``source``)."""
        return self.revision if self.collection_source == self.source else None

    def __post_init__(self):
        for name in ("eval_tokens", "stats_tokens", "max_length", "batch_size", "eval_docs"):
            value = getattr(self, name)
            if name == "eval_docs" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise KnockoutError(f"{name} must be a positive integer, got {value!r}")
        skip = self.stats_skip_first
        if not isinstance(skip, int) or isinstance(skip, bool) or not 0 <= skip < self.max_length:
            raise KnockoutError(f"stats_skip_first must be an integer from 0 to max_length - 1, got {skip!r}")


@dataclass(frozen=True)
class ModelInputs:
    """What the batch builders need to know about the model: its task, tokenizer or image processor, config, and
    (image models) the sequence length of the pre-out."""

    task: str
    processor: Any
    config: Any
    preout_len: int | None = None


def stats_batches(spec: DataSpec, model: ModelInputs) -> list[Batch]:
    """Batches of the collection split for :func:`knockout.stats.collect_stats`."""
    if model.task in ("causal", "masked"):
        tok, skip = model.processor, spec.stats_skip_first
        texts = load_texts(spec.collection_source, "collect", spec.collection_revision)
        seqs = tokenize_exact(tok, texts, spec.stats_tokens, spec.max_length, "positions", skip)
        batches = causal_batches(seqs, spec.batch_size, pad_id(tok))
        for batch in batches:
            batch.valid[:, :skip] = False  # left out of the statistics
        return _sorted(batches, spec, tok)
    if model.task == "image":
        from knockout.data.images import image_stats_batches

        return image_stats_batches(
            spec.collection_source, spec.stats_tokens, spec.batch_size, model.processor, spec.image, model.config,
            _preout_len(model), spec.collection_revision,
        )  # fmt: skip
    raise KnockoutError(f"task {model.task!r} is not supported")


def eval_batches(spec: DataSpec, model: ModelInputs, seed: int) -> list[Batch]:
    """The fixed evaluation batches of ``seed`` (the same for every method and fraction of that seed)."""
    from knockout.data import prompts

    task_prompts = prompts.is_task_source(spec.source)  # reads the file's first line
    if spec.eval_docs is not None and (task_prompts or model.task != "causal"):
        raise KnockoutError(
            "--eval-docs counts whole documents of text for causal LMs; give --eval-tokens for task prompts, masked "
            "LMs and images"
        )
    if task_prompts:
        return _prompt_batches(spec, model)
    if model.task == "causal":
        tok = model.processor
        texts = load_texts(spec.source, "eval", spec.revision)
        if spec.eval_docs is not None:
            seqs = tokenize_docs(tok, texts, spec.eval_docs, spec.max_length)
        else:
            seqs = tokenize_exact(tok, texts, spec.eval_tokens, spec.max_length, "targets")
        return _sorted(causal_batches(seqs, spec.batch_size, pad_id(tok)), spec, tok)
    if model.task == "masked":
        from knockout.data.masked import masked_batches, masked_sequences

        tok = model.processor
        seqs = masked_sequences(tok, load_texts(spec.source, "eval", spec.revision), spec.eval_tokens, spec.max_length)
        vocab = getattr(model.config, "vocab_size", None)
        return _sorted(masked_batches(tok, seqs, spec.batch_size, seed, pad_id(tok), vocab), spec, tok)
    if model.task == "image":
        from knockout.data.images import image_eval_batches

        return image_eval_batches(
            spec.source, spec.eval_tokens, spec.batch_size, model.processor, spec.image, model.config,
            _preout_len(model), spec.revision,
        )  # fmt: skip
    raise KnockoutError(f"task {model.task!r} is not supported")


def doc_segments(spec: DataSpec, model: ModelInputs, counts: Sequence[int]) -> list[list[Batch]]:
    """Causal text with ``eval_docs`` whose evaluation may grow (documents on demand): the batches of documents
    ``[0, counts[0])``, ``[counts[0], counts[1])``, ... (``counts`` increasing, the first ``spec.eval_docs``). The first
    ``counts[-1]`` documents are tokenized once; each segment is batched (and sorted by length) on its own, so segment
    0 is :func:`eval_batches`' batches and a row on the first ``counts[k]`` documents is the same whether it was
    evaluated on them at once or grown segment by segment."""
    from knockout.data import prompts

    if spec.eval_docs is None or model.task != "causal" or prompts.is_task_source(spec.source):
        raise KnockoutError(
            "evaluation documents can be added (--decide-max-docs) to whole documents of text for causal LMs: give "
            "--eval-docs N, not task prompts, masked LMs or images"
        )
    if not counts or counts[0] != spec.eval_docs or any(b <= a for a, b in zip(counts, counts[1:])):
        raise KnockoutError(f"document counts must increase from --eval-docs {spec.eval_docs}, got {list(counts)}")
    tok = model.processor
    texts = load_texts(spec.source, "eval", spec.revision)
    seqs = tokenize_docs(tok, texts, counts[-1], spec.max_length, "--decide-max-docs")
    bounds = [0, *counts]
    return [
        _sorted(causal_batches(seqs[a:b], spec.batch_size, pad_id(tok)), spec, tok) for a, b in zip(bounds, bounds[1:])
    ]


def _prompt_batches(spec: DataSpec, model: ModelInputs) -> list[Batch]:
    """Task prompts (:mod:`knockout.data.prompts`): the first ``eval_tokens`` evaluation prompts, one per document."""
    import logging

    from knockout.data import prompts

    if model.task != "causal":
        raise KnockoutError(f"task prompts ({spec.source!r}) need a causal LM; this is a {model.task} model")
    items = prompts.eval_prompts(spec.source, spec.eval_tokens)
    if len(items) < spec.eval_tokens:
        logging.getLogger(__name__).info(
            "%s: using all %d evaluation prompts (--eval-tokens asks for up to %d)",
            spec.source, len(items), spec.eval_tokens,
        )  # fmt: skip
    tok = model.processor
    return prompts.task_batches(tok, items, spec.batch_size, spec.max_length, pad_id(tok))


def counterfactual_eval_batches(spec: DataSpec, model: ModelInputs) -> list[Batch]:
    """The counterfactual runs of :func:`eval_batches`' batches for task prompts (``ioi``, a task ``.jsonl`` file whose
    lines give a ``counterfactual``): batch ``i`` is aligned row by row and position by position with evaluation
    batch ``i`` (:func:`knockout.data.prompts.counterfactual_batches`). What ``patch`` reads
    (:attr:`knockout.ablation.MethodContext.counterfactual_batches`). Raises :class:`KnockoutError` for data without
    counterfactuals, or with one of another token length than its prompt."""
    from knockout.data import prompts

    if not prompts.is_task_source(spec.source):
        raise KnockoutError(
            f"counterfactual patching needs task prompts with counterfactuals (--data ioi, or a task .jsonl file with "
            f'a "counterfactual" field per line); {spec.source!r} is not task data'
        )
    if model.task != "causal":
        raise KnockoutError(f"task prompts ({spec.source!r}) need a causal LM; this is a {model.task} model")
    items = prompts.eval_prompts(spec.source, spec.eval_tokens)
    tok = model.processor
    return prompts.counterfactual_batches(tok, items, spec.batch_size, spec.max_length, pad_id(tok))


def probe_inputs(spec: DataSpec, task: str, processor, config) -> dict | None:
    """For image models, the inputs of one collection image (to measure the pre-out length with); else ``None``."""
    if task != "image":
        return None
    from knockout.data.images import probe_inputs as image_probe

    return image_probe(spec.source, processor, spec.image, config, spec.revision)


def _sorted(batches: list[Batch], spec: DataSpec, tokenizer) -> list[Batch]:
    """``batches`` regrouped by length when ``spec.sort_by_length`` (built first, so masks and targets are those of
    the unsorted batches)."""
    if not spec.sort_by_length:
        return batches
    from knockout.data.packing import sort_by_length

    return sort_by_length(batches, spec.batch_size, pad_id(tokenizer))


def _preout_len(model: ModelInputs) -> int:
    if model.preout_len is None:
        raise ValueError("image batches need ModelInputs.preout_len (knockout.hooks.preout_length)")
    return model.preout_len
