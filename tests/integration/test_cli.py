"""The CLI end to end on a tiny model saved to a local folder: sweep, resume, stats, errors."""

import json

import pytest

import tiny
from knockout.cli import main
from knockout.experiments import engine
from knockout.runfolder import RunFolder
from knockout.stats import Statistics


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("cli")
    model, corpus = tiny_llama
    return root, model, tiny.save(tiny.causal_lm("opt"), "causal", root / "other"), corpus


def _sweep_args(model, corpus, out, *extra):
    return [
        "-q",
        "sweep",
        "--model",
        model,
        "--data",
        corpus,
        "--methods",
        "zero,mean,peak",
        "--fractions",
        "0,0.5,1",
        "--seeds",
        "0,1",
        "--eval-tokens",
        "120",
        "--stats-tokens",
        "400",
        "--max-length",
        "40",
        "--batch-size",
        "4",
        "--out",
        str(out),
        *extra,
    ]


def test_sweep_writes_rows_config_stats_and_selection(setup, capsys):
    root, model, _, corpus = setup
    out = root / "run"
    assert main(_sweep_args(model, corpus, out)) == 0
    rows = RunFolder(out).row_dicts()
    assert len(rows) == 2 * (1 + 3 * 3)
    keys = {(r["method"], r["fraction"], r["seed"]) for r in rows}
    assert ("baseline", 0.0, 1) in keys and ("peak", 1.0, 0) in keys
    for r in rows:
        assert r["n_eval"] == 120
        assert r["n_neurons"] == 64
        assert r["n_ablated"] == {0.0: 0, 0.5: 32, 1.0: 64}[r["fraction"]]
        base = next(b for b in rows if b["method"] == "baseline" and b["seed"] == r["seed"])
        assert r["delta_top1"] == pytest.approx(r["top1"] - base["top1"])
        assert r["delta_ce"] == pytest.approx(r["ce"] - base["ce"])
    full = [r for r in rows if r["fraction"] == 1.0]
    assert len({round(r["ce"], 6) for r in full if r["method"] != "baseline"}) > 1  # methods differ
    config = json.loads((out / "config.json").read_text())
    assert config["eval_tokens"] == 120 and config["resolved"]["task"] == "causal"
    assert config["resolved"]["model_identity"]["widths"] == [32, 32]
    stats = Statistics.load(out / "stats.safetensors")
    assert stats.n_tokens == 400 and json.loads(stats.meta["model"])["name"] == model
    assert (out / "selection.safetensors").is_file() and (out / "results.csv").is_file()
    assert "peak" in capsys.readouterr().out


