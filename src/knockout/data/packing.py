"""Less padding: regroup text batches so that sequences of similar length share a batch (opt-in).

Batches are built in document order, so a batch mixes short and long sequences and pads the short ones to the
longest; the padded positions are computed and thrown away. :func:`sort_by_length` takes the batches as built
(masks already drawn, positions already left out of the statistics) and regroups their *rows* by length, longest
first, into batches of at most the same size (closed early before a row much shorter than the batch's first, see
:data:`MIN_FILL`). Every row keeps its inputs, valid positions and targets, so the scored
targets are exactly the same (the same multiset of (sequence, position, target)); only which rows share a forward
pass changes. Results of constant ablations then equal the unsorted run up to float rounding. Resampling draws one
random input per evaluation batch (seeded by the batch index), so its results change: that is why the option is
part of the run's settings (``options.sort_by_length``, ``--sort-by-length``) and refused on resume of an unsorted
run. Every method and fraction of a seed still sees the same batches.

:func:`scored_fraction` is the share of computed positions that count (scored targets for evaluation, valid
positions for statistics); the sweep logs it and stores it in ``config.json`` (``resolved.positions_used``).
"""

from __future__ import annotations

import torch

from knockout.data.batch import IGNORE, Batch


def _rows(batches: list[Batch]) -> list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    """Every row of right-padded text ``batches``, cut to its real length (``attention_mask``)."""
    rows = []
    for b in batches:
        lengths = b.inputs["attention_mask"].sum(1).tolist()
        for r, n in enumerate(lengths):
            rows.append(({k: v[r, :n] for k, v in b.inputs.items()}, b.valid[r, :n], b.targets[r, :n]))
    return rows


#: A sorted batch is closed before a row shorter than this share of its width (the row would waste more than a
#: quarter of its padded length); computing fewer positions costs one more, smaller, forward pass instead.
MIN_FILL = 0.75


def sort_by_length(batches: list[Batch], batch_size: int, pad: int, min_fill: float = MIN_FILL) -> list[Batch]:
    """The rows of right-padded text ``batches`` regrouped longest first (a stable sort: rows of equal length keep
    their order) into right-padded batches of at most ``batch_size`` rows; a batch is closed early before a row
    shorter than ``min_fill`` times its width (so each row's padding is under ``1 - min_fill`` of its batch's width;
    e.g. four full rows and a cut last document become two batches, not one padded to the full width). ``pad``
    fills ``input_ids``, 0 the other inputs, ``False`` ``valid`` and ``IGNORE`` the targets."""
    rows = sorted(_rows(batches), key=lambda row: -row[1].shape[0])
    chunks: list[list] = []
    for row in rows:
        n = row[1].shape[0]
        if not chunks or len(chunks[-1]) == batch_size or n < min_fill * chunks[-1][0][1].shape[0]:
            chunks.append([])
        chunks[-1].append(row)
    out = []
    for chunk in chunks:
        width = chunk[0][1].shape[0]  # the longest row: the first, as rows are sorted
        inputs = {
            k: torch.full((len(chunk), width), pad if k == "input_ids" else 0, dtype=v.dtype)
            for k, v in chunk[0][0].items()
        }
        valid = torch.zeros((len(chunk), width), dtype=torch.bool)
        targets = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for r, (row_inputs, row_valid, row_targets) in enumerate(chunk):
            n = row_valid.shape[0]
            for k, v in row_inputs.items():
                inputs[k][r, :n] = v
            valid[r, :n], targets[r, :n] = row_valid, row_targets
        out.append(Batch(inputs, valid, targets))
    return out


def scored_fraction(batches: list[Batch], scored: str = "targets") -> float:
    """Share of the computed positions (batch x padded length, summed over batches) that are scored targets
    (``scored="targets"``) or valid positions (``"valid"``, what statistics count)."""
    computed = sum(b.valid.numel() for b in batches)
    if scored == "targets":
        used = sum(b.n_scored for b in batches)
    else:
        used = sum(int(b.valid.sum()) for b in batches)
    return used / max(computed, 1)
