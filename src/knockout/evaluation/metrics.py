"""Top-1 accuracy and cross-entropy, accumulated over batches (optionally also per document); and, for prompts with a
correct and an incorrect answer, the logit difference.

Scored targets are the positions whose target is not ``IGNORE``. Top-1 is the share of them whose highest logit is
the target; for contrast batches (``contrast`` given: the incorrect answer's token at each scored position, see
:mod:`knockout.data.prompts`) it is instead the share where the correct token's logit beats the incorrect one's
(strictly), and the logit difference ``logit[target] - logit[contrast]`` is summed too (Wang et al. 2022).
Cross-entropy is always that of the target token.
"""

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
    ld_sum: float = 0.0
    """Sum of ``logit[target] - logit[contrast]`` over the scored targets of contrast batches."""
    n_contrast: int = 0
    """Scored targets of contrast batches (the logit difference's denominator)."""
    _docs: list[tuple[torch.Tensor, ...]] = field(default_factory=list, repr=False)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, contrast: torch.Tensor | None = None) -> None:
        """``logits``: ``[..., n_classes]``; ``targets``: ``[...]`` with ``IGNORE`` where nothing is scored;
        ``contrast``: ``[...]`` the incorrect answer's token at each scored target (contrast batches), else ``None``."""
        if self.per_doc:
            self._add_docs(logits, targets, contrast)
        scored = targets != IGNORE
        lg, tg = logits[scored].float(), targets[scored]
        if tg.numel() == 0:
            return
        self.n += tg.numel()
        self.ce_sum += float(F.cross_entropy(lg, tg, reduction="sum", ignore_index=IGNORE))
        if contrast is None:
            self.n_correct += int((lg.argmax(-1) == tg).sum())
            return
        s = scored_metrics(lg, tg, contrast[scored])
        self.n_correct += int(s.correct.sum())
        self.n_contrast += s.n
        self.ld_sum += float(s.logit_diff.double().sum())

    def _add_docs(self, logits: torch.Tensor, targets: torch.Tensor, contrast: torch.Tensor | None) -> None:
        """Per-row sums of one batch: ``targets`` ``[batch, pos]`` (text) or ``[batch]`` (images, one target each)."""
        rows = targets.shape[0]
        scored = targets != IGNORE
        doc = torch.arange(rows, device=targets.device).view(-1, *([1] * (targets.ndim - 1))).expand_as(targets)
        doc = doc[scored]
        s = scored_metrics(logits[scored], targets[scored], None if contrast is None else contrast[scored])
        ld = () if contrast is None else (torch.zeros(rows, dtype=torch.float64),)
        if s.n == 0:
            zeros = torch.zeros(rows, dtype=torch.long)
            self._docs.append((zeros, torch.zeros(rows, dtype=torch.float64), zeros, *ld))
            return
        n = torch.bincount(doc, minlength=rows).cpu()
        ce_sum = torch.zeros(rows, dtype=torch.float64, device=doc.device).index_add_(0, doc, s.ce.double()).cpu()
        n_correct = torch.zeros(rows, dtype=torch.long, device=doc.device).index_add_(0, doc, s.correct.long()).cpu()
        if s.logit_diff is not None:
            zeros = torch.zeros(rows, dtype=torch.float64, device=doc.device)
            ld = (zeros.index_add_(0, doc, s.logit_diff.double()).cpu(),)
        self._docs.append((n, ce_sum, n_correct, *ld))

    def doc_sums(self) -> dict[str, np.ndarray]:
        """Per document, in batch order: ``n`` (int64), ``ce_sum`` (float64, nats) and ``correct`` (int64), each
        ``[n_docs]``; for contrast batches also ``ld_sum`` (float64, the summed logit differences). ``n`` and
        ``correct`` add up exactly to :attr:`n` and :attr:`n_correct`; ``ce_sum`` to
        :attr:`ce_sum` up to float rounding."""
        self._check_per_doc()
        if not self._docs:
            return {
                k: np.zeros(0, dtype=t) for k, t in (("n", np.int64), ("ce_sum", np.float64), ("correct", np.int64))
            }
        if len({len(d) for d in self._docs}) > 1:
            raise ValueError("some batches had a contrast (correct vs incorrect answer) and others not")
        n, ce, correct, *ld = (torch.cat(parts) for parts in zip(*self._docs))
        out = {"n": n.numpy().astype(np.int64), "ce_sum": ce.numpy(), "correct": correct.numpy().astype(np.int64)}
        if ld:
            out["ld_sum"] = ld[0].numpy()
        return out

    def batch_doc_sums(self) -> list[dict[str, np.ndarray]]:
        """:meth:`doc_sums` split by batch: one dict (``n``, ``ce_sum``, ``correct``, each ``[rows]``) per call of
        :meth:`add`, in order. A data-parallel run gathers these from every rank and puts them in the global batch
        order (:func:`knockout.distributed.all_reduce_metrics`)."""
        self._check_per_doc()
        out = []
        for n, ce, c, *ld in self._docs:
            d = {"n": n.numpy().astype(np.int64), "ce_sum": ce.numpy(), "correct": c.numpy().astype(np.int64)}
            if ld:
                d["ld_sum"] = ld[0].numpy()
            out.append(d)
        return out

    def add_doc_sums(self, sums: dict[str, np.ndarray]) -> None:
        """Append one batch's per-document sums computed elsewhere (one dict of :meth:`batch_doc_sums`, e.g. from
        another rank). The scalar sums are left alone: the caller accounts for them."""
        self._check_per_doc()
        ld = () if "ld_sum" not in sums else (torch.as_tensor(np.asarray(sums["ld_sum"], dtype=np.float64)),)
        self._docs.append(
            (
                torch.as_tensor(np.asarray(sums["n"], dtype=np.int64)),
                torch.as_tensor(np.asarray(sums["ce_sum"], dtype=np.float64)),
                torch.as_tensor(np.asarray(sums["correct"], dtype=np.int64)),
                *ld,
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

    @property
    def logit_diff(self) -> float | None:
        """Mean ``logit[correct] - logit[incorrect]`` over contrast targets; ``None`` when there were none."""
        return self.ld_sum / self.n_contrast if self.n_contrast else None


@dataclass
class Scored:
    """Per scored target: ``ce`` (nats), ``correct`` (bool) and ``logit_diff`` (contrast targets, else ``None``)."""

    ce: torch.Tensor
    correct: torch.Tensor
    logit_diff: torch.Tensor | None

    @property
    def n(self) -> int:
        return int(self.ce.numel())


def scored_metrics(logits: torch.Tensor, targets: torch.Tensor, contrast: torch.Tensor | None = None) -> Scored:
    """The metrics of ``[n]`` scored targets from their ``[n, n_classes]`` logits (computed in float32; keeps the
    autograd graph, so :mod:`knockout.evaluation.attribution` differentiates the same formulas). ``correct`` is the
    argmax hitting the target, or, with ``contrast``, the target's logit beating the contrast token's strictly.
    Half-precision logits are computed in float32, float64 logits in float64."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    ce = F.cross_entropy(logits, targets, reduction="none") if targets.numel() else logits.new_zeros(0)
    if contrast is None:
        return Scored(ce, logits.argmax(-1) == targets if targets.numel() else targets.bool(), None)
    diff = logits.gather(-1, targets[:, None])[:, 0] - logits.gather(-1, contrast[:, None])[:, 0]
    return Scored(ce, diff > 0, diff)
