"""Fuzz tests of the readers of input that others write: the component grammar, component set files (.json, .csv),
task and text JSONL files, and settings files (.json, .toml, .yaml). For any input the result is a valid parse or a
:class:`KnockoutError` (one line), never another exception. Derandomized, so every run tries the same inputs;
together they take a few seconds."""

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knockout.components import Geometry, parse_spec, parse_unit, resolve
from knockout.config import SweepConfig, read_settings_file
from knockout.data import prompts as P
from knockout.data.text import load_texts
from knockout.errors import KnockoutError

FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)
#: Nesting depths: any, and the ones past Python's recursion limit that broke the readers.
DEPTHS = st.integers(1, 100) | st.sampled_from([64, 65, 2000, 200_000])
GEOMETRY = Geometry((8, 8, 6), (2, 2, 3))

# Pieces of the grammar and of the inputs that broke it: digits of other scripts, superscripts, long numbers.
PIECES = st.sampled_from(
    ["L", "l", "H", "h", ".", ":", "-", ",", ";", "=", " ", "0", "1", "2", "7", "9", "²", "٣", "１", "\n", "#", "x",
     "L1.H1", "L0:3-5", "L2", "L1:7", "9" * 30, "a=", "baseline=", "\u2028", "\x00"]
)  # fmt: skip
GRAMMAR = (
    st.lists(PIECES, max_size=30).map("".join)
    | st.text(max_size=60)
    | st.tuples(st.sampled_from(["L", "L1:", "L1.H", "neurons:", "L0:1-"]), st.integers(1, 6000)).map(
        lambda p: p[0] + "7" * p[1]
    )
    | st.sampled_from(["neurons:", "neurons:²", "neurons:٣", "NEURONS: 4", "head", "layer"])
)

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["auto", "all", "zero", "peak", "L1.H1", "L0:1-3", "0,0.5,1", "lots", "head", "neurons:4"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _ok_or_knockout(fn, *args):
    """``fn(*args)``; a KnockoutError (one line) is a fine answer, any other exception fails the test."""
    try:
        return fn(*args)
    except KnockoutError as e:
        assert "\n" not in str(e), str(e)
        return None


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _file(folder: Path, name: str, data: str | bytes) -> str:
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return str(path)


# -- the component grammar ---------------------------------------------------------------------------------------------
@FUZZ
@given(spec=GRAMMAR)
def test_component_specs(spec):
    if spec.strip().lower().endswith((".json", ".csv")):
        return  # a file name: the set-file tests below
    sets = _ok_or_knockout(parse_spec, spec)
    for s in sets or []:
        resolved = _ok_or_knockout(resolve, s, GEOMETRY)
        if resolved is not None:
            assert 0 < resolved.n_ablated <= sum(GEOMETRY.widths)
    unit = _ok_or_knockout(parse_unit, spec)
    assert unit is None or unit[0] in ("head", "layer", "neurons")


# -- component set files -----------------------------------------------------------------------------------------------
SET_ITEMS = st.fixed_dictionaries(
    {"name": JSON_SCALARS, "components": GRAMMAR | st.lists(GRAMMAR, max_size=3) | JSON_VALUES}
)


VALID_SET = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "induction", "x y", "movers"]),
        "components": st.sampled_from(["L1.H1", "L0:1-3,L2", ["L1.H0", "L0:7"], "l2:0-5"]),
    }
)


@FUZZ
@given(
    content=st.one_of(
        JSON_VALUES.map(json.dumps),
        st.lists(SET_ITEMS, max_size=3).map(json.dumps),
        st.lists(VALID_SET, min_size=1, max_size=3, unique_by=lambda d: d["name"]).map(json.dumps),
        st.text(max_size=80),
        DEPTHS.map(lambda n: "[" * n + "]" * n),
    )
)
def test_json_set_files(folder, content):
    for s in _ok_or_knockout(parse_spec, _file(folder, "sets.json", content)) or []:
        _ok_or_knockout(resolve, s, GEOMETRY)


