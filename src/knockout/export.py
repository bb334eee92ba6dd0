"""A run's ablation constants, keyed for other tools: TransformerLens, nnsight (Hugging Face module paths) or plain
safetensors (``knockout export RUN --format ...``; Python :func:`export_constants`). See docs/export.md.

The constants are the method's own (computed through the method registry, :mod:`knockout.ablation`, from the run's
``stats.safetensors``): ``mean``, ``peak``, ``median``, ``mode``, ``peak-nopm``, ``peak@EPS`` and ``zero`` give one
``[width]`` vector per layer, the value each neuron is set to when it is ablated. ``optimal`` learns constants per
neuron set, so it gives one vector per seed and fraction of the run (read from ``artifacts/optimal/``), each with a
boolean mask of the neurons it ablates.

Keys, per layer ``L`` (the site of the run: attention pre-out, or ``--site mlp``):

=================  ===========================================  ==============================================
format             attention site                               MLP site
=================  ===========================================  ==============================================
transformerlens    ``blocks.{L}.attn.hook_z``, ``[n_heads, d_head]``  ``blocks.{L}.mlp.hook_post``, ``[d_mlp]``
nnsight            the out-projection's module path, ``[width]``    the MLP out-projection's path, ``[d_mlp]``
                   (``model.layers.3.self_attn.o_proj``)
safetensors        ``layer{L}``, ``[width]``                     ``layer{L}``, ``[d_mlp]``
=================  ===========================================  ==============================================

``optimal``'s keys are prefixed with ``seed{s}/fraction{f}/`` (the neuron sets of its stored rows) and each has a
``.../ablated`` mask of the same shape.
Neuron ``head * d_head + j`` of the flat layout is ``[head, j]`` of TransformerLens's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from knockout import runfolder
from knockout.ablation.methods import ConstantAblation, MethodContext, get_method
from knockout.ablation.optimal import OptimalAblation
from knockout.ablation.selection import NeuronSelection
from knockout.config import Resolved
from knockout.errors import KnockoutError
from knockout.runfolder import RunFolder
from knockout.sites import Site
from knockout.stats.statistics import Statistics
from knockout.version import __version__

log = logging.getLogger(__name__)

FORMATS = ("transformerlens", "nnsight", "safetensors")
FORMAT_TAG = "knockout.export/1"


def run_sites(resolved: Resolved, need_modules: bool = False) -> list[Site]:
    """The sites a run folder's record describes (layer, module path, heads; no module objects)."""
    identity = resolved.identity
    widths, n_heads, kind = identity.get("widths"), identity.get("n_heads"), resolved.site_kind
    if not widths or not n_heads:
        raise KnockoutError("the run folder's config.json lacks the model identity; is it a knockout sweep folder?")
    names = resolved.site_modules
    if names is None:
        if need_modules:
            raise KnockoutError(
                "the run folder's config.json does not record its site modules (resolved.site_modules); re-run the "
                "same sweep command (it resumes, recomputing no rows, and records them), then export again"
            )
        names = [f"layer{i}" for i in range(len(widths))]
    return [
        Site(layer=i, name=name, module=None, n_heads=n_heads, d_head=w // n_heads, kind=kind)  # type: ignore[arg-type]
        for i, (name, w) in enumerate(zip(names, widths))
    ]


def site_key(site: Site, format: str) -> str:
    """The name another tool gives ``site`` (see the module docs)."""
    if format == "transformerlens":
        return f"blocks.{site.layer}.mlp.hook_post" if site.kind == "mlp" else f"blocks.{site.layer}.attn.hook_z"
    if format == "nnsight":
        return site.name
    if format == "safetensors":
        return f"layer{site.layer}"
    raise KnockoutError(f"unknown export format {format!r}; use {', '.join(FORMATS)}")


def site_shape(values: torch.Tensor, site: Site, format: str) -> torch.Tensor:
    """``[width]`` values in ``format``'s layout: ``[n_heads, d_head]`` for TransformerLens's ``hook_z``."""
    values = values.detach().float().cpu().contiguous()
    if format == "transformerlens" and site.kind != "mlp":
        return values.view(site.n_heads, site.d_head).contiguous()
    return values


def _read(run_dir: str | os.PathLike) -> RunFolder:
    folder = RunFolder.open(run_dir)
    if folder.config is None:
        raise KnockoutError(f"{str(run_dir)!r} has no config.json; give a knockout run folder")
    return folder


def _stats(folder: RunFolder, method: str) -> Statistics:
    path = folder.dir / runfolder.STATS_FILE
    if folder.stats_path is None:
        raise KnockoutError(
            f"method {method!r} needs the run's statistics, but {str(path)!r} does not exist (a run keeps them when "
            "one of its methods needs them): run a sweep with a statistics method (mean, peak ...) into this folder"
        )
    return Statistics.load(path)


def export_constants(run_dir: str | os.PathLike, method: str = "peak", format: str = "transformerlens") -> dict:
    """The constants of ``method`` in run folder ``run_dir``, keyed for ``format`` (see the module docs): a dict of
    tensors. Constant methods need the run's ``stats.safetensors`` (except ``zero``); ``optimal`` needs its learned
    constants in ``artifacts/optimal/``."""
    if format not in FORMATS:
        raise KnockoutError(f"unknown export format {format!r}; use {', '.join(FORMATS)}")
    folder = _read(run_dir)
    sites = run_sites(folder.resolved, need_modules=format == "nnsight")
    task = folder.resolved.task or folder.config.task
    cls = get_method(method)
    if cls is OptimalAblation:
        return _optimal(folder, sites, task, format)
    if not issubclass(cls, ConstantAblation):
        raise KnockoutError(
            f"method {method!r} does not ablate to constants (its values depend on the input), so there is nothing "
            "to export; export a constant method (zero, mean, peak, median, mode, peak-nopm, peak@EPS) or optimal"
        )
    stats = _stats(folder, method) if cls.needs_stats else None
    values = cls(MethodContext(None, sites, stats, task=task)).constants()  # type: ignore[arg-type]
    return {site_key(s, format): site_shape(v, s, format) for s, v in zip(sites, values)}


def _optimal(folder: RunFolder, sites: list[Site], task: str, format: str) -> dict:
    """``optimal``'s learned constants per seed and fraction (each file checked), with masks of the ablated
    neurons."""
    cfg, run_dir = folder.config, folder.dir
    if "optimal" not in cfg.methods:
        raise KnockoutError(f"the run in {str(run_dir)!r} did not run optimal (its methods: {', '.join(cfg.methods)})")
    stats = _stats(folder, "optimal")
    done: dict[int, list[float]] = {}  # the neuron sets optimal was evaluated on: its stored rows
    for row in folder.rows:
        if row.method == "optimal" and row.n_ablated > 0 and not row.target:
            done.setdefault(row.seed, []).append(row.fraction)
    stored = folder.selection()
    out: dict[str, torch.Tensor] = {}
    missing = []
    for seed, fractions in sorted(done.items()):
        selection = NeuronSelection.for_sites(sites, seed, cfg.selection)
        for name, order in selection.state_dict().items():
            if name in stored and not torch.equal(stored[name], order):
                raise KnockoutError(
                    f"the neuron orders in {runfolder.SELECTION_FILE} differ from seed {seed}'s; the run folder was "
                    "written by another version of knockout, so its learned constants cannot be matched to fractions"
                )
        artifacts = run_dir / runfolder.ARTIFACTS_DIR
        ctx = MethodContext(None, sites, stats, seed, task, optimal=cfg.optimal, artifacts=artifacts)
        method = OptimalAblation(ctx)
        for fraction in sorted(fractions):
            neurons = selection.at(fraction)
            path = method.artifact_path(neurons)
            if path is None or not path.is_file():
                missing.append(f"seed {seed} fraction {fraction:g}")
                continue
            learned = folder.artifact(path)
            prefix = f"seed{seed}/fraction{runfolder.fraction_key(fraction):g}/"
            for site in sites:
                key = prefix + site_key(site, format)
                mask = torch.zeros(site.width, dtype=torch.bool)
                mask[neurons[site.layer]] = True
                out[key] = site_shape(learned[f"layer{site.layer}"], site, format)
                out[key + "/ablated"] = site_shape(mask, site, format).bool()
    if missing:
        log.warning("optimal: no learned constants in %s for %s", runfolder.ARTIFACTS_DIR, ", ".join(missing))
    if not out:
        raise KnockoutError(f"the run in {str(run_dir)!r} holds no learned optimal constants yet; run its sweep first")
    return out


def export_metadata(run_dir: str | os.PathLike, method: str, format: str) -> dict[str, str]:
    """What an exported file records (safetensors metadata, strings): the tool and layout, the method, the model
    identity and revision, the task and site, and the statistics' settings (eps, limit, tokens, data)."""
    folder = _read(run_dir)
    cfg, resolved = folder.config, folder.resolved
    identity, site = resolved.identity, resolved.site_kind
    settings = {
        "eps": cfg.eps,
        "limit": cfg.hist_limit,
        "stats_tokens": cfg.stats_tokens,
        "data": cfg.data,
        "max_length": cfg.max_length,
        "stats_skip_first": cfg.stats_skip_first,
    }
    stats_path = folder.stats_path
    if stats_path is not None:  # the statistics actually used (they may come from another run's --stats file)
        from knockout.stats.statistics import read_metadata

        meta = read_metadata(stats_path)
        settings.update(eps=float(meta["eps"]), limit=float(meta["limit"]))
        for key in ("stats_tokens", "data", "max_length", "stats_skip_first"):
            if key in meta:
                settings[key] = int(meta[key]) if key != "data" else meta[key]
    layout = {
        "transformerlens": "blocks.{L}.mlp.hook_post [d_mlp]"
        if site == "mlp"
        else "blocks.{L}.attn.hook_z [n_heads, d_head]",
        "nnsight": "module path of the out-projection whose input is the site, [width]",
        "safetensors": "layer{L} [width]",
    }[format]
    if method == "optimal":
        layout = "seed{s}/fraction{f}/" + layout + "; .../ablated: bool mask of the ablated neurons"
    return {
        "format": FORMAT_TAG,
        "tool": format,
        "layout": layout,
        "method": method,
        "model": identity.get("name") or "",
        "model_identity": json.dumps(identity),
        "model_revision": json.dumps(resolved.model_revision),
        "task": str(resolved.task or cfg.task),
        "site": site,
        "statistics": json.dumps(settings),
        "data_identity": json.dumps(resolved.data_identity),
        "knockout": __version__,
    }


def write_export(
    run_dir: str | os.PathLike,
    method: str = "peak",
    format: str = "transformerlens",
    out: str | os.PathLike | None = None,
) -> Path:
    """Write :func:`export_constants` with :func:`export_metadata` to a safetensors file (default
    ``RUN/export/{method}.{format}.safetensors``); returns its path."""
    from safetensors.torch import save

    path = Path(out) if out is not None else Path(run_dir) / "export" / f"{method}.{format}.safetensors"
    if path.suffix != ".safetensors":
        raise KnockoutError(f"--out {str(path)!r} should end in .safetensors")
    if out is not None and path.exists():
        raise KnockoutError(f"--out {str(path)!r} exists; remove it or give another file name")
    if out is None:
        runfolder.inside(run_dir, path.parent)
    if not path.parent.is_dir() and any(p.exists() and not p.is_dir() for p in path.parents):
        raise KnockoutError(f"--out {str(path)!r} cannot be written: a part of its folder is a file, not a folder")
    runfolder.check_out(path.parent)
    tensors = export_constants(run_dir, method, format)
    runfolder.write_atomic(path, save(tensors, metadata=export_metadata(run_dir, method, format)))
    return path
