"""A model placed with ``device_map`` (accelerate), with one layer offloaded to disk, gives the results of the same
model loaded whole: statistics bit-exact, sweep rows equal (CE within 1e-6), weights untouched afterwards."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import tiny
from knockout import KnockoutError, collect_stats, find_sites
from knockout.config import SweepConfig
from knockout.devices import input_device, is_offloaded
from knockout.experiments.runner import run_sweep
from knockout.loading import load_model, parse_device_map
from knockout.runfolder import RunFolder

pytest.importorskip("accelerate")

DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_map")
    folder = tiny.save(tiny.causal_lm("llama"), "causal", root / "model")
    whole = load_model(folder, device="cpu")
    placed = load_model(folder, device="cpu", device_map=json.dumps(DEVICE_MAP), offload_folder=str(root / "off"))
    corpus = tiny.write_corpus(root / "corpus.txt", n_docs=40)
    return root, whole, placed, corpus


def test_placement_offloads_the_second_layer(models):
    _, _, placed, _ = models
    sites = find_sites(placed.model)
    assert [is_offloaded(s.module) for s in sites] == [False, True]
    assert placed.device == input_device(placed.model) == torch.device("cpu")


def test_sweep_on_an_offloaded_model_equals_the_whole_model(models, caplog):
    root, whole, placed, corpus = models
    weights = [placed.model.model.layers[0].self_attn.o_proj.weight.clone()]
    kwargs = dict(
        data=corpus, methods=("zero", "mean", "peak", "resample-tokens"), fractions=(0.5,), seeds=(0,),
        eval_tokens=60, stats_tokens=60, max_length=24, batch_size=3, device="cpu",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="knockout.hooks"):
        run_sweep(SweepConfig(model="tiny", out=str(root / "placed"), **kwargs), progress=False, loaded=placed)
    run_sweep(SweepConfig(model="tiny", out=str(root / "whole"), **kwargs), progress=False, loaded=whole)
    got = {(r["method"], r["fraction"]): r for r in RunFolder(root / "placed").row_dicts()}
    want = {(r["method"], r["fraction"]): r for r in RunFolder(root / "whole").row_dicts()}
    assert got.keys() == want.keys() and len(want) == 1 + 4
    for key, w in want.items():
        assert got[key]["n_eval"] == w["n_eval"] and got[key]["top1"] == pytest.approx(w["top1"], abs=1e-12), key
        assert got[key]["ce"] == pytest.approx(w["ce"], rel=1e-6), key
    assert "use a hook instead of a weight edit" in caplog.text or "offloaded" in caplog.text
    # the edited (not offloaded) layer was restored; the model still computes what the whole one does
    assert torch.equal(placed.model.model.layers[0].self_attn.o_proj.weight, weights[0])
    ids = torch.randint(5, tiny.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(placed.model(input_ids=ids).logits, whole.model(input_ids=ids).logits)


def test_statistics_of_an_offloaded_model_are_bit_identical(models):
    _, whole, placed, _ = models
    from knockout.data.text import causal_batches

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(5, tiny.VOCAB, (int(n),), generator=g).tolist() for n in (7, 12, 3, 9, 15)]
    batches = causal_batches(seqs, batch_size=2, pad=0)
    a = collect_stats(placed.model, find_sites(placed.model), batches, progress=False)
    b = collect_stats(whole.model, find_sites(whole.model), batches, progress=False)
    for x, y in zip(a.layers, b.layers):
        for name in ("hist", "min", "max", "mean", "m2", "under", "over"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_device_map_values_are_checked():
    assert parse_device_map(None) is None and parse_device_map("auto") == "auto"
    assert parse_device_map('{"lm_head": "cpu"}') == {"lm_head": "cpu"}
    for bad in ("everywhere", "{not json", "[1, 2]"):
        with pytest.raises(KnockoutError, match="device-map"):
            parse_device_map(bad)
    with pytest.raises(KnockoutError, match="device-map"):
        SweepConfig(model="x", device_map="everywhere")
