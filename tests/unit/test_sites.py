"""The site table, auto-detection, explicit module paths and their errors."""

import logging

import pytest

import tiny
from knockout import KnockoutError, find_sites
from knockout.sites import SITE_PATTERNS

EXPECTED_NAMES = {
    "gpt2": "transformer.h.{i}.attn.c_proj",
    "opt": "model.decoder.layers.{i}.self_attn.out_proj",
    "llama": "model.layers.{i}.self_attn.o_proj",
    "mistral": "model.layers.{i}.self_attn.o_proj",
    "gemma3_text": "model.layers.{i}.self_attn.o_proj",
    "gpt_neox": "gpt_neox.layers.{i}.attention.dense",
    "qwen2": "model.layers.{i}.self_attn.o_proj",
}


@pytest.mark.parametrize("family", sorted(EXPECTED_NAMES))
def test_causal_families(family):
    sites = find_sites(tiny.causal_lm(family))
    assert [s.name for s in sites] == [EXPECTED_NAMES[family].format(i=i) for i in range(2)]
    # Grouped-query attention (llama, mistral, qwen2, gemma3 with 2 kv heads): the pre-out has all 4 query heads.
    assert all((s.n_heads, s.d_head, s.width) == (4, 8, 32) for s in sites)


def test_masked_and_vision_families():
    assert [s.name for s in find_sites(tiny.masked_lm("roberta"))] == [
        f"roberta.encoder.layer.{i}.attention.output.dense" for i in range(2)
    ]
    assert find_sites(tiny.masked_lm("bert"))[1].name == "bert.encoder.layer.1.attention.output.dense"
    assert [s.name for s in find_sites(tiny.vit_classifier())] == [f"vit.layers.{i}.attention.o_proj" for i in range(2)]


def test_required_families_are_in_the_table():
    for family in ("gpt2", "opt", "llama", "mistral", "gemma3_text", "gemma3", "gpt_neox", "bert", "roberta", "vit"):
        assert family in SITE_PATTERNS


def test_weight_view_is_out_by_in_for_linear_and_conv1d():
    gpt2 = find_sites(tiny.causal_lm("gpt2"))[0]
    llama = find_sites(tiny.causal_lm("llama"))[0]
    assert gpt2.weight().shape == (32, gpt2.width)  # Conv1D stores [in, out]; the view is [out, in]
    assert llama.weight().shape == (32, llama.width)
    assert gpt2.weight().data_ptr() == gpt2.module.weight.data_ptr()  # a view, not a copy


def test_unknown_type_is_auto_detected_when_one_pattern_matches(caplog):
    model = tiny.causal_lm("llama")
    model.config.model_type = "my-llama-fork"
    with caplog.at_level(logging.WARNING):
        sites = find_sites(model)
    assert [s.name for s in sites] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert "auto-detected" in caplog.text


def test_unknown_architecture_error_lists_types_and_option():
    model = tiny.causal_lm("llama")
    model.config.model_type = "mystery"
    for layer in model.model.layers:  # rename so that no known pattern matches
        layer.self_attn.add_module("proj_out", layer.self_attn.o_proj)
        del layer.self_attn.o_proj
    with pytest.raises(KnockoutError) as err:
        find_sites(model)
    assert "mystery" in str(err.value) and "--site-module" in str(err.value) and "llama" in str(err.value)
    sites = find_sites(model, site_module="model.layers.{i}.self_attn.proj_out")
    assert [s.layer for s in sites] == [0, 1] and sites[0].width == 32


def test_site_module_errors():
    model = tiny.causal_lm("opt")
    with pytest.raises(KnockoutError, match=r"\{i\}"):
        find_sites(model, site_module="model.decoder.layers.0.self_attn.out_proj")
    with pytest.raises(KnockoutError, match="no module matches"):
        find_sites(model, site_module="model.layers.{i}.attn.o")
    with pytest.raises(KnockoutError, match="not a multiple"):
        find_sites(model, n_heads=5)
