"""The GGUF conversion cache: converted once, later loads read the saved copy, bit-identical weights.

No tiny GGUF file is at hand, so the GGUF loader is replaced by a fake class whose ``from_pretrained(...,
gguf_file=...)`` builds the tiny model (and counts calls); loading a folder goes to the real transformers class. The
slow test in tests/integration/test_real_model.py checks the real SmolLM2 GGUF.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers as tf

import tiny
from knockout import loading


class FakeGGUF:
    """Stands for AutoModelForCausalLM: a GGUF load builds the tiny Llama, a folder load is the real one."""

    conversions = 0
    weights = None  # folder of the tiny model that a "GGUF load" returns

    @classmethod
    def from_pretrained(cls, source, gguf_file=None, **kwargs):
        if gguf_file is None:
            return tf.AutoModelForCausalLM.from_pretrained(source, **kwargs)
        cls.conversions += 1
        return tf.AutoModelForCausalLM.from_pretrained(cls.weights, **kwargs)


NAME = FakeGGUF.__name__
CONFIG = tiny.causal_lm("llama").config


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "GGUF_CACHE", tmp_path / "cache")
    FakeGGUF.conversions = 0
    FakeGGUF.weights = tmp_path / "weights"
    tiny.causal_lm("llama").save_pretrained(FakeGGUF.weights)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF fake")
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_once_then_loaded_bit_identically(gguf, dtype):
    first = loading.load_gguf_cached(FakeGGUF, gguf, dtype, CONFIG)
    again = loading.load_gguf_cached(FakeGGUF, gguf, dtype, CONFIG)
    assert FakeGGUF.conversions == 1
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ids = torch.randint(5, tiny.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(first(input_ids=ids).logits, again(input_ids=ids).logits)
    assert [p.name for p in loading.GGUF_CACHE.iterdir()] == [loading.gguf_cache_folder(gguf, NAME,
                                                                                          dtype).name]  # fmt: skip


def test_a_changed_file_or_dtype_gets_a_new_conversion(gguf):
    folder = loading.gguf_cache_folder(gguf, NAME, torch.float32)
    assert folder == loading.gguf_cache_folder(gguf, NAME, torch.float32)
    assert folder != loading.gguf_cache_folder(gguf, NAME, torch.bfloat16)
    assert folder != loading.gguf_cache_folder(gguf, "AutoModelForMaskedLM", torch.float32)
    loading.load_gguf_cached(FakeGGUF, gguf, torch.float32, CONFIG)
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was replaced
    assert loading.gguf_cache_folder(gguf, NAME, torch.float32) != folder
    loading.load_gguf_cached(FakeGGUF, gguf, torch.float32, CONFIG)
    assert FakeGGUF.conversions == 2


def test_an_unwritable_cache_only_costs_the_speed_up(gguf, monkeypatch):
    def refuse(net, config, folder):
        raise OSError("read-only file system")

    monkeypatch.setattr(loading, "_save_converted", refuse)
    net = loading.load_gguf_cached(FakeGGUF, gguf, torch.float32, CONFIG)
    assert isinstance(net, torch.nn.Module) and not any(loading.GGUF_CACHE.glob("*/*"))
