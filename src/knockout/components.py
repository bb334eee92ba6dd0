"""Named components: which neurons of the current site a user means by ``L9.H6``, ``L3:17``, ``L3:0-63`` or ``L5``.

Grammar (case does not matter; spaces around tokens are ignored)::

    spec      := set (";" set)*
    set       := [name "="] component ("," component)*
    component := "L" layer "." "H" head        a head: neurons head*d_head .. head*d_head + d_head - 1
               | "L" layer ":" neuron          one neuron
               | "L" layer ":" first "-" last  neurons first .. last, both included
               | "L" layer                     every neuron of the layer's site

Layers, heads and neurons count from 0, as :class:`knockout.sites.Site` does (neuron ``head * d_head + j`` is
dimension ``j`` of head ``head``; with grouped-query attention a head is a *query* head). A set without a name is
named by its components as written in canonical form (``L9.H6,L9.H9``).

A file of named sets is read instead when the spec ends in ``.json`` or ``.csv``:

- JSON: one object ``{"name": "induction", "components": ["L1.H3", "L2.H5"]}`` or a list of them
  (``components`` may also be one string, ``"L1.H3,L2.H5"``);
- CSV: a header ``name,components`` and one row per set (``induction,"L1.H3,L2.H5"``).

Rules, checked when the spec is read (syntax) and when it meets the model's sites (ranges):

- a layer, head or neuron out of range is an error naming the token and the valid range (layers ``0..N-1``, heads
  ``0..H-1``, neurons ``0..W-1``);
- a head on the MLP site is refused (it has no heads): give neurons instead;
- **overlap within one set is refused** (``L9,L9.H6`` or ``L9.H6`` twice): a set is a set of neurons, and an overlap
  is nearly always a typo that would ablate fewer neurons than the tokens suggest. Different sets may overlap;
- set names must be unique, and may not contain ``;``, ``=``, ``,``, ``#`` or line breaks (a name is a run folder's
  ``target``; ``#`` separates it in the per-document sums' keys).

From Python: :func:`components` gives what :meth:`knockout.AblationMethod.ablate` takes (per layer, the sorted
indices of the ablated neurons) for a spec of one set; :func:`component_sets` gives every named set.
:func:`scan_units` gives the units of a scan (``head``, ``layer`` or ``neurons:K``), each a one-component set.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from knockout.errors import KnockoutError
from knockout.files import neuron_set_hash
from knockout.inputs import MAX_DIGITS, ascii_int, brief, brief_text, loads_json, read_text

FORMS = "L<layer>.H<head> (a head), L<layer>:<neuron>, L<layer>:<first>-<last> (inclusive) or L<layer> (a layer)"
_TOKEN = re.compile(r"^L([0-9]+)(?:\.H([0-9]+)|:([0-9]+)(?:-([0-9]+))?)?$", re.IGNORECASE | re.ASCII)
_BAD_NAME = re.compile(r"[;=,#\r\n]")
FILE_SUFFIXES = (".json", ".csv")
UNITS = ("head", "layer", "neurons:K")


@dataclass(frozen=True)
class Component:
    """One token of a spec: ``kind`` is ``head``, ``neuron``, ``range`` or ``layer``."""

    kind: str
    layer: int
    first: int = 0
    """The head (``head``), the neuron (``neuron``) or the first neuron (``range``)."""
    last: int = 0
    """The last neuron of a ``range`` (included)."""

    def __str__(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}.H{self.first}"
        if self.kind == "neuron":
            return f"L{self.layer}:{self.first}"
        if self.kind == "range":
            return f"L{self.layer}:{self.first}-{self.last}"
        return f"L{self.layer}"


@dataclass(frozen=True)
class SetSpec:
    """A named set as written: its name and components, not yet checked against a model."""

    name: str
    components: tuple[Component, ...]
    named: bool = True
    """Whether the user named the set (errors then say which set a token is in)."""


@dataclass(frozen=True)
class Geometry:
    """What the ranges are checked against: per layer the site's width and heads, and the site's kind."""

    widths: tuple[int, ...]
    n_heads: tuple[int, ...]
    kind: str = "attention"

    @classmethod
    def of(cls, sites: Sequence) -> Geometry:
        """The geometry of :class:`knockout.sites.Site` objects (one per layer, in layer order)."""
        if not sites:
            raise KnockoutError("the model has no sites to name components of")
        return cls(
            tuple(int(s.width) for s in sites),
            tuple(int(s.n_heads) for s in sites),
            getattr(sites[0], "kind", "attention"),
        )

    @property
    def n_layers(self) -> int:
        return len(self.widths)

    def d_head(self, layer: int) -> int:
        return self.widths[layer] // self.n_heads[layer]


@dataclass(frozen=True)
class ComponentSet:
    """A named set of neurons of the site: what one ``--ablate`` set or one scan unit ablates."""

    name: str
    components: tuple[Component, ...]
    neurons: tuple[torch.Tensor, ...]
    """Per layer, the sorted ``[k]`` long indices of the set's neurons (empty for untouched layers): what
    :meth:`knockout.AblationMethod.ablate` takes."""
    n_neurons: int
    """Neurons of the whole site (every layer)."""
    kept: dict | None = field(default=None, hash=False, compare=False)
    """For a set that *keeps* components (``--keep``, ``--keep-top``): ``components`` are the kept ones and
    ``neurons`` every other neuron of the site (what is ablated); what was kept: ``{"set": name}`` for a named set,
    ``{"k": k, "of": total}`` for the top ``k`` units of a ranking, ``{}`` for nothing kept. Recorded in
    ``resolved.targets`` as ``kept``."""

    @property
    def n_ablated(self) -> int:
        return sum(int(t.numel()) for t in self.neurons)

    @property
    def fraction(self) -> float:
        """The share of the site's neurons the set ablates (a row's ``fraction``)."""
        return self.n_ablated / self.n_neurons

    @property
    def layers(self) -> list[int]:
        """The layers the set touches, in order."""
        return [i for i, t in enumerate(self.neurons) if t.numel()]

    @property
    def spec(self) -> str:
        """The components in canonical form, comma-separated."""
        return ",".join(map(str, self.components))

    def digest(self) -> str:
        """A short hash of the neurons (:func:`neuron_set_hash`): the same set gives the same digest."""
        return neuron_set_hash(self.neurons)

    def record(self) -> dict:
        """What a run folder's config.json records about the set."""
        out = {
            "components": self.spec,
            "n_ablated": self.n_ablated,
            "fraction": self.fraction,
            "digest": self.digest(),
        }
        if self.kept is not None:
            out["kept"] = dict(self.kept)
        return out


