"""Inputs that others wrote (settings files, component set files, task files, tracking URIs), crafted or broken: each
ends in one line ``knockout: error: ...`` and exit status 2, before the model loads where it can be checked without
it, and nothing is written. Remote code is never turned on by a settings file."""

import json
import socket
from pathlib import Path

import pytest

import knockout.loading
import tiny
from knockout.cli import _config, build_parser, main
from knockout.config import SweepConfig
from knockout.data.reading import split_items
from knockout.errors import KnockoutError
from knockout.experiments import engine, prepare

DEEP = "[" * 200_000 + "]" * 200_000


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    return tmp_path_factory.mktemp("hostile"), *tiny_llama


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded although the input could be checked without it")

    for module in (knockout.loading, prepare, engine):
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture(autouse=True)
def _no_report(monkeypatch):
    monkeypatch.setattr("knockout.reporting.write_report", lambda out, *a, **k: Path(out) / "report")


def _refused(argv, capsys, *messages, out=None) -> str:
    """Run the CLI; it must exit 2 with one line naming every message, and write nothing into ``out``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("knockout: error: "), err
    assert "Traceback" not in err
    for message in messages:
        assert message in err, err
    if out is not None:
        assert not Path(out).exists() or not any(Path(out).iterdir())
    return err


def _sweep(model, data, out, *extra):
    return tiny.sweep_args(model, data, out, *extra)


# -- remote code ------------------------------------------------------------------------------------------------------
def test_a_settings_file_never_turns_on_remote_code(setup, tmp_path, capsys, no_model):
    _, model, corpus = setup
    out = tmp_path / "run"
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps({"model": model, "data": corpus, "trust_remote_code": True}))
    _refused(["-q", "sweep", "--config", str(shared), "--out", str(out)], capsys, "--trust-remote-code", out=out)
    for name, text in [("shared.yaml", "trust_remote_code: true\n"), ("shared.toml", "trust_remote_code = true\n")]:
        (tmp_path / name).write_text(f"model: {model}\n" if name.endswith("yaml") else f'model = "{model}"\n')
        with open(tmp_path / name, "a") as f:
            f.write(text)
        _refused(["-q", "sweep", "--config", str(tmp_path / name), "--out", str(out)], capsys, "--trust-remote-code")
    # a run folder's config.json as --config, a preset with a settings file, a scan and a statistics-only run
    run_config = tmp_path / "config.json"
    stored = SweepConfig(model=model, data=corpus, trust_remote_code=True).to_dict()
    run_config.write_text(json.dumps({**stored, "resolved": {"task": "causal"}}))
    _refused(["-q", "sweep", "--config", str(run_config), "--out", str(out)], capsys, "--trust-remote-code", out=out)
    _refused(["-q", "sweep", "--preset", "opt-1.3b", "--config", str(shared)], capsys, "--trust-remote-code")
    _refused(["-q", "scan", "--config", str(shared), "--out", str(out)], capsys, "--trust-remote-code", out=out)
    stats = tmp_path / "s.safetensors"
    _refused(["-q", "stats", "--config", str(shared), "--out", str(stats)], capsys, "--trust-remote-code")
    assert not stats.exists()
    # "yes", 1 and the like are refused too; false is what every config.json holds
    shared.write_text(json.dumps({"model": model, "trust_remote_code": "yes"}))
    _refused(["-q", "sweep", "--config", str(shared)], capsys, "--trust-remote-code")
    with pytest.raises(KnockoutError, match="--trust-remote-code"):
        SweepConfig.from_file(run_config)


def test_remote_code_comes_from_the_flag_or_the_python_argument_alone(setup, tmp_path):
    _, model, corpus = setup
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps({"model": model, "trust_remote_code": True}))
    args = build_parser().parse_args(["sweep", "--config", str(shared), "--trust-remote-code"])
    assert _config(args).trust_remote_code is True
    assert SweepConfig.from_file(shared, trust_remote_code=True).trust_remote_code is True
    assert SweepConfig(model=model, trust_remote_code=True).trust_remote_code is True
    shared.write_text(json.dumps({"model": model, "trust_remote_code": False}))
    assert _config(build_parser().parse_args(["sweep", "--config", str(shared)])).trust_remote_code is False
    args = build_parser().parse_args(["sweep", "--config", str(shared), "--trust-remote-code"])
    assert _config(args).trust_remote_code is True  # the flag decides, not the file


# -- sizes bounded before the work that grows with them ---------------------------------------------------------------
def test_a_set_file_nested_200000_deep_or_with_a_200kb_csv_field(setup, tmp_path, capsys, no_model):
    _, model, corpus = setup
    out = tmp_path / "run"
    deep = tmp_path / "sets.json"
    deep.write_text(DEEP)
    _refused(_sweep(model, corpus, out, "--ablate", str(deep)), capsys, "200000 levels deep", out=out)
    wide = tmp_path / "sets.csv"
    wide.write_text('name,components\nbig,"' + "L0," * 70_000 + 'L1"\n')
    _refused(_sweep(model, corpus, out, "--ablate", str(wide)), capsys, "is not readable CSV", out=out)


def test_a_layer_number_of_5000_digits_and_superscript_digits(setup, tmp_path, capsys, no_model):
    _, model, corpus = setup
    out = tmp_path / "run"
    _refused(_sweep(model, corpus, out, "--ablate", "L" + "7" * 5000), capsys, "5000 digits", out=out)
    _refused(_sweep(model, corpus, out, "--ablate", "L1.H²"), capsys, "cannot read component", out=out)
    _refused(_sweep(model, corpus, out, "--ablate", "L٣"), capsys, "cannot read component", out=out)
    scan = ["-q", "scan", "--model", model, "--data", corpus, "--out", str(out)]
    _refused([*scan, "--unit", "neurons:²"], capsys, "unknown scan unit", out=out)
    _refused([*scan, "--unit", "neurons:" + "1" * 5000], capsys, "unknown scan unit", out=out)


def test_numbers_on_the_command_line_are_ascii_digits(setup, tmp_path, capsys, no_model):
    _, model, corpus = setup
    out = tmp_path / "run"
    for flag, value in [("--eval-tokens", "٣٢"), ("--seeds", "0,١"), ("--fractions", "0,٠.5"), ("--eps", "٠.1")]:
        with pytest.raises(SystemExit) as stop:  # argparse's own message: usage, then the error
            main(_sweep(model, corpus, out, flag, value))
        assert stop.value.code == 2 and "digits 0-9" in capsys.readouterr().err
    _refused(_sweep(model, corpus, out, "--methods", "peak@١"), capsys, "method names are ASCII", out=out)


def _task_lines(n: int = 20) -> list[dict]:
    return [{"prompt": f"Question {i}: the answer is", "answer": f" {i % 7}"} for i in range(n)]


def _write_lines(path: Path, lines: list) -> str:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return str(path)


def test_a_task_line_nested_200000_deep(setup, tmp_path, capsys, no_model):
    _, model, _ = setup
    out = tmp_path / "run"
    lines = _task_lines()
    later = _write_lines(tmp_path / "later.jsonl", [*lines[:3], DEEP, *lines[3:]])
    _refused(_sweep(model, later, out), capsys, "later.jsonl:4 nests", "200000 levels deep", out=out)
    first = _write_lines(tmp_path / "first.jsonl", [DEEP, *lines])
    _refused(_sweep(model, first, out), capsys, "first.jsonl:1 nests", out=out)


def test_a_huge_prompt_in_the_evaluation_part_is_refused_before_it_is_tokenized(setup, tmp_path, capsys):
    _, model, _ = setup
    out = tmp_path / "run"
    lines = _task_lines(20)
    huge = split_items(list(range(len(lines))), "eval")[0]  # a prompt of the evaluation part
    lines[huge] = {"prompt": "word " * 400_000 + "the answer is", "answer": " 1"}  # 2 MB
    task = _write_lines(tmp_path / "task.jsonl", lines)
    args = ["-q", "sweep", "--model", model, "--data", task, "--methods", "zero", "--fractions", "0", "--seeds", "0",
            "--eval-tokens", "4", "--stats-tokens", "40", "--max-length", "40", "--out", str(out)]  # fmt: skip
    _refused(args, capsys, f"prompt {0}", "characters, more than --max-length 40 tokens can hold", out=out)


def test_a_jsonl_line_over_the_line_limit_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    import knockout.inputs
    from knockout.data.prompts import read_task_file

    monkeypatch.setattr(knockout.inputs, "MAX_LINE_CHARS", 1000)  # 16 Mi characters: a 100 MB prompt line
    lines = _task_lines()
    lines[5] = {"prompt": "x" * 2000, "answer": " a"}
    with pytest.raises(KnockoutError, match=r"task.jsonl:6 is 2,0\d\d characters long; a line is read up to 1,000"):
        read_task_file(_write_lines(tmp_path / "task.jsonl", lines))


def test_prompt_length_is_bounded_before_the_tokenizer_sees_it():
    from knockout.data import prompts as P

    seen = []
    tok = tiny.tokenizer()

    def spy(text, *a, **k):
        seen.append(len(text))
        return tok(text, *a, **k)

    items = [P.Prompt("a b c", answer=" d"), P.Prompt("x " * 1_000_000, answer=" y")]
    with pytest.raises(KnockoutError, match="prompt 1 .* has 2,000,002 characters, more than --max-length 32"):
        P.task_batches(spy, items, 4, 32, 0)
    assert seen and max(seen) < 100
    contrast = P.Prompt("p " * 5000, correct=" a", incorrect=" b")
    with pytest.raises(KnockoutError, match="10,002 characters"):
        P.check_length(contrast, 16)
    P.check_length(contrast, 128)  # 128 tokens of 128 characters: it may fit, so it is tokenized and counted


# -- tracking URIs, checked with the other settings -------------------------------------------------------------------
def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_mlflow_uris_are_checked_before_the_model_loads(setup, tmp_path, capsys, no_model):
    pytest.importorskip("mlflow")
    _, model, corpus = setup
    out = tmp_path / "run"
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for uri, message in [
        (str(afile), "is a file"),
        (afile.as_uri(), "is a file"),
        (f"file:{afile}/mlruns", "lies inside the file"),
        ("/proc/self/mlruns", "under /proc"),
        ("file:///proc/1/mlruns", "under /proc"),
        (f"http://127.0.0.1:{_dead_port()}", "cannot reach the MLflow server"),
    ]:
        _refused(_sweep(model, corpus, out, "--mlflow", uri), capsys, message, out=out)
    assert afile.read_text() == "keep"


# -- clear messages ---------------------------------------------------------------------------------------------------
def test_a_string_where_a_list_is_expected(setup, tmp_path, capsys, no_model):
    _, model, corpus = setup
    config = tmp_path / "sweep.toml"
    config.write_text(f'model = "{model}"\ndata = "{corpus}"\nfractions = "lots"\n')
    err = _refused(
        ["-q", "sweep", "--config", str(config)], capsys, "fractions (--fractions) must be a list of numbers"
    )
    assert "the string 'lots'" in err and "'l'" not in err
    for values, message in [
        ({"methods": "zero,peak"}, "methods (--methods) must be a list of names"),
        ({"seeds": "0,1"}, "seeds (--seeds) must be a list of integers or 'auto'"),
        ({"fractions": 0.5}, "must be a list of numbers"),
        ({"method_fractions": {"peak": "0.5"}}, "method_fractions (--method-fractions) must be an object"),
        ({"out": ["runs/x"]}, "out (--out) must be a string"),
        ({"decide": {"fractions": "lots"}}, "decide.fractions (--decide-fractions) must be a list of numbers"),
    ]:
        with pytest.raises(KnockoutError, match=message.replace("(", r"\(").replace(")", r"\)")):
            SweepConfig.from_dict({"model": model, **values})


def test_a_yaml_python_tag_is_one_line(tmp_path, capsys, no_model):
    config = tmp_path / "sweep.yaml"
    config.write_text('model: m\nout: !!python/object/apply:os.system ["touch pwned"]\n')
    _refused(["-q", "sweep", "--config", str(config)], capsys, "uses a YAML tag knockout does not read", "line 2")
    assert not (Path.cwd() / "pwned").exists()


def test_a_broken_first_line_of_a_task_file_says_it_is_not_json(setup, tmp_path, capsys, no_model):
    _, model, _ = setup
    task = _write_lines(tmp_path / "task.jsonl", ['{"prompt": "a", "answer": ', *_task_lines()])
    _refused(_sweep(model, task, tmp_path / "run"), capsys, "task.jsonl:1 is not valid JSON", "fix or delete that line")


def test_a_raw_line_separator_inside_a_jsonl_string_is_kept(tmp_path):
    from knockout.data import prompts as P
    from knockout.data.text import load_texts

    lines = _task_lines()
    lines[2] = '{"prompt": "two\u2028lines\u0085here: the answer is", "answer": " 3"}'
    items = P.read_task_file(_write_lines(tmp_path / "task.jsonl", lines))
    assert len(items) == 20 and items[2].prompt == "two\u2028lines\u0085here: the answer is"
    docs = [json.dumps({"text": f"document {i}"}) for i in range(10)]
    docs[4] = '{"text": "para\u2029graph"}'
    text = _write_lines(tmp_path / "text.jsonl", docs)
    got = list(load_texts(text, "eval")) + list(load_texts(text, "collect"))
    assert sorted(got) == sorted([f"document {i}" for i in range(10) if i != 4] + ["para\u2029graph"])


def test_an_unknown_setting_lists_the_known_ones(tmp_path, capsys, no_model):
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({"model": "m", "colour": "red", "7": 1}))
    err = _refused(["-q", "sweep", "--config", str(config)], capsys, "unknown setting(s) 7, colour; known: ablate")
    assert "eval_tokens" in err and "--help" not in err
    config.write_text(json.dumps({"model": "m", "optimal": {"step": 3}}))
    _refused(["-q", "sweep", "--config", str(config)], capsys, "unknown optimal option(s) step; known:")


def test_ablate_with_explicit_fractions_is_refused(setup, tmp_path, capsys, no_model, caplog):
    _, model, corpus = setup
    out = tmp_path / "run"
    _refused(
        _sweep(model, corpus, out, "--ablate", "L0.H1"), capsys, "--fractions", "--ablate runs do not use", out=out
    )
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({"model": model, "ablate": "L0.H1", "fractions": [0, 0.5]}))
    with caplog.at_level("WARNING"):
        cfg = _config(build_parser().parse_args(["sweep", "--config", str(config)]))
    assert cfg.ablate == "L0.H1" and "are not used" in caplog.text
