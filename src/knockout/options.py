"""Typed settings: the field helper that every configuration dataclass uses, and the base of option groups.

A setting is a dataclass field whose ``metadata`` says how a user gives it: its help text and, for settings that are
command-line flags, how the flag is parsed (``kind``). The CLI builds its flags from these fields, so names, defaults
and help are written once, beside the code that reads them.

An :class:`OptionGroup` is a frozen dataclass of the settings one concern reads (``OptimalOptions`` for the
``optimal`` method, ``ResampleOptions`` for resampling, ``ImageOptions`` for image preprocessing, ``DecideOptions``
for ``--seeds auto``, ``ScanOptions`` for ``knockout scan``). It validates
itself when it is made, so a bad value is refused before a model is loaded. Its flags are ``--{prefix}-{field}``
(``--optimal-steps``); in a config file it is a nested object (``"optimal": {"steps": 10}``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any, ClassVar

from knockout.errors import KnockoutError
from knockout.inputs import brief, brief_text

#: How a flag's text is parsed (see ``knockout.cli``): ``str``, ``int``, ``float``, ``floats`` (``0,0.5,1`` or
#: ``start:stop:step``), ``ints``, ``seeds`` (``ints`` or ``auto``), ``names`` (comma-separated),
#: ``method_fractions``, ``bool`` (``--flag`` / ``--no-flag``), ``float_or_auto`` (a number or ``auto``).
KINDS = ("str", "int", "float", "floats", "ints", "seeds", "names", "method_fractions", "bool", "float_or_auto")


def setting(
    default: Any,
    help: str,
    group: str = "sweep",
    kind: str | None = None,
    flag: str | None = None,
    choices: tuple | None = None,
    affects_results: bool = True,
) -> Any:
    """A configuration field.

    ``help``: what it means (the flag's help). ``group``: the heading it is listed under in ``--help``. ``kind``: how
    its flag is parsed (:data:`KINDS`); ``None`` for fields that are not flags. ``flag``: the flag's name when it is
    not ``--field-name``. ``affects_results``: ``False`` for settings that change only speed or where a run
    runs (a resumed run may change them).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown setting kind {kind!r}")
    meta = {"help": help, "group": group, "kind": kind, "affects_results": affects_results}
    if flag is not None:
        meta["flag"] = flag
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list_of(value: Any, item) -> bool:
    return isinstance(value, (list, tuple)) and all(item(v) for v in value)


#: What a value of each kind must be before it is validated (a settings file's values reach a config unparsed).
_SHAPES = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", _number),
    "float": ("a number", _number),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "float_or_auto": ("a number or 'auto'", lambda v: _number(v) or v == "auto"),
    "floats": ("a list of numbers, e.g. [0, 0.5, 1]", lambda v: _list_of(v, _number)),
    "ints": ("a list of integers, e.g. [0, 1, 2]", lambda v: _list_of(v, _number)),
    "names": ('a list of names, e.g. ["zero", "peak"]', lambda v: _list_of(v, lambda x: isinstance(x, str))),
    "seeds": ("a list of integers or 'auto'", lambda v: v == "auto" or _list_of(v, _number)),
    "method_fractions": (
        'an object of method -> list of fractions, e.g. {"optimal": [0.5, 0.9]}',
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and _list_of(f, _number) for k, f in v.items()),
    ),
}


def check_shape(name: str, value: Any, kind: str | None, optional: bool = False, also: tuple = ()) -> None:
    """Refuse a value that cannot be a setting of ``kind`` (:data:`KINDS`) in one line naming ``name``: a string
    where a list is expected (``fractions = "lots"``), a list where a number is. ``optional``: ``None`` is allowed;
    ``also``: other types allowed (``device_map`` may be an object). Values are validated further by their
    config."""
    if kind is None or (optional and value is None) or isinstance(value, also):
        return
    what, fits = _SHAPES[kind]
    if not fits(value):
        got = f"the string {brief(value)}" if isinstance(value, str) else brief(value)
        raise KnockoutError(f"{name} must be {what}, got {got}")


def check_shapes(cls: type, values: Any, prefix: str = "") -> None:
    """:func:`check_shape` for every field of dataclass ``cls`` with a ``kind``, in ``values`` (a dict or an
    instance); a field whose default is ``None`` may be ``None``."""
    for f in dataclasses.fields(cls):
        if isinstance(values, dict):
            if f.name not in values:
                continue
            value = values[f.name]
        else:
            value = getattr(values, f.name)
        optional = f.default is None
        also = (dict,) if f.name == "device_map" else ()
        flag = f.metadata.get("flag", "--" + (prefix.replace(".", "-") + f.name).replace("_", "-"))
        check_shape(f"{prefix}{f.name} ({flag})", value, f.metadata.get("kind"), optional, also)


def default_of(cls: type, name: str) -> Any:
    """The default value of dataclass ``cls``'s field ``name``."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


class OptionGroup:
    """Base of a frozen dataclass of settings read by one concern (see the module docstring).

    Subclasses set ``prefix`` (the flags' prefix and the key in config files) and ``title`` (the ``--help``
    heading), and validate their values in ``__post_init__`` (helpers below)."""

    prefix: ClassVar[str] = ""
    title: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, values: dict | OptionGroup | None):
        """The group from a dict of its fields (a config file's nested object); unknown keys are refused."""
        if values is None:
            return cls()
        if isinstance(values, cls):
            return values
        if not isinstance(values, dict):
            raise KnockoutError(f"{cls.prefix} options must be an object of settings, got {brief(values)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(brief(k) if not isinstance(k, str) else k for k in set(values) - known)
        if unknown:
            raise KnockoutError(
                f"unknown {cls.prefix} option(s) {brief_text(', '.join(unknown))}; known: {', '.join(sorted(known))}"
            )
        check_shapes(cls, values, f"{cls.prefix}.")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # -- validation helpers ------------------------------------------------------------------------------------
    def _name(self, name: str) -> str:
        flag = self.__dataclass_fields__[name].metadata.get("flag", f"--{self.prefix}-{name.replace('_', '-')}")
        return f"{self.prefix}.{name} ({flag})"

    def _int(self, name: str, minimum: int, optional: bool = False) -> None:
        value = getattr(self, name)
        if optional and value is None:
            return
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and int(value) == value and value >= minimum):
            what = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
            raise KnockoutError(f"{self._name(name)} must be {what}{' or null' if optional else ''}, got {value!r}")
        object.__setattr__(self, name, int(value))

    def _positive(self, name: str) -> None:
        value = getattr(self, name)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
            raise KnockoutError(f"{self._name(name)} must be a positive number, got {value!r}")
        object.__setattr__(self, name, float(value))

    def _bool(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, bool):
            raise KnockoutError(f"{self._name(name)} must be true or false, got {value!r}")

    def _str(self, name: str, optional: bool = False) -> None:
        value = getattr(self, name)
        if optional and value is None:
            return
        if not isinstance(value, str) or not value:
            raise KnockoutError(f"{self._name(name)} must be a non-empty string, got {value!r}")