def test_rerun_resumes_without_recomputing(setup, monkeypatch):
    root, model, _, corpus = setup
    out = root / "resume"
    assert main(_sweep_args(model, corpus, out)) == 0
    first = {(r["method"], r["fraction"], r["seed"]): r for r in RunFolder(out).row_dicts()}

    calls = []
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(_sweep_args(model, corpus, out)) == 0
    assert calls == []  # everything was done

    # drop some rows as if the run had been interrupted, then resume: only those are recomputed, identically
    lines = (out / "results.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if not (json.loads(ln)["seed"] == 1 and json.loads(ln)["method"] in ("mean", "peak"))]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    assert main(_sweep_args(model, corpus, out)) == 0
    assert len(calls) == 4  # mean and peak at 0.5 and 1.0 of seed 1 (fraction 0 reuses the baseline)
    again = {(r["method"], r["fraction"], r["seed"]): r for r in RunFolder(out).row_dicts()}
    assert again.keys() == first.keys()
    for key, row in first.items():
        assert again[key]["top1"] == row["top1"] and again[key]["ce"] == pytest.approx(row["ce"], abs=1e-9)

    # adding a method or a seed extends the run
    assert main(_sweep_args(model, corpus, out, "--seeds", "0,1,2")) == 0
    assert len(RunFolder(out).row_dicts()) == 3 * (1 + 3 * 3)


def test_changed_settings_refuse_to_mix_into_an_old_run(setup, capsys):
    root, model, _, corpus = setup
    out = root / "mix"
    assert main(_sweep_args(model, corpus, out, "--seeds", "0", "--fractions", "0,1")) == 0
    before = (out / "results.jsonl").read_text()
    assert main(_sweep_args(model, corpus, out, "--seeds", "0", "--eval-tokens", "100")) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "eval_tokens" in err
    assert (out / "results.jsonl").read_text() == before


def test_stats_command_and_reuse(setup, capsys):
    root, model, other, corpus = setup
    path = root / "s.safetensors"
    assert main(tiny.stats_cmd(model, corpus, 300, path)) == 0
    assert Statistics.load(path).n_tokens == 300
    # a --max-length beyond the model's positions (64 here) is refused, as by the sweep, and nothing is written
    too_long = root / "too-long.safetensors"
    cmd = ["-q", "stats", "--model", model, "--data", corpus, "--stats-tokens", "300", "--out", str(too_long)]
    assert main(cmd) == 2 and not too_long.exists()
    assert "exceeds the model's 64 positions" in capsys.readouterr().err
    out = root / "reuse"
    # collected on 300 tokens, the sweep asks for 400: refused unless --stats-any-data (see test_integrity.py)
    assert main(_sweep_args(model, corpus, out, "--seeds", "0", "--stats", str(path), "--stats-any-data")) == 0
    assert Statistics.load(out / "stats.safetensors").n_tokens == 300  # reused, not recollected (400)
    # statistics of another model are refused with a clear message
    assert main(_sweep_args(other, corpus, root / "wrong", "--seeds", "0", "--stats", str(path))) == 2
    assert "different model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fractions", "0,1.5"], "between 0 and 1"),
        (["--eps", "0"], "eps must be a positive"),
        (["--methods", "zero,bogus"], "unknown ablation method"),
        (["--eval-tokens", "100000"], "gave only"),
    ],
)
def test_bad_input_gives_one_clear_error_and_writes_nothing(setup, capsys, args, message):
    root, model, _, corpus = setup
    out = root / f"bad{abs(hash(tuple(args)))}"
    assert main(_sweep_args(model, corpus, out, *args)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_and_data_paths(setup, capsys):
    root, model, _, corpus = setup
    assert main(_sweep_args(str(root / "nope"), corpus, root / "x")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_sweep_args(model, str(root / "none.txt"), root / "y")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sites_and_methods_commands(setup, capsys):
    _, model, _, _ = setup
    assert main(["sites", "--model", model]) == 0
    assert "model.layers.1.self_attn.o_proj" in capsys.readouterr().out
    assert main(["methods"]) == 0
    assert "peak" in capsys.readouterr().out


def test_resampling_flags_reach_the_config(setup):
    root, model, _, corpus = setup
    out = root / "rs"
    args = _sweep_args(
        model,
        corpus,
        out,
        "--seeds",
        "0",
        "--fractions",
        "0,1",
        "--methods",
        "resample-tokens",
        "--resample-fixed",
        "--resample-prompt",
        "Once",
    )
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["resample"] == {"model": None, "prompt": "Once", "fixed": True, "cache": True}
    rows = {r["method"]: r for r in RunFolder(out).row_dicts() if r["fraction"] == 1.0}
    assert (
        rows["resample-tokens"]["ce"] != next(r for r in RunFolder(out).row_dicts() if r["method"] == "baseline")["ce"]
    )


def test_more_bad_input_is_refused_before_anything_is_written(setup, tmp_path, capsys):
    root, model, _, corpus = setup
    gpt2 = tiny.save(tiny.causal_lm("gpt2"), "causal", tmp_path / "gpt2")  # 64 learned positions
    cases = [
        ((gpt2, "--max-length", "200"), "exceeds the model's 64 positions"),
        ((model, "--methods", "resample-text", "--resample-model", str(tmp_path / "no-such-model")), "does not exist"),
        ((model, "--n-heads", "0"), "--n-heads must be a positive"),
        ((model, "--data", str(tmp_path)), "is a folder"),
    ]
    for i, ((m, *extra), message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(_sweep_args(m, corpus, out, *extra)) == 2, message  # a repeated flag: the last one wins
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_changing_batch_size_is_refused_on_resume_but_cache_option_is_not(setup, capsys):
    root, model, _, corpus = setup
    out = root / "bs"
    args = _sweep_args(model, corpus, out, "--seeds", "0", "--fractions", "0,1", "--methods", "resample-tokens")
    assert main(args) == 0
    assert main([*args, "--no-resample-cache"]) == 0  # speed only: resumes
    assert main([*args, "--batch-size", "3"]) == 2
    assert "batch_size" in capsys.readouterr().err


def test_damaged_results_give_a_clear_error(setup, capsys):
    root, model, _, corpus = setup
    out = root / "damaged"
    args = _sweep_args(model, corpus, out, "--seeds", "0", "--fractions", "0,1", "--methods", "zero")
    assert main(args) == 0
    with open(out / "results.jsonl", "a") as f:
        f.write('{"method": "zero", "fract')
    assert main(args) == 2
    assert "results.jsonl:4 is not valid JSON" in capsys.readouterr().err
    assert main(["report", str(out)]) == 2
    (out / "results.jsonl").write_text('{"method": "zero"}\n')
    assert main(["report", str(out)]) == 2
    assert "lacks" in capsys.readouterr().err


def test_masked_lm_all_methods_leave_out_resample_text_without_a_generator(tmp_path):
    model = tiny.save(tiny.masked_lm("roberta"), "masked", tmp_path / "roberta")
    corpus = tiny.write_corpus(tmp_path / "c.txt", n_docs=60)
    out = tmp_path / "run"
    args = [
        "-q",
        "sweep",
        "--model",
        model,
        "--data",
        corpus,
        "--fractions",
        "0,1",
        "--seeds",
        "0",
        "--eval-tokens",
        "40",
        "--stats-tokens",
        "300",
        "--max-length",
        "40",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    methods = {r["method"] for r in RunFolder(out).row_dicts()}
    assert methods == {"baseline", "zero", "mean", "peak", "resample-chars", "resample-tokens"}


def test_seed_independent_evaluation_inputs_are_built_once(setup, monkeypatch):
    root, model, _, corpus = setup
    calls = []
    real = engine.eval_batches
    monkeypatch.setattr(engine, "eval_batches", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    out = root / "once"
    assert main(_sweep_args(model, corpus, out, "--seeds", "0,1,2", "--fractions", "0,1", "--methods", "zero")) == 0
    assert calls == [0]  # causal: the same batches for every seed
    assert len({r["n_eval"] for r in RunFolder(out).row_dicts()}) == 1


def test_method_fractions_run_a_method_at_fewer_fractions(setup, capsys):
    """--method-fractions: a method runs only at its own fractions, on the same nested neuron sets (its rows equal
    those of a full run), the report counts the run complete, and a fraction outside --fractions is refused."""
    root, model, _, corpus = setup
    out = root / "per-method"
    assert main(_sweep_args(model, corpus, out, "--method-fractions", "mean=0.5;peak=0,1")) == 0
    rows = RunFolder(out).row_dicts()
    keys = {(r["method"], r["fraction"], r["seed"]) for r in rows}
    per_seed = {("zero", f) for f in (0.0, 0.5, 1.0)} | {("mean", 0.5), ("peak", 0.0), ("peak", 1.0), ("baseline", 0.0)}
    assert keys == {(m, f, s) for m, f in per_seed for s in (0, 1)}
    if not (root / "run" / "results.jsonl").is_file():  # the full run of the first test, when run alone
        assert main(_sweep_args(model, corpus, root / "run")) == 0
    full = {(r["method"], r["fraction"], r["seed"]): r for r in RunFolder(root / "run").row_dicts()}
    for r in rows:
        assert r["ce"] == pytest.approx(full[(r["method"], r["fraction"], r["seed"])]["ce"], abs=1e-9)
    assert RunFolder.with_results(out).missing() == [] and RunFolder.with_results(out).n_expected == len(rows)
    assert main(["report", str(out)]) == 0
    assert "PARTIAL" not in (out / "report" / "report.md").read_text()
    capsys.readouterr()
    assert main(_sweep_args(model, corpus, root / "bad", "--method-fractions", "mean=0.3")) == 2
    assert "not among the fractions" in capsys.readouterr().err
    assert main(_sweep_args(model, corpus, root / "bad", "--method-fractions", "optimal=0.5")) == 2
    assert "not among the methods" in capsys.readouterr().err
    assert not (root / "bad").exists()
