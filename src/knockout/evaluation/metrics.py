"""Top-1 accuracy and cross-entropy, accumulated over batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from knockout.data.batch import IGNORE


@dataclass
class Metrics:
    """Running sums; ``top1`` and ``ce`` are means over all scored targets."""

    n: int = 0
    n_correct: int = 0
    ce_sum: float = 0.0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``logits``: ``[..., n_classes]``; ``targets``: ``[...]`` with ``IGNORE`` where nothing is scored."""
        scored = targets != IGNORE
        logits, targets = logits[scored].float(), targets[scored]
        if targets.numel() == 0:
            return
        self.n += targets.numel()
        self.n_correct += int((logits.argmax(-1) == targets).sum())
        self.ce_sum += float(F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE))

    @property
    def top1(self) -> float:
        """Fraction of targets whose highest logit is the target (ties go to the lowest index, as argmax)."""
        return self.n_correct / self.n if self.n else float("nan")

    @property
    def ce(self) -> float:
        """Mean cross-entropy in nats."""
        return self.ce_sum / self.n if self.n else float("nan")
