"""The GGUF conversion cache on the real SmolLM2-135M GGUF: the cached load equals the GGUF load bit for bit.
Slow: run with ``make test-slow``."""

from __future__ import annotations

import pytest
import torch

from knockout import loading

pytestmark = pytest.mark.slow


def test_cached_smollm2_equals_the_gguf_load(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "GGUF_CACHE", tmp_path / "cache")
    direct = loading.load_model("smollm2-135m", device="cpu", gguf_cache=False)
    first = loading.load_model("smollm2-135m", device="cpu")  # converts and caches
    cached = loading.load_model("smollm2-135m", device="cpu")  # reads the cache
    assert len(list((tmp_path / "cache").iterdir())) == 1
    want = direct.model.state_dict()
    for m in (first, cached):
        got = m.model.state_dict()
        assert got.keys() == want.keys()
        assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    ids = direct.processor("The quick brown fox", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, cached.processor("The quick brown fox", return_tensors="pt")["input_ids"])
    with torch.inference_mode():
        assert torch.equal(direct.model(input_ids=ids).logits, cached.model(input_ids=ids).logits)
