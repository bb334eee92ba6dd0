"""Presets: the paper's settings, their CLI, overrides, and a clear offline failure."""

import json
import os
import time

import pytest

import tiny
from knockout.ablation.methods import methods_for
from knockout.cli import _config, build_parser, main
from knockout.config import DEFAULT_FRACTIONS
from knockout.errors import KnockoutError
from knockout.experiments.presets import PRESETS, resolve_preset
from knockout.runfolder import RunFolder

PAPER = {
    "opt-1.3b": ("facebook/opt-1.3b", "monology/pile-uncopyrighted", "causal", 100_000),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", "monology/pile-uncopyrighted", "causal", 100_000),
    "roberta-large": ("FacebookAI/roberta-large", "monology/pile-uncopyrighted", "masked", 100_000),
    "vit-base": ("google/vit-base-patch16-224", "ILSVRC/imagenet-1k", "image", 1000),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_preset_has_the_papers_settings(name):
    model, data, task, n_eval = PAPER[name]
    cfg = resolve_preset(name)
    assert (cfg.model, cfg.data, cfg.task, cfg.eval_tokens) == (model, data, task, n_eval)
    assert cfg.fractions == tuple(round(0.1 * i, 10) for i in range(11)) == DEFAULT_FRACTIONS
    assert len(cfg.fractions) == 11
    assert cfg.seeds == (0, 1, 2)
    assert cfg.selection == "per-layer"
    assert cfg.methods == tuple(methods_for(task, cfg.resample))
    # every resampling family of the paper's Table 2 for this model (RoBERTa's RS3 text comes from resample_model)
    expected_rs = {
        "causal": {"resample-chars", "resample-tokens", "resample-text"},
        "masked": {"resample-chars", "resample-tokens", "resample-text"},
        "image": {"resample-pixels"},
    }
    assert expected_rs[task] <= set(cfg.methods)
    assert {"zero", "mean", "peak"} <= set(cfg.methods)
    resampling = {"resample-pixels"} if task == "image" else {"resample-chars", "resample-tokens", "resample-text"}
    registered = {m for m in resampling if m in methods_for(task)}
    assert registered <= set(cfg.methods)
    assert cfg.out == f"runs/{name}"
    # The paper's RS3 text is written by OPT for its text models: the RoBERTa and Mistral presets name OPT-1.3B
    # (a masked LM cannot write text at all); OPT-1.3B writes its own.
    opt_writes = name in ("roberta-large", "mistral-7b")
    assert cfg.resample.model == ("facebook/opt-1.3b" if opt_writes else None)
    assert cfg.preset == name


def test_presets_are_exactly_the_four_settings():
    assert set(PRESETS) == set(PAPER)


def test_overrides_and_unknown_names():
    cfg = resolve_preset("opt-1.3b", eval_tokens=10, seeds=(5,), out="x")
    assert (cfg.eval_tokens, cfg.seeds, cfg.out, cfg.model) == (10, (5,), "x", "facebook/opt-1.3b")
    with pytest.raises(KnockoutError, match="unknown preset 'gpt-5'"):
        resolve_preset("gpt-5")
    with pytest.raises(KnockoutError, match="unknown setting"):
        resolve_preset("opt-1.3b", colour="red")


def test_cli_flags_override_only_when_given():
    args = build_parser().parse_args(["sweep", "--preset", "vit-base", "--eval-tokens", "7", "--seeds", "4,5"])
    cfg = _config(args)
    assert (cfg.eval_tokens, cfg.seeds) == (7, (4, 5))
    assert (cfg.model, cfg.data, cfg.stats_tokens, cfg.out) == (
        "google/vit-base-patch16-224",
        "ILSVRC/imagenet-1k",
        197_000,
        "runs/vit-base",
    )
    args = build_parser().parse_args(["sweep", "--preset", "vit-base", "--image-size", "64", "--image-mean", "0.4"])
    assert _config(args).image.to_dict() == {"size": 64, "mean": (0.4, 0.4, 0.4), "std": (0.5, 0.5, 0.5)}
    args = build_parser().parse_args(["sweep", "--preset", "roberta-large", "--methods", "zero,peak"])
    assert _config(args).methods == ("zero", "peak")
    assert _config(args).resample.model == "facebook/opt-1.3b"


def test_presets_command_prints_resolved_configs(capsys):
    assert main(["presets"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == set(PAPER)
    for name, cfg in printed.items():
        assert cfg == json.loads(
            json.dumps({"description": PRESETS[name].description, **resolve_preset(name).to_dict()})
        )
    assert main(["presets", "vit-base"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["vit-base"]
    assert main(["presets", "nope"]) == 2


@pytest.mark.parametrize("name", ["opt-1.3b", "vit-base"])
def test_running_a_preset_offline_fails_clearly(name, tmp_path, capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(["-q", "sweep", "--preset", name, "--out", str(out)]) == 2
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("knockout: error: preset")
    assert "Traceback" not in err
    assert "HF_HUB_OFFLINE" in err
    assert PAPER[name][0] in err
    assert not out.exists()


def test_sweep_needs_a_model_or_a_preset(capsys):
    assert main(["sweep"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_preset_with_local_overrides_runs(tmp_path):
    """The roberta-large preset, pointed at a tiny local RoBERTa and a local corpus, runs end to end offline."""
    folder = tiny.save(tiny.masked_lm("roberta"), "masked", tmp_path / "model")
    corpus = tiny.write_corpus(tmp_path / "corpus.txt", n_docs=40)
    out = tmp_path / "run"
    argv = ["-q", "sweep", "--preset", "roberta-large", "--model", folder, "--data", corpus, "--out", str(out)]
    argv += ["--eval-tokens", "20", "--stats-tokens", "200", "--max-length", "64", "--fractions", "0,1"]
    argv += ["--seeds", "0", "--methods", "zero,mean"]
    assert main(argv) == 0
    rows = RunFolder(out).row_dicts()
    assert {(r["method"], r["fraction"]) for r in rows} == {
        ("baseline", 0.0),
        *((m, f) for m in ("zero", "mean") for f in (0.0, 1.0)),
    }
    saved = json.loads((out / "config.json").read_text())
    assert saved["task"] == "masked" and saved["seeds"] == [0]


def test_demo_preset_runs_the_answer_methods_at_the_papers_two_fractions(tmp_path):
    """The demo: zero, mean, peak at 7 fractions, optimal at 0.5 and 0.9; overriding the methods or fractions keeps
    the per-method fractions consistent with them (or drops them)."""
    import json

    from knockout.runfolder import RunFolder

    cfg = resolve_preset("demo")
    assert cfg.fractions_of("zero") == cfg.fractions == (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    assert cfg.fractions_of("optimal") == (0.5, 0.9)
    assert cfg.stats_skip_first == 1 and cfg.sort_by_length
    assert cfg.seeds == "auto" and cfg.decide.fractions == (0.5, 0.9) and cfg.eval_docs == 12
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    run = RunFolder(tmp_path)
    assert run.n_expected == 3 * (1 + 3 * 7 + 2)  # the first look's sets: a baseline per seed
    only = resolve_preset("demo", methods=("zero", "optimal"))
    assert only.method_fractions == {"optimal": [0.5, 0.9]}
    assert resolve_preset("demo", methods=("all",)).method_fractions == {}  # optimal is not in 'all'
    fewer = resolve_preset("demo", fractions=(0.0, 0.5, 1.0))
    assert fewer.fractions_of("optimal") == (0.5,) and fewer.fractions_of("peak") == (0.0, 0.5, 1.0)
    assert fewer.decide.fractions == (0.5,) and fewer.seeds == "auto"  # decided where the sweep runs
    ends = resolve_preset("demo", fractions=(0.0, 1.0))
    assert ends.fractions_of("optimal") == (0.0, 1.0) and ends.seeds == (0, 1, 2)  # nothing to decide: fixed sets
    assert resolve_preset("demo", fractions=(0.0, 1.0), seeds=(4,)).seeds == (4,)
