"""``optimal`` on the real SmolLM2-135M: learned constants beat zero, mean and peak on the *evaluation* split (they
are learned on the collection split) at the paper's fractions, with optimal's default settings. Slow: run with
`make test-slow`."""

from pathlib import Path

import pytest
import torch

from knockout.config import SweepConfig
from knockout.experiments.runner import run_sweep
from knockout.loading import load_model
from knockout.reporting.answer import run_answer
from knockout.runfolder import RunFolder

pytestmark = pytest.mark.slow


def test_optimal_beats_zero_mean_peak_on_smollm2(tmp_path):
    loaded = load_model("smollm2-135m")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    # optimal with its defaults, as a user who just adds it to --methods
    cfg = SweepConfig(
        model="smollm2-135m", data="wiki", out=str(tmp_path / "run"), methods=("zero", "mean", "peak", "optimal"),
        fractions=(0.5, 0.9), seeds=(0,), eval_tokens=512, stats_tokens=2048, max_length=64, batch_size=4,
    )  # fmt: skip
    out = Path(run_sweep(cfg, progress=False, loaded=loaded))
    ce = {(r["method"], r["fraction"]): r["ce"] for r in RunFolder(out).row_dicts()}
    for f in (0.5, 0.9):
        assert ce[("optimal", f)] < min(ce[(m, f)] for m in ("zero", "mean", "peak")), (f, ce)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    answer = run_answer(out, (0.5, 0.9))
    assert all(set(a.excess) == {"zero", "mean", "peak"} for a in answer.fractions)
