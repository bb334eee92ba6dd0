"""The README's examples work as written: its Python code runs, line for line, on a tiny model (offline), and every
command line and flag it shows exists in knockout's CLI."""

from __future__ import annotations

import argparse
import inspect
import re
import shlex
from pathlib import Path

import pytest
import torch

import knockout
import tiny
from knockout.cli import build_parser
from knockout.experiments import prepare
from knockout.loading import LoadedModel
from knockout.runfolder import RunFolder

README = Path(__file__).resolve().parents[2] / "README.md"
#: Flags in the README that belong to other programs (torchrun).
OTHER_FLAGS = {"--nproc-per-node", "--no-python"}


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _fenced(lang: str = "") -> list[str]:
    """The contents of the README's fenced code blocks opened with ```lang (``""``: blocks without a language)."""
    return re.findall(rf"^```{re.escape(lang)}\n(.*?)^```\s*$", _text(), re.S | re.M)


def _command_lines() -> list[str]:
    """Every ``knockout ...`` command in the README: lines of plain fenced blocks, and inline code spans that name a
    command."""
    commands = set(_subparsers())
    lines = [line.strip() for block in _fenced() for line in block.splitlines() if line.startswith("knockout ")]
    spans = re.findall(r"`(knockout [^`]+)`", _text())
    lines += [s for s in spans if s.split()[1] in commands]
    return lines


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_readme_has_a_python_example_and_command_lines():
    assert _fenced("python"), "README.md has no ```python block"
    assert len(_command_lines()) >= 5


@pytest.mark.parametrize("line", _command_lines(), ids=str)
def test_readme_command_lines_parse(line):
    """Each command line parses with the real parser (a renamed command or flag fails here); ``--help`` and
    ``--version`` lines exit 0."""
    argv = shlex.split(line, comments=True)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, f"README line does not parse: {line}"


def test_every_flag_in_the_readme_exists():
    known = {"--help", "--version"} | OTHER_FLAGS
    for sub in _subparsers().values():
        known |= set(sub._option_string_actions)
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", _text()))
    assert flags - known == set(), f"flags in README.md that no knockout command has: {sorted(flags - known)}"


def _tiny_loader(calls: list):
    """A stand-in for :func:`knockout.load_model` with its signature: a tiny Llama with a character tokenizer (room
    for the README's 128-token sequences)."""
    real = knockout.load_model

    def load(*args, **kwargs) -> LoadedModel:
        bound = inspect.signature(real).bind(*args, **kwargs)  # a wrong call fails as the real one would
        calls.append(bound.arguments["model"])
        model = tiny.causal_lm("llama")
        model.config.max_position_embeddings = 512
        return LoadedModel(model, tiny.tokenizer(), "causal", bound.arguments["model"], torch.device("cpu"))

    return load


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python block, executed as written; only the model is swapped for a tiny one (``load_model``,
    both where the block calls it and where ``run_sweep`` does). The data is the built-in Wikipedia set."""
    calls: list[str] = []
    load = _tiny_loader(calls)
    monkeypatch.setattr(knockout, "load_model", load)
    monkeypatch.setattr(prepare, "load_model", load)
    monkeypatch.chdir(tmp_path)

    for block in _fenced("python"):
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})

    assert calls and all(name == "smollm2-135m" for name in calls)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(printed) >= 2, printed
    run_dirs = [p.parent for p in tmp_path.rglob("results.jsonl")]
    assert run_dirs, "the README's run_sweep wrote no run folder"
    for run_dir in run_dirs:
        rows = RunFolder(run_dir).row_dicts()
        assert rows and all(r["ce"] == r["ce"] for r in rows)  # rows stored, none NaN
        assert (run_dir / "report" / "report.html").is_file()