# -- reading --------------------------------------------------------------------------------------------------------
def parse_component(token: str, where: str = "") -> Component:
    """One token (``L9.H6``, ``L3:17``, ``L3:0-63``, ``L5``); a bad one is an error naming it and the forms."""
    text = token.strip()
    m = _TOKEN.match(text)
    if not m:
        raise KnockoutError(f"cannot read component {brief(text)}{where}; use {FORMS}")
    numbers = [ascii_int(g, f"component {brief(text)}{where}") if g is not None else None for g in m.groups()]
    layer, head, first, last = numbers
    if head is not None:
        return Component("head", layer, head)
    if last is not None:
        if last < first:
            raise KnockoutError(f"component {text!r}{where}: the range {first}-{last} counts down; give first-last")
        return Component("range", layer, first, last)
    if first is not None:
        return Component("neuron", layer, first)
    return Component("layer", layer)


def _in(name: str) -> str:
    return f" (in set {brief(name)})" if name else ""


def parse_set(text: str, name: str | None = None) -> SetSpec:
    """One set: comma-separated components, named ``name`` (default: the components in canonical form)."""
    tokens = [t for t in text.split(",") if t.strip()]
    if not tokens:
        raise KnockoutError(f"set {brief(name)} has no components; give e.g. L9.H6,L9.H9" if name else "empty set")
    comps = tuple(parse_component(t, _in(name or "")) for t in tokens)
    if name is None:
        return SetSpec(",".join(map(str, comps)), comps, named=False)
    return SetSpec(check_name(name), comps)


