"""Per-document sums of the evaluation (for paired comparisons): they add up to the scalar metrics, which they do
not change."""

import numpy as np
import pytest
import torch

from knockout.data.batch import IGNORE
from knockout.evaluation import Metrics
from knockout.runfolder import RunFolder, save_doc_sums


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for rows in (3, 2):
        logits = torch.randn(rows, 7, 11, generator=g)
        targets = torch.randint(0, 11, (rows, 7), generator=g)
        targets[torch.rand(rows, 7, generator=g) < 0.4] = IGNORE
        targets[0] = IGNORE  # a document with nothing scored
        out.append((logits, targets))
    return out


def test_per_doc_sums_add_up_and_leave_scalars_bit_identical():
    plain, docs = Metrics(), Metrics(per_doc=True)
    for logits, targets in _batches():
        plain.add(logits, targets)
        docs.add(logits, targets)
    assert (plain.n, plain.n_correct, plain.ce_sum) == (docs.n, docs.n_correct, docs.ce_sum)
    d = docs.doc_sums()
    assert len(d["n"]) == 5 and d["n"][0] == 0 and d["n"][3] == 0
    assert int(d["n"].sum()) == docs.n and int(d["correct"].sum()) == docs.n_correct
    assert d["ce_sum"].sum() == pytest.approx(docs.ce_sum, rel=1e-6)
    # independent: per row, by hand
    row = 0
    for logits, targets in _batches():
        for b in range(logits.shape[0]):
            keep = targets[b] != IGNORE
            lp = torch.log_softmax(logits[b][keep].double(), -1)
            ce = -lp.gather(-1, targets[b][keep, None]).sum()
            assert d["ce_sum"][row] == pytest.approx(float(ce), rel=1e-5, abs=1e-6)
            assert d["correct"][row] == int((logits[b][keep].argmax(-1) == targets[b][keep]).sum())
            row += 1


def test_images_are_one_document_each():
    m = Metrics(per_doc=True)
    m.add(torch.randn(4, 3), torch.tensor([0, 2, 1, 1]))
    d = m.doc_sums()
    assert d["n"].tolist() == [1, 1, 1, 1] and d["ce_sum"].sum() == pytest.approx(m.ce_sum, rel=1e-6)


def test_doc_sums_round_trip_through_the_run_folder(tmp_path):
    a = {"n": np.array([3, 0, 2]), "ce_sum": np.array([1.5, 0.0, 2.25]), "correct": np.array([1, 0, 2])}
    save_doc_sums(tmp_path, "mean", 0.5, 1, a)
    save_doc_sums(tmp_path, "resample-chars", 0.9, 1, a)
    save_doc_sums(tmp_path, "baseline", 0.0, 0, a)
    b = {k: v + 1 for k, v in a.items()}
    save_doc_sums(tmp_path, "peak@0.05", 0.5, 1, b, target="L1.H3")  # a named target's row, '@' in the method
    got = RunFolder(tmp_path).stored_sums
    assert set(got) == {
        ("mean", 0.5, 1, ""), ("resample-chars", 0.9, 1, ""), ("baseline", 0.0, 0, ""), ("peak@0.05", 0.5, 1, "L1.H3")
    }  # fmt: skip
    for field in ("n", "ce_sum", "correct"):
        assert np.array_equal(got[("mean", 0.5, 1, "")][field], a[field])
        assert np.array_equal(got[("peak@0.05", 0.5, 1, "L1.H3")][field], b[field])


def test_batch_doc_sums_rebuild_the_doc_sums_in_any_order_given():
    """What a data-parallel run gathers: the per-batch sums, appended to another Metrics in a chosen order."""
    m = Metrics(per_doc=True)
    for logits, targets in _batches():
        m.add(logits, targets)
    parts = m.batch_doc_sums()
    assert [len(p["n"]) for p in parts] == [3, 2]
    rebuilt = Metrics(per_doc=True)
    for p in parts:
        rebuilt.add_doc_sums(p)
    for field, want in m.doc_sums().items():
        got = rebuilt.doc_sums()[field]
        assert got.dtype == want.dtype and np.array_equal(got, want), field
    swapped = Metrics(per_doc=True)
    for p in parts[::-1]:
        swapped.add_doc_sums(p)
    assert swapped.doc_sums()["n"].tolist() == [*parts[1]["n"].tolist(), *parts[0]["n"].tolist()]
    assert rebuilt.n == 0  # the scalar sums are the caller's
    with pytest.raises(ValueError, match="per_doc"):
        Metrics().batch_doc_sums()
