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
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the weights, and the config + tokenizer
    want = direct.model.state_dict()
    for m in (first, cached):
        got = m.model.state_dict()
        assert got.keys() == want.keys()
        assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    text = "The quick brown fox, naïve café 12345\n\n  spaces <|im_end|> 🙂"
    ids = direct.processor(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, cached.processor(text, return_tensors="pt")["input_ids"])
    assert (cached.processor.pad_token_id, cached.processor.eos_token_id) == (
        direct.processor.pad_token_id,
        direct.processor.eos_token_id,
    )
    with torch.inference_mode():
        assert torch.equal(direct.model(input_ids=ids).logits, cached.model(input_ids=ids).logits)
