"""Top-1 accuracy and cross-entropy, accumulated over batches (optionally also per document)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from knockout.data.batch import IGNORE


@dataclass
class Metrics:
    """Running sums; ``top1`` and ``ce`` are means over all scored targets.

    With ``per_doc=True`` it also keeps, per document (one batch row: an evaluation sequence, or an image), the
    scored targets, summed cross-entropy and correct predictions (:meth:`doc_sums`), for paired comparisons of
    methods (:mod:`knockout.inference.paired`). The scalar sums are accumulated exactly as without it.
    """

    n: int = 0
    n_correct: int = 0
    ce_sum: float = 0.0
    per_doc: bool = False
    _docs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``logits``: ``[..., n_classes]``; ``targets``: ``[...]`` with ``IGNORE`` where nothing is scored."""
        if self.per_doc:
            self._add_docs(logits, targets)
        scored = targets != IGNORE
        logits, targets = logits[scored].float(), targets[scored]
        if targets.numel() == 0:
            return
        self.n += targets.numel()
        self.n_correct += int((logits.argmax(-1) == targets).sum())
        self.ce_sum += float(F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE))

    def _add_docs(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Per-row sums of one batch: ``targets`` ``[batch, pos]`` (text) or ``[batch]`` (images, one target each)."""
        rows = targets.shape[0]
        scored = targets != IGNORE
        doc = torch.arange(rows, device=targets.device).view(-1, *([1] * (targets.ndim - 1))).expand_as(targets)
        doc = doc[scored]
        lg, tg = logits[scored].float(), targets[scored]
        if tg.numel() == 0:
            zeros = torch.zeros(rows, dtype=torch.long)
            self._docs.append((zeros, torch.zeros(rows, dtype=torch.float64), zeros))
            return
        ce = F.cross_entropy(lg, tg, reduction="none").double()
        correct = (lg.argmax(-1) == tg).long()
        n = torch.bincount(doc, minlength=rows).cpu()
        ce_sum = torch.zeros(rows, dtype=torch.float64, device=ce.device).index_add_(0, doc, ce).cpu()
        n_correct = torch.zeros(rows, dtype=torch.long, device=doc.device).index_add_(0, doc, correct).cpu()
        self._docs.append((n, ce_sum, n_correct))

    def doc_sums(self) -> dict[str, np.ndarray]:
        """Per document, in batch order: ``n`` (int64), ``ce_sum`` (float64, nats) and ``correct`` (int64), each
        ``[n_docs]``. ``n`` and ``correct`` add up exactly to :attr:`n` and :attr:`n_correct`; ``ce_sum`` to
        :attr:`ce_sum` up to float rounding."""
        self._check_per_doc()
        if not self._docs:
            return {
                k: np.zeros(0, dtype=t) for k, t in (("n", np.int64), ("ce_sum", np.float64), ("correct", np.int64))
            }
        n, ce, correct = (torch.cat(parts) for parts in zip(*self._docs))
        return {"n": n.numpy().astype(np.int64), "ce_sum": ce.numpy(), "correct": correct.numpy().astype(np.int64)}

    def batch_doc_sums(self) -> list[dict[str, np.ndarray]]:
        """:meth:`doc_sums` split by batch: one dict (``n``, ``ce_sum``, ``correct``, each ``[rows]``) per call of
        :meth:`add`, in order. A data-parallel run gathers these from every rank and puts them in the global batch
        order (:func:`knockout.distributed.all_reduce_metrics`)."""
        self._check_per_doc()
        return [
            {"n": n.numpy().astype(np.int64), "ce_sum": ce.numpy(), "correct": c.numpy().astype(np.int64)}
            for n, ce, c in self._docs
        ]

    def add_doc_sums(self, sums: dict[str, np.ndarray]) -> None:
        """Append one batch's per-document sums computed elsewhere (one dict of :meth:`batch_doc_sums`, e.g. from
        another rank). The scalar sums are left alone: the caller accounts for them."""
        self._check_per_doc()
        self._docs.append(
            (
                torch.as_tensor(np.asarray(sums["n"], dtype=np.int64)),
                torch.as_tensor(np.asarray(sums["ce_sum"], dtype=np.float64)),
                torch.as_tensor(np.asarray(sums["correct"], dtype=np.int64)),
            )
        )

    def _check_per_doc(self) -> None:
        if not self.per_doc:
            raise ValueError("these Metrics were not accumulated with per_doc=True")

    @property
    def top1(self) -> float:
        """Fraction of targets whose highest logit is the target (ties go to the lowest index, as argmax)."""
        return self.n_correct / self.n if self.n else float("nan")

    @property
    def ce(self) -> float:
        """Mean cross-entropy in nats."""
        return self.ce_sum / self.n if self.n else float("nan")
