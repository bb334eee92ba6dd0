"""Reproducible names: ``--revision`` of a hub model and ``--data-revision`` of a hub dataset reach
``from_pretrained`` / ``load_dataset``, and config.json records the commit they resolved to (also without
``--revision``). Offline, against a fake hub cache laid out as huggingface_hub lays it out
(``models--org--name/snapshots/<commit>/...`` and ``refs/<branch>``). Caches follow ``XDG_CACHE_HOME``."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import tiny
from knockout import caches, loading
from knockout.cli import main
from knockout.config import SweepConfig
from knockout.data.text import data_identity, load_texts
from knockout.errors import KnockoutError
from knockout.fingerprint import files_fingerprint, folder_files
from knockout.loading import load_model

MAIN, V2 = "a" * 40, "b" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache holding ``org/tiny`` at two commits: ``main`` -> MAIN, ``v2`` -> V2 (weights differ)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for commit, shift in ((MAIN, 0.0), (V2, 1.0)):
        model = tiny.causal_lm("gpt2")
        with torch.no_grad():
            model.lm_head.weight.add_(shift)  # tied to the embedding: the two commits differ
        tiny.save(model, "causal", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(V2)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import
    return repo


def _embedding(folder: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return next(v for k, v in load_file(str(folder / "model.safetensors")).items() if k.endswith("wte.weight"))


def test_load_model_loads_and_records_the_revision(hub):
    for revision, commit in ((None, MAIN), ("v2", V2), (V2, V2)):
        loaded = load_model("org/tiny", device="cpu", revision=revision)
        assert (loaded.revision, loaded.commit) == (revision, commit)
        want = _embedding(hub / "snapshots" / commit)
        assert torch.equal(loaded.model.transformer.wte.weight, want)
    with pytest.raises(KnockoutError, match="could not load the config of 'org/tiny'"):
        load_model("org/tiny", device="cpu", revision="v3")  # not in the cache, and offline


def test_config_json_records_the_model_commit(hub, tmp_path, capsys):
    corpus = tiny.write_corpus(tmp_path / "c.txt", n_docs=20)
    args = ["-q", "sweep", "--model", "org/tiny", "--data", corpus, "--methods", "zero", "--fractions", "1", "--seeds",
            "0", "--eval-tokens", "20", "--stats-tokens", "20", "--max-length", "16", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--revision", "v2", "--out", str(tmp_path / "v2")]) == 0
    config = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert config["revision"] == "v2"
    assert config["resolved"]["model_revision"] == {"requested": "v2", "commit": V2}
    assert SweepConfig.from_file(tmp_path / "v2" / "config.json").revision == "v2"  # round-trips
    v2_print = config["resolved"]["model_identity"]["fingerprint"]
    assert v2_print == files_fingerprint(folder_files(hub / "snapshots" / V2), V2)  # the files of v2, not of main

    assert main([*args, "--out", str(tmp_path / "main")]) == 0  # no --revision: the cache's main, recorded
    config = json.loads((tmp_path / "main" / "config.json").read_text())
    assert config["revision"] is None
    assert config["resolved"]["model_revision"] == {"requested": None, "commit": MAIN}
    assert config["resolved"]["model_identity"]["fingerprint"] == files_fingerprint(
        folder_files(hub / "snapshots" / MAIN), MAIN
    )

    # a resume at another revision is another run
    assert main([*args, "--revision", "v2", "--out", str(tmp_path / "main")]) == 2
    assert "revision: None -> 'v2'" in capsys.readouterr().err


def test_revision_of_a_local_model_is_refused(tmp_path, capsys):
    folder = tiny.save(tiny.causal_lm("gpt2"), "causal", tmp_path / "model")
    with pytest.raises(KnockoutError, match="applies to models from the Hugging Face Hub"):
        load_model(folder, device="cpu", revision="main")
    corpus = tiny.write_corpus(tmp_path / "c.txt", n_docs=20)
    code = main(["sweep", "--model", folder, "--data", corpus, "--revision", "main", "--out", str(tmp_path / "r")])
    assert code == 2 and "--revision 'main' applies to models from the Hugging Face Hub" in capsys.readouterr().err
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_data_revision_resolves_in_the_hub_cache_and_reaches_load_dataset(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    refs = cache / "datasets--org--texts" / "refs"
    refs.mkdir(parents=True)
    (refs / "v2").write_text(V2)
    (cache / "datasets--org--texts" / "snapshots" / V2).mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert data_identity("org/texts", "v2") == {"source": "org/texts", "revision": V2, "requested_revision": "v2"}
    assert data_identity("org/texts:en", V2)["revision"] == V2  # a commit, config name after ':'
    unknown = data_identity("org/texts", "v9")  # not in the cache: recorded as asked
    assert unknown == {"source": "org/texts", "revision": "v9", "requested_revision": "v9"}
    with pytest.raises(KnockoutError, match="applies to Hugging Face datasets"):
        data_identity(str(tiny.write_corpus(tmp_path / "c.txt")), "v2")
    with pytest.raises(KnockoutError, match="applies to Hugging Face datasets"):
        data_identity("wiki", "v2")

    import datasets

    calls = []

    def load_dataset(name, config=None, **kwargs):  # the hub, offline: record what knockout asks for
        calls.append((name, config, kwargs))
        return [{"text": f"document {i} of {name}"} for i in range(3)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert list(load_texts("org/texts", "eval", revision="v2"))[0] == "document 0 of org/texts"
    assert calls == [("org/texts", None, {"split": "test", "streaming": True, "revision": "v2"})]


def test_data_revision_flag_is_a_setting(tmp_path):
    cfg = SweepConfig(model="m", data="org/texts", data_revision="v2")
    assert cfg.data_spec().revision == "v2" and cfg.result_fields()["data_revision"] == "v2"
    with pytest.raises(KnockoutError, match="revision must be a branch, tag or commit"):
        SweepConfig(model="m", revision="  ")


def test_caches_follow_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "GGUF_CACHE", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.gguf_cache_root() == tmp_path / "xdg" / "knockout" / "gguf"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert loading.gguf_cache_folder(gguf, "X", None).parent == tmp_path / "xdg" / "knockout" / "gguf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert caches.knockout_cache_dir() == tmp_path / "home" / ".cache" / "knockout"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert caches.hub_cache_dir() == tmp_path / "hf" and caches.hub_commit("org/none") is None
