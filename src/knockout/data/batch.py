"""The batch every model task is reduced to: model inputs, which positions are real, and what to predict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from knockout.errors import KnockoutError

IGNORE = -100  # target value of positions that are not scored (as in torch's cross_entropy)


@dataclass
class Batch:
    """One forward pass worth of data.

    inputs:  keyword arguments of the model (``input_ids`` + ``attention_mask``, or ``pixel_values``).
    valid:   ``[batch, pos]`` bool, True at real (non-padding) positions: these enter the statistics.
    targets: ``[batch, pos]`` token ids with ``IGNORE`` where nothing is scored (causal and masked LMs), or
             ``[batch]`` class labels (image classifiers). ``logits[..., :]`` at a position predicts its target.
    contrast: prompts with a correct and an incorrect answer (:mod:`knockout.data.prompts`): ``[batch, pos]`` the
             incorrect answer's token where ``targets`` holds the correct one, ``IGNORE`` elsewhere; scored by the
             logit difference ``logit[target] - logit[contrast]``. ``None`` for every other batch.
    keep:    ``[k]`` sorted positions that hold every scored target, when few do (task prompts): the model computes
             logits at these positions only (``logits_to_keep``). ``None``: logits at every position.
    """

    inputs: dict[str, torch.Tensor]
    valid: torch.Tensor
    targets: torch.Tensor
    contrast: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            {k: v.to(device) for k, v in self.inputs.items()},
            self.valid.to(device),
            self.targets.to(device),
            move(self.contrast),
            move(self.keep),
        )

    @property
    def size(self) -> int:
        return self.valid.shape[0]

    @property
    def n_scored(self) -> int:
        """Number of scored targets in this batch."""
        return int((self.targets != IGNORE).sum()) if self.targets.ndim > 1 else self.targets.shape[0]


def padded_batches(
    seqs: list[list[int]], batch_size: int, pad: int, encode: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]
) -> list[Batch]:
    """Right-padded batches of ``seqs``; ``encode(seq)`` gives each row's ``[L]`` input ids and ``[L]`` targets
    (called in order, so a seeded generator inside it gives the same result every time)."""
    if batch_size <= 0:
        raise KnockoutError(f"batch size must be positive, got {batch_size}")
    batches = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)], targets[row, : len(s)] = encode(s)
            mask[row, : len(s)] = 1
        batches.append(Batch({"input_ids": ids, "attention_mask": mask}, mask.bool(), targets))
    return batches
