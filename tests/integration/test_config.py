"""Configuration: typed option groups validated before anything loads, config files (JSON/TOML/YAML) with flags on
top, config.json round trips, and the command line's global flags."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import knockout.loading
from knockout.cli import _config, build_parser, main
from knockout.config import SweepConfig
from knockout.errors import KnockoutError
from knockout.experiments import engine, prepare
from knockout.runfolder import RESULTS_CSV, ResultStore, RunFolder
from knockout.version import __version__

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    return tmp_path_factory.mktemp("config"), *tiny_llama


def _args(model, corpus, out, *extra):
    return [
        "sweep", "--model", model, "--data", corpus, "--methods", "zero,peak", "--fractions", "0,1", "--seeds", "0",
        "--eval-tokens", "40", "--stats-tokens", "100", "--max-length", "20", "--batch-size", "4", "--out", str(out),
        *extra,
    ]  # fmt: skip


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded although the settings could be checked without it")

    for module in (knockout.loading, prepare, engine):
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture(autouse=True)
def _no_report(monkeypatch):
    monkeypatch.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--optimal-lr", "-1"), "optimal.lr (--optimal-lr) must be a positive number"),
        (("--optimal-steps", "-3"), "optimal.steps (--optimal-steps) must be a non-negative integer"),
        (("--optimal-batch-size", "0"), "optimal.batch_size (--optimal-batch-size) must be an integer >= 1"),
        (("--resample-prompt", ""), "resample.prompt (--resample-prompt) must be a non-empty string"),
        (("--image-std", "0"), "image.std (--image-std) must be positive"),
        (("--image-mean", "1,2"), "image.mean needs 1 or 3 numbers"),
    ],
)
def test_a_bad_method_option_is_refused_before_the_model_loads(setup, no_model, tmp_path, capsys, flags, message):
    _, model, corpus = setup
    out = tmp_path / "run"
    assert main(["-q", *_args(model, corpus, out, "--methods", "optimal,resample-tokens", *flags)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_option_groups_from_python_are_typed_and_validated():
    cfg = SweepConfig(model="m", optimal={"steps": 5}, resample={"fixed": True}, image={"mean": [0.1, 0.2, 0.3]})
    assert (cfg.optimal.steps, cfg.optimal.lr, cfg.resample.fixed, cfg.image.mean) == (5, 0.06, True, (0.1, 0.2, 0.3))
    with pytest.raises(KnockoutError, match="unknown optimal option"):
        SweepConfig(model="m", optimal={"step": 5})
    with pytest.raises(KnockoutError, match="resample.fixed .* must be true or false"):
        SweepConfig(model="m", resample={"fixed": "yes"})
    with pytest.raises(KnockoutError, match="unknown setting"):
        SweepConfig.from_dict({"model": "m", "colour": "red"})


def test_a_runs_config_json_round_trips(setup, tmp_path, capsys):
    """A run's config.json is a config file: it reads back to the same config, and `--config` resumes the run."""
    _, model, corpus = setup
    out = tmp_path / "run"
    assert main(["-q", *_args(model, corpus, out, "--optimal-steps", "3", "--no-sort-by-length")]) == 0
    stored = json.loads((out / "config.json").read_text())
    cfg = SweepConfig.from_file(out / "config.json")
    assert json.loads(json.dumps(cfg.to_dict())) == {k: v for k, v in stored.items() if k != "resolved"}
    assert cfg.optimal.steps == 3 and cfg.sort_by_length is False
    rows = (out / "results.jsonl").read_text()
    assert main(["-q", "sweep", "--config", str(out / "config.json")]) == 0  # the same run: resumes, nothing new
    assert (out / "results.jsonl").read_text() == rows
    # flags override the file: one more seed extends the run
    assert main(["-q", "sweep", "--config", str(out / "config.json"), "--seeds", "0,1"]) == 0
    assert {r["seed"] for r in RunFolder(out).row_dicts()} == {0, 1}
    # a flag that changes results is refused in that folder, as for any resume
    assert main(["-q", "sweep", "--config", str(out / "config.json"), "--eval-tokens", "30"]) == 2
    assert "eval_tokens" in capsys.readouterr().err


def test_toml_and_yaml_config_files_with_flags_on_top(tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text('model = "m"\nseeds = [4, 5]\nsort_by_length = true\n\n[optimal]\nsteps = 7\nlr = 0.1\n')
    yaml = tmp_path / "sweep.yaml"
    yaml.write_text("model: m\nseeds: [4, 5]\nsort_by_length: true\noptimal:\n  steps: 7\n  lr: 0.1\n")
    for path in (toml, yaml):
        args = build_parser().parse_args(["sweep", "--config", str(path), "--optimal-steps", "9"])
        cfg = _config(args)
        assert (cfg.model, cfg.seeds, cfg.sort_by_length) == ("m", (4, 5), True)
        assert (cfg.optimal.steps, cfg.optimal.lr) == (9, 0.1)  # the flag replaces one setting of the group
    bad = tmp_path / "bad.toml"
    bad.write_text("model = \n")
    with pytest.raises(KnockoutError, match="cannot be read"):
        _config(build_parser().parse_args(["sweep", "--config", str(bad)]))
    with pytest.raises(KnockoutError, match="does not exist"):
        _config(build_parser().parse_args(["sweep", "--config", str(tmp_path / "none.json")]))
    (tmp_path / "sweep.ini").write_text("model = m\n")
    with pytest.raises(KnockoutError, match="should end in .json, .toml, .yaml or .yml"):
        _config(build_parser().parse_args(["sweep", "--config", str(tmp_path / "sweep.ini")]))


def test_a_preset_is_a_name_a_description_and_its_overrides():
    from knockout.ablation.options import OptimalOptions
    from knockout.experiments.presets import DEMO, resolve_preset

    cfg = resolve_preset("demo", optimal={"steps": 3}, resample={"prompt": "A"})
    assert cfg.optimal.steps == 3 and cfg.optimal.lr == OptimalOptions().lr and cfg.resample.prompt == "A"
    assert resolve_preset("demo", optimal={"steps": 3}, decide={"max_sets": 6}).decide.max_sets == 6
    assert cfg.preset == "demo" and cfg.out == "runs/demo"
    assert set(DEMO.__dataclass_fields__) == {"name", "description", "overrides"}


def test_quiet_and_verbose_go_before_or_after_the_command_and_version(capsys):
    for argv in (["-q", "methods"], ["methods", "-q"], ["methods", "--quiet", "-v"]):
        args = build_parser().parse_args(argv)
        assert args.quiet is True
    assert build_parser().parse_args(["methods"]).quiet is False
    assert build_parser().parse_args(["methods", "-v"]).verbose is True
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"knockout {__version__}"


def test_python_dash_m_knockout_runs_the_cli():
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "knockout", "--version"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == f"knockout {__version__}"


def test_a_read_only_store_writes_nothing(setup, tmp_path):
    _, model, corpus = setup
    out = tmp_path / "run"
    assert main(["-q", *_args(model, corpus, out)]) == 0
    (out / RESULTS_CSV).unlink()  # as a crash between the two files would leave it
    ResultStore(out, read_only=True)
    assert not (out / RESULTS_CSV).exists()
    ResultStore(out)  # the writer repairs it
    assert (out / RESULTS_CSV).is_file()