VALID_ROWS = st.lists(st.sampled_from(['a,"L1.H1,L2"', "b,L0:1-3", "c , l2 "]), min_size=1, max_size=3, unique=True)
CSV_ROWS = st.lists(st.lists(GRAMMAR, max_size=3).map(lambda r: ",".join(f'"{c}"' if "," in c else c for c in r)))


@FUZZ
@given(
    content=st.one_of(
        CSV_ROWS.map(lambda rows: "\n".join(["name,components", *rows])),
        VALID_ROWS.map(lambda rows: "\n".join(["name,components", *rows])),
        st.text(max_size=120),
        st.integers(1, 300_000).map(lambda n: 'name,components\nbig,"' + "L0," * (n // 3) + '"\n'),
        st.binary(max_size=60),
    )
)
def test_csv_set_files(folder, content):
    for s in _ok_or_knockout(parse_spec, _file(folder, "sets.csv", content)) or []:
        _ok_or_knockout(resolve, s, GEOMETRY)


# -- task and text JSONL -----------------------------------------------------------------------------------------------
WORDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
PROMPT_LINES = st.one_of(
    st.fixed_dictionaries({"prompt": WORDS, "answer": WORDS}),
    st.fixed_dictionaries({"prompt": WORDS, "correct": WORDS, "incorrect": WORDS}),
    st.fixed_dictionaries({"prompt": JSON_SCALARS, "answer": JSON_SCALARS}),
    st.fixed_dictionaries({"prompt": JSON_SCALARS, "correct": JSON_SCALARS, "incorrect": JSON_SCALARS}),
    st.fixed_dictionaries({"text": WORDS}),
    st.fixed_dictionaries({"text": JSON_SCALARS}),
    JSON_VALUES,
).map(json.dumps)
JUNK_LINES = (
    PROMPT_LINES
    | st.text(max_size=40)
    | DEPTHS.map(lambda n: "[" * n + "]" * n)
    | st.sampled_from(['{"prompt": "a\u2028b", "answer": " c"}', '{"prompt": "x", "answer": ', "\u2028", "\r"])
)
ANSWER_LINES = st.fixed_dictionaries({"prompt": WORDS, "answer": WORDS}).map(json.dumps)
VALID_TASKS = st.lists(ANSWER_LINES, min_size=2, max_size=6) | st.lists(
    st.fixed_dictionaries({"prompt": WORDS, "correct": WORDS, "incorrect": WORDS}).map(json.dumps),
    min_size=2,
    max_size=6,
)
LINES = st.one_of(
    VALID_TASKS,
    st.tuples(VALID_TASKS, st.integers(0, 6), JUNK_LINES).map(lambda t: [*t[0][: t[1]], t[2], *t[0][t[1] :]]),
    st.lists(JUNK_LINES, max_size=8),
)


@FUZZ
@given(lines=LINES, newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_task_and_text_jsonl(folder, lines, newline):
    path = _file(folder, "data.jsonl", newline.join(lines))
    items = _ok_or_knockout(P.read_task_file, path)
    for item in items or []:
        assert isinstance(item.prompt, str) and item.prompt
        _ok_or_knockout(P.check_length, item, 16, "prompt")
    for split in ("eval", "collect"):
        docs = _ok_or_knockout(lambda s: list(load_texts(path, s)), split)
        assert docs is None or all(isinstance(d, str) for d in docs)


# -- settings files ----------------------------------------------------------------------------------------------------
FIELDS = [
    "model", "out", "data", "methods", "fractions", "method_fractions", "seeds", "ablate", "eval_tokens", "eval_docs",
    "stats_tokens", "stats_skip_first", "max_length", "batch_size", "sort_by_length", "eps", "hist_limit", "selection",
    "task", "site", "n_heads", "trust_remote_code", "device_map", "preset", "revision", "stats_data", "optimal",
    "resample", "image", "decide", "scan", "resolved", "colour",
]  # fmt: skip
GROUP_KEYS = ["steps", "lr", "unit", "fractions", "max_sets", "first", "alpha", "mean", "std", "size", "fixed", "top_k"]
RANDOM_SETTINGS = st.dictionaries(
    st.sampled_from(FIELDS),
    JSON_VALUES | st.dictionaries(st.sampled_from(GROUP_KEYS), JSON_VALUES, max_size=3),
    max_size=5,
)
FRACTIONS = st.lists(st.sampled_from([0, 0.1, 0.5, 0.9, 1]), min_size=1, max_size=4)
# Values each setting accepts, so that valid configs (and their round trips) are tried too.
VALID = {
    "out": st.sampled_from(["runs/x", "r"]),
    "data": st.sampled_from(["wiki", "ioi", "corpus.txt"]),
    "methods": st.sampled_from([["zero"], ["zero", "peak"], ["all"], ["mean", "peak@0.05"]]),
    "fractions": st.just([0, 0.1, 0.5, 0.9, 1]),
    "seeds": st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True),
    "eval_tokens": st.integers(1, 10**6),
    "stats_tokens": st.integers(64, 10**6),
    "max_length": st.integers(2, 4096),
    "batch_size": st.integers(1, 64),
    "sort_by_length": st.booleans(),
    "eps": st.sampled_from([0.01, 0.05, 0.1]),
    "hist_limit": st.sampled_from(["auto", 10, 20.0]),
    "selection": st.sampled_from(["per-layer", "global", "heads-per-layer"]),
    "site": st.sampled_from(["attention", "mlp"]),
    "ablate": st.sampled_from(["L1.H1", "a=L0;b=L1:0-3"]),
    "optimal": st.fixed_dictionaries({}, optional={"steps": st.integers(0, 20), "lr": st.floats(0.001, 1)}),
    "decide": st.fixed_dictionaries({}, optional={"fractions": FRACTIONS, "max_sets": st.integers(3, 30)}),
    "image": st.fixed_dictionaries({}, optional={"mean": st.lists(st.floats(0, 1), min_size=3, max_size=3)}),
}
VALID_SETTINGS = st.fixed_dictionaries({}, optional=VALID)
SETTINGS = st.one_of(
    VALID_SETTINGS,
    RANDOM_SETTINGS,
    st.tuples(VALID_SETTINGS, st.sampled_from(FIELDS), JSON_VALUES).map(lambda t: {**t[0], t[1]: t[2]}),
)


def _config(values):
    return SweepConfig.from_dict({"model": "m", **values}) if isinstance(values, dict) else None


@FUZZ
@given(values=SETTINGS)
def test_settings_values(values):
    cfg = _ok_or_knockout(_config, values)
    if cfg is not None:
        assert SweepConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # a valid config round-trips


@FUZZ
@given(
    suffix=st.sampled_from([".json", ".toml", ".yaml"]),
    content=st.one_of(
        st.text(max_size=120),
        SETTINGS.map(lambda v: json.dumps(v)),
        SETTINGS.map(lambda v: yaml.safe_dump(v)),
        st.sampled_from(
            ["a = [[[[[[[[", "x: !!python/object/apply:os.system [true]", "x: &a [*a]", "a = 1" + "0" * 5000,
             "model: m\nfractions: lots", "model = \"m\"\ntrust_remote_code = true", "\ufeff{}", "{\"a\": 1e999}"]
        ),
        DEPTHS.map(lambda n: "[" * n + "]" * n),
        DEPTHS.map(lambda n: "a = " + "[" * n + "]" * n),
        st.binary(max_size=40),
    ),
)  # fmt: skip
def test_settings_files(folder, suffix, content):
    values = _ok_or_knockout(read_settings_file, _file(folder, "settings" + suffix, content))
    if values is not None:
        assert isinstance(values, dict) and "trust_remote_code" not in values
        _ok_or_knockout(_config, values)


def test_files_not_in_utf8_are_named_in_one_line(tmp_path):
    from knockout.components import parse_spec
    from knockout.experiments.circuits import read_ranking

    latin = "L0.H1,L1.H0 # café".encode("latin-1")
    for name, read in (("sets.csv", parse_spec), ("s.json", read_settings_file), ("rank.txt", read_ranking)):
        path = tmp_path / name
        path.write_bytes(latin)
        with pytest.raises(KnockoutError, match=r"is not UTF-8 text \(unexpected end of data at byte 17\)"):
            read(str(path))