def check_name(name) -> str:
    """A set name, stripped; refused when empty or holding a separator (``; = , #``) or a line break."""
    if not isinstance(name, str) or not name.strip():
        raise KnockoutError(f"a component set needs a non-empty name, got {brief(name)}")
    name = name.strip()
    if _BAD_NAME.search(name):
        raise KnockoutError(f"set name {brief(name)} may not contain ';', '=', ',', '#' or a line break")
    if name == "baseline":
        raise KnockoutError("'baseline' names the unablated rows; choose another set name")
    return name


def is_file_spec(spec: str) -> bool:
    """Whether ``spec`` names a file of sets (it ends in ``.json`` or ``.csv``)."""
    return spec.strip().lower().endswith(FILE_SUFFIXES)


def parse_spec(spec: str) -> list[SetSpec]:
    """The sets of a spec string or a ``.json``/``.csv`` file (syntax only; ranges are checked by :func:`resolve`).
    Set names must be unique."""
    if not isinstance(spec, str) or not spec.strip():
        raise KnockoutError(f"give components to ablate, e.g. --ablate L9.H6,L9.H9 (got {brief(spec)})")
    if is_file_spec(spec):
        sets = _read_file(Path(spec.strip()).expanduser())
    else:
        sets = []
        for part in spec.split(";"):
            if not part.strip():
                continue
            name, sep, body = part.partition("=")
            sets.append(parse_set(body, name) if sep else parse_set(part))
    if not sets:
        raise KnockoutError(f"no component sets in {brief(spec)}")
    seen: set[str] = set()
    for s in sets:
        if s.name in seen:
            raise KnockoutError(f"set name {brief(s.name)} is given twice; names must be unique")
        seen.add(s.name)
    return sets


def _read_file(path: Path) -> list[SetSpec]:
    """The sets of a ``.json`` or ``.csv`` file: at most :data:`~knockout.inputs.MAX_FILE_BYTES`, JSON nested at
    most :data:`~knockout.inputs.MAX_DEPTH` levels, CSV fields within the csv module's field limit."""
    if not path.is_file():
        raise KnockoutError(f"component file {str(path)!r} does not exist")
    text = read_text(path, "component file")
    where = f"component file {str(path)!r}"
    if path.suffix.lower() == ".json":
        items = loads_json(text, where)
        items = [items] if isinstance(items, dict) else items
        if not isinstance(items, list) or not items:
            raise KnockoutError(f'{where}: expected {{"name": ..., "components": [...]}} or a non-empty list of them')
        return [_json_set(item, f"{where} item {i}") for i, item in enumerate(items)]
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:  # a field over the csv module's limit (128 kB), a NUL byte, a broken quote
        raise KnockoutError(
            f"{where} is not readable CSV ({e}); give a header name,components and a row per set"
        ) from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["name", "components"]:
        raise KnockoutError(f"{where}: the first line must be the header name,components")
    out = []
    for n, row in enumerate(rows[1:], 2):
        if len(row) != 2:
            raise KnockoutError(
                f'{where} line {n}: expected two fields, name and components (quote the components: "L1.H3,L2.H5")'
            )
        out.append(parse_set(row[1], check_name(row[0])))
    if not out:
        raise KnockoutError(f"{where} has no sets")
    return out


