"""docs/api.md documents every public name, and the package ships ``py.typed`` as package data."""

from __future__ import annotations

import re
from pathlib import Path

import knockout

ROOT = Path(__file__).parents[2]


def test_every_public_name_has_a_line_in_docs_api_md():
    documented = set(re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)", (ROOT / "docs" / "api.md").read_text(), re.M))
    documented |= {n for line in re.findall(r"^\| (`[^|]*`) \|", (ROOT / "docs" / "api.md").read_text(), re.M)
                   for n in re.findall(r"`([A-Za-z_]\w*)`", line)}  # fmt: skip
    assert set(knockout.__all__) <= documented, sorted(set(knockout.__all__) - documented)
    assert documented <= set(knockout.__all__), sorted(documented - set(knockout.__all__))


def test_py_typed_is_package_data():
    assert (Path(knockout.__file__).parent / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^knockout = \[.*"py\.typed".*\]$', pyproject, re.M)
