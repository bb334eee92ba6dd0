"""Circuits: the named sets of a ``--keep`` / ``--keep-top`` run, made rows by the row engine like ``--ablate`` sets.

A circuit is checked by keeping it and ablating every other neuron of the site (:func:`knockout.components.kept`),
with each method. For each named set ``S`` of ``--keep`` the run holds, per method:

- ``keep:S``: every neuron outside ``S`` ablated (the circuit);
- ``S``: ``S`` itself ablated, the ``--ablate`` row of ``S`` (necessity, reported beside faithfulness);
- ``keep:none``: every neuron ablated (nothing kept), shared by every circuit of the method;

and the baseline (the full model) per seed. ``--keep-top K1,K2,...`` with ``--keep-ranking`` adds ``keep:topK``, the
top ``K`` units of a ranking kept (``K = 0`` is ``keep:none``; ``K`` = every unit ablates nothing and is the full
model): a faithfulness curve. The ranking is a scan's (by one method's ``|effect|``, read through
:func:`knockout.reporting.scan.load_scan`) or a file listing components, most important first.

Every set is recorded in ``resolved.targets`` with ``kept`` (what was kept; :attr:`ComponentSet.kept`), so a resumed
run whose sets hold other neurons is refused. The report is :mod:`knockout.reporting.circuits`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from knockout.components import (
    KEEP_PREFIX,
    NOTHING,
    ComponentSet,
    Geometry,
    SetSpec,
    component_sets,
    kept,
    parse_component,
    resolve,
    top_name,
)
from knockout.config import SweepConfig
from knockout.errors import KnockoutError
from knockout.inputs import brief, read_text


def _scan_and_method(spec: str) -> tuple[Path, str | None] | None:
    """``(scan folder, method)`` when ``spec`` names a run folder (``DIR`` or ``DIR:METHOD``), else ``None``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, None
    folder, sep, method = spec.rpartition(":")
    if sep and folder and Path(folder).expanduser().is_dir():
        return Path(folder).expanduser(), method.strip()
    return None


def read_ranking(spec: str) -> tuple[list[str], str]:
    """The units of ``--keep-ranking``, most important first, and where they came from (in words).

    ``SCAN_DIR[:METHOD]``: the scan's units by ``|effect|`` under ``METHOD`` (default the scan's first method),
    largest first, ties in unit order (:func:`knockout.reporting.scan.top_k`); a partial scan is refused. Otherwise a
    text file of components (one or more per line, separated by commas; ``#`` starts a comment)."""
    found = _scan_and_method(spec)
    if found is not None:
        from knockout.reporting.scan import load_scan, top_k

        folder, method = found
        data = load_scan(folder)
        method = method or (data.methods[0] if data.methods else None)
        if method not in data.methods:
            raise KnockoutError(
                f"--keep-ranking: the scan in {str(folder)!r} has no method {brief(method)}; its methods: "
                f"{', '.join(data.methods) or 'none'}"
            )
        effects = data.effects[method]
        missing = [u for u in data.units if u not in effects]
        if missing:
            raise KnockoutError(
                f"--keep-ranking: the scan in {str(folder)!r} has no {method} row for {len(missing)} unit(s) "
                f"({', '.join(missing[:3])}...): resume the scan to complete it"
            )
        order = top_k(data.units, effects, len(data.units))
        return order, f"the scan in {folder} ({len(order)} {data.unit_kind} units) ranked by |effect| under {method}"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise KnockoutError(
            f"--keep-ranking {brief(spec)} is neither a scan's run folder (DIR or DIR:METHOD) nor a file of components"
        )
    text = read_text(path, "ranking file")
    units = []
    for line in text.splitlines():
        units += [t.strip() for t in line.split("#", 1)[0].split(",") if t.strip()]
    if not units:
        raise KnockoutError(f"ranking file {str(path)!r} lists no components")
    for u in units:
        parse_component(u, f" (in ranking file {str(path)!r})")
    return units, f"the file {path} ({len(units)} units, in its order)"


def check_keep(cfg: SweepConfig) -> None:
    """What can be checked of ``--keep-top`` before the model loads: the ranking is readable and holds every
    planned size."""
    if cfg.keep_top is None:
        return
    order, where = read_ranking(cfg.keep_ranking)
    if cfg.keep_top[-1] > len(order):
        raise KnockoutError(
            f"--keep-top {cfg.keep_top[-1]} exceeds the {len(order)} units of {where}; give sizes up to {len(order)}"
        )


def keep_sets(cfg: SweepConfig, sites) -> list[ComponentSet]:
    """The sets of a ``--keep`` / ``--keep-top`` run on ``sites`` (see the module docstring), in the order they are
    evaluated: per named set its circuit and its own ablation, then the curve's sizes, then nothing kept."""
    geometry = Geometry.of(sites)
    out: list[ComponentSet] = []
    if cfg.keep is not None:
        for s in component_sets(cfg.keep, sites):
            if s.name.startswith(KEEP_PREFIX):
                raise KnockoutError(f"set name {s.name!r}: names starting with {KEEP_PREFIX!r} are the kept sets'")
            out.append(kept(KEEP_PREFIX + s.name, s.components, s.neurons, sites, {"set": s.name}))
            out.append(s)
    what_nothing: dict = {}
    if cfg.keep_top is not None:
        check_keep(cfg)
        order, _ = read_ranking(cfg.keep_ranking)
        total = len(order)
        what_nothing = {"k": 0, "of": total}
        for k in cfg.keep_top:
            if k == 0:
                continue
            spec = SetSpec(top_name(k), tuple(parse_component(u) for u in order[:k]))
            r = resolve(spec, geometry)
            out.append(kept(r.name, r.components, r.neurons, sites, {"k": k, "of": total}))
    empty = [torch.zeros(0, dtype=torch.long) for _ in sites]
    out.append(kept(NOTHING, (), empty, sites, what_nothing))
    return out