def _json_set(item, where: str) -> SetSpec:
    if not isinstance(item, dict) or "name" not in item or "components" not in item:
        raise KnockoutError(f'{where}: expected an object {{"name": ..., "components": [...]}}, got {brief(item)}')
    unknown = sorted(set(item) - {"name", "components"})
    if unknown:
        raise KnockoutError(f"{where}: unknown field(s) {brief_text(', '.join(unknown))}; known: name, components")
    comps = item["components"]
    if isinstance(comps, list) and all(isinstance(c, str) for c in comps):
        comps = ",".join(comps)
    if not isinstance(comps, str):
        raise KnockoutError(f"{where}: components must be a list of strings or one string, got {brief(comps)}")
    return parse_set(comps, check_name(item["name"]))


# -- meeting the model -----------------------------------------------------------------------------------------------
def _neurons(c: Component, g: Geometry, name: str) -> tuple[int, int]:
    """The half-open neuron range ``[lo, hi)`` of component ``c`` in its layer, checked against ``g`` (``name``: the
    set's, for the message; empty for an unnamed set)."""
    where = f"component {str(c)!r}{_in(name)}"
    if not 0 <= c.layer < g.n_layers:
        raise KnockoutError(f"{where}: layer {c.layer} is out of range; valid layers 0..{g.n_layers - 1}")
    width = g.widths[c.layer]
    if c.kind == "layer":
        return 0, width
    if c.kind == "head":
        if g.kind != "attention":
            raise KnockoutError(
                f"{where}: the {g.kind} site has no heads; give neurons (L{c.layer}:<first>-<last>, neurons "
                f"0..{width - 1}) or the layer (L{c.layer})"
            )
        h, d = g.n_heads[c.layer], g.d_head(c.layer)
        if not 0 <= c.first < h:
            raise KnockoutError(
                f"{where}: head {c.first} is out of range; valid heads 0..{h - 1} ({h} heads of {d} neurons)"
            )
        return c.first * d, (c.first + 1) * d
    last = c.last if c.kind == "range" else c.first
    bad = c.first if not 0 <= c.first < width else last
    if not (0 <= c.first < width and 0 <= last < width):
        raise KnockoutError(f"{where}: neuron {bad} is out of range; valid neurons 0..{width - 1} of layer {c.layer}")
    return c.first, last + 1


def resolve(spec: SetSpec, geometry: Geometry) -> ComponentSet:
    """The neurons of ``spec`` on a site of ``geometry``; out-of-range tokens and overlaps are errors."""
    taken: dict[int, list[tuple[int, int, Component]]] = {}
    for c in spec.components:
        lo, hi = _neurons(c, geometry, spec.name if spec.named else "")
        for lo2, hi2, other in taken.get(c.layer, []):
            if lo < hi2 and lo2 < hi:
                where = f"set {spec.name!r}: " if spec.named else ""
                raise KnockoutError(
                    f"{where}components {str(other)!r} and {str(c)!r} overlap (both hold neuron "
                    f"{max(lo, lo2)} of layer {c.layer}); list each neuron once"
                )
        taken.setdefault(c.layer, []).append((lo, hi, c))
    neurons = []
    for layer in range(geometry.n_layers):
        parts = [torch.arange(lo, hi, dtype=torch.long) for lo, hi, _ in taken.get(layer, [])]
        neurons.append(torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.long))
    return ComponentSet(spec.name, spec.components, tuple(neurons), sum(geometry.widths))


def component_sets(spec: str, sites: Sequence) -> list[ComponentSet]:
    """Every named set of ``spec`` (a spec string or a ``.json``/``.csv`` file) on ``sites``
    (:func:`knockout.find_sites`), checked against their ranges."""
    geometry = Geometry.of(sites)
    return [resolve(s, geometry) for s in parse_spec(spec)]


def components(spec: str, sites: Sequence) -> list[torch.Tensor]:
    """What :meth:`knockout.AblationMethod.ablate` takes for the one set of ``spec``: per layer, the sorted indices
    of its neurons. ``components("L9.H6,L9.H9", sites)``; a spec of several sets is refused (use
    :func:`component_sets`)."""
    sets = component_sets(spec, sites)
    if len(sets) != 1:
        raise KnockoutError(
            f"{brief(spec)} holds {len(sets)} sets ({', '.join(s.name for s in sets)}); use knockout.component_sets"
        )
    return list(sets[0].neurons)


