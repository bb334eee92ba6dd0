"""Masked-LM evaluation: BERT-style corruption of fixed texts, drawn from a generator seeded per seed.

Protocol (as in BERT and Hugging Face's ``DataCollatorForLanguageModeling``, with an exact count per text):

1. The evaluation texts are tokenized with the model's tokenizer (special tokens such as ``<s>``/``</s>`` or
   ``[CLS]``/``[SEP]`` included) and cut at ``max_length``.
2. In each text, ``k = max(1, round(0.15 * n))`` of its ``n`` non-special tokens are *chosen*, uniformly without
   replacement. Special tokens are never chosen.
3. Each chosen token independently becomes the mask token with probability 0.8, a uniformly random non-special
   token of the vocabulary with probability 0.1, and stays as it is with probability 0.1.
4. Targets are the original ids at the chosen positions and ``IGNORE`` everywhere else, so only chosen tokens are
   scored.

``eval_tokens`` is the number of *chosen* (scored) tokens. Because ``k`` depends only on a text's length, the set
of texts does not depend on the seed: texts are taken in order until their ``k`` add up to ``eval_tokens``, and
the last text is cut to the shortest prefix (keeping its closing special token) that holds the remainder.

Every random draw comes from one :class:`torch.Generator` seeded from the run's seed, so every method and every
fraction of a seed sees exactly the same masked inputs, and different seeds see different masks. (The authors'
code drew the masks from the global RNG, so the masked inputs changed from one evaluation step to the next and
ablation methods were compared on different inputs; this module deliberately does not do that.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from knockout.data.batch import IGNORE, Batch, padded_batches
from knockout.errors import KnockoutError

MASK_RATE = 0.15
"""Fraction of a text's non-special tokens that are chosen (and scored)."""
MASK_SPLIT = (0.8, 0.1, 0.1)
"""Probabilities that a chosen token becomes the mask token, a random token, or stays."""
_SEED_OFFSET = 0x6D61736B  # "mask": keeps the mask draws unrelated to the neuron order drawn from the same seed


def n_chosen(n_content: int) -> int:
    """How many of ``n_content`` non-special tokens are chosen: ``max(1, round(0.15 * n))`` (0 if there are none)."""
    return 0 if n_content <= 0 else max(1, int(round(MASK_RATE * n_content)))


def special_ids(tokenizer) -> set[int]:
    """Ids that are never chosen nor drawn as random replacements (``<s>``, ``</s>``, ``<pad>``, ``<mask>`` ...)."""
    return {int(i) for i in tokenizer.all_special_ids}


def masked_sequences(tokenizer, texts: Iterable[str], n_scored: int, max_length: int) -> list[list[int]]:
    """Token id sequences (special tokens included) whose chosen-token counts add up to exactly ``n_scored``."""
    if n_scored <= 0:
        raise KnockoutError(f"the number of evaluation tokens must be positive, got {n_scored}")
    if max_length < 3:
        raise KnockoutError(f"max_length must be at least 3 for a masked LM, got {max_length}")
    specials = special_ids(tokenizer)
    seqs, total = [], 0
    for text in texts:
        ids = list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        content = [p for p, t in enumerate(ids) if t not in specials]
        have = n_chosen(len(content))
        if have == 0:
            continue
        need = n_scored - total
        if have >= need:
            if have > need:  # shortest prefix of content tokens whose k is `need` (k grows by at most 1 per token)
                n = next(n for n in range(1, len(content) + 1) if n_chosen(n) >= need)
                tail = [ids[-1]] if ids[-1] in specials else []
                ids = ids[: content[n - 1] + 1] + tail
            seqs.append(ids)
            return seqs
        seqs.append(ids)
        total += have
    raise KnockoutError(
        f"the data gave only {total} masked tokens but {n_scored} were asked for; "
        "lower --eval-tokens or use a larger data source"
    )


def mask_generator(seed: int) -> torch.Generator:
    """The generator of all mask draws of ``seed`` (a fresh one per call, so draws never depend on history)."""
    return torch.Generator().manual_seed(_SEED_OFFSET + int(seed))


def mask_sequence(
    ids: list[int], specials: set[int], mask_id: int, replacements: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of one sequence, both ``[len(ids)]``; draws from ``gen`` in a fixed order."""
    original = torch.tensor(ids, dtype=torch.long)
    content = torch.tensor([p for p, t in enumerate(ids) if t not in specials], dtype=torch.long)
    k = n_chosen(len(content))
    chosen = content[torch.randperm(len(content), generator=gen)[:k]]
    kind = torch.rand(k, generator=gen)
    random_ids = replacements[torch.randint(len(replacements), (k,), generator=gen)]
    inputs = original.clone()
    p_mask, p_random, _ = MASK_SPLIT
    to_mask = kind < p_mask
    to_random = (kind >= p_mask) & (kind < p_mask + p_random)
    inputs[chosen[to_mask]] = mask_id
    inputs[chosen[to_random]] = random_ids[to_random]
    targets = torch.full_like(original, IGNORE)
    targets[chosen] = original[chosen]
    return inputs, targets


def replacement_ids(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """Ids a chosen token may be replaced by: the vocabulary without special tokens (``[n]``)."""
    n = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    specials = special_ids(tokenizer)
    ids = torch.tensor([i for i in range(n) if i not in specials], dtype=torch.long)
    if ids.numel() == 0:
        raise KnockoutError("the tokenizer has no non-special tokens to draw random replacements from")
    return ids


def masked_batches(
    tokenizer, seqs: list[list[int]], batch_size: int, seed: int, pad: int, vocab_size: int | None = None
) -> list[Batch]:
    """Right-padded batches of ``seqs`` with the masking of ``seed`` applied; targets at chosen positions only.

    ``vocab_size`` (the model's embedding size) bounds the random replacement ids when it is smaller than the
    tokenizer's vocabulary.
    """
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise KnockoutError("the tokenizer has no mask token; masked-LM evaluation needs one (use --task causal?)")
    specials = special_ids(tokenizer)
    replacements = replacement_ids(tokenizer, vocab_size)
    gen = mask_generator(seed)
    return padded_batches(seqs, batch_size, pad, lambda s: mask_sequence(s, specials, mask_id, replacements, gen))