def complement(neurons: Sequence[torch.Tensor], sites: Sequence) -> list[torch.Tensor]:
    """Per layer, the sorted indices of every neuron of the site *not* in ``neurons[l]``: what ``ablate`` takes to
    keep a circuit (``--keep``: everything outside the set is ablated). The complement of nothing is every neuron,
    of every neuron nothing; ``complement(complement(n)) == n``."""
    if len(neurons) != len(sites):
        raise KnockoutError(f"{len(neurons)} layers of neurons for {len(sites)} sites")
    out = []
    for site, idx in zip(sites, neurons):
        inside = torch.zeros(site.width, dtype=torch.bool)
        inside[idx.to(torch.long).cpu()] = True
        out.append(torch.nonzero(~inside).flatten())
    return out


#: Names of the sets of a ``--keep`` run: ``keep:S`` keeps the named set ``S``, ``keep:topK`` the top ``K`` units of
#: a ranking, ``keep:none`` nothing (every neuron ablated).
KEEP_PREFIX = "keep:"
NOTHING = "keep:none"


def top_name(k: int) -> str:
    """The name of the set keeping the top ``k`` units of a ranking (``keep:top4``)."""
    return f"{KEEP_PREFIX}top{k}"


def kept(
    name: str, components: Sequence[Component], neurons: Sequence[torch.Tensor], sites: Sequence, what: dict
) -> ComponentSet:
    """The set that keeps ``neurons`` (per layer; ``components`` name them) and ablates every other neuron of
    ``sites`` (:func:`complement`), named ``name``; ``what`` says what was kept (:attr:`ComponentSet.kept`)."""
    rest = tuple(complement(neurons, sites))
    return ComponentSet(name, tuple(components), rest, sum(int(s.width) for s in sites), dict(what))


# -- scan units ------------------------------------------------------------------------------------------------------
def parse_unit(unit: str) -> tuple[str, int]:
    """``head``, ``layer`` or ``neurons:K`` -> ``(kind, K)`` (``K`` is 0 for heads and layers)."""
    text = str(unit).strip().lower()
    if text in ("head", "layer"):
        return text, 0
    kind, sep, size = text.partition(":")
    if kind == "neurons" and sep and size.isascii() and size.isdigit() and len(size) <= MAX_DIGITS and int(size) >= 1:
        return "neurons", int(size)
    raise KnockoutError(f"unknown scan unit {brief(unit)}; use head, layer or neurons:K (groups of K neurons, e.g. 64)")


def scan_units(sites: Sequence, unit: str) -> list[ComponentSet]:
    """The units of a scan, in layer order, each a set named by its one component: every head (``L9.H6``), every
    layer (``L9``) or, per layer, groups of ``K`` consecutive neurons (``L9:0-63``; the last group of a layer is
    shorter when ``K`` does not divide its width)."""
    kind, size = parse_unit(unit)
    g = Geometry.of(sites)
    if kind == "head" and g.kind != "attention":
        raise KnockoutError(f"the {g.kind} site has no heads; scan --unit layer or --unit neurons:K instead")
    comps: list[Component] = []
    for layer in range(g.n_layers):
        if kind == "head":
            comps += [Component("head", layer, h) for h in range(g.n_heads[layer])]
        elif kind == "layer":
            comps.append(Component("layer", layer))
        else:
            for lo in range(0, g.widths[layer], size):
                hi = min(lo + size, g.widths[layer]) - 1
                comps.append(Component("neuron", layer, lo) if hi == lo else Component("range", layer, lo, hi))
    return [resolve(SetSpec(str(c), (c,)), g) for c in comps]
