"""How every run starts: the checks that need no model, the model, its sites and the inputs its batches need.

A sweep (:func:`knockout.experiments.runner.run_sweep`) and a statistics-only run
(:func:`knockout.experiments.runner.run_stats`) both start with :func:`prepare`, inside the launcher's process group:

1. :func:`check` everything that can be checked without the model (the output folder or file, the data, the
   model's files and their fingerprint, an existing run folder's files, settings, data and model), so bad input
   costs nothing; a sweep's rank 0 first becomes the run folder's one writer (its lock, held until the sweep ends)
   and alone may move an old run folder aside (``--restart``), then the other ranks see what it left;
2. load the model (:func:`load`), fill in its task, refuse a ``--max-length`` beyond its positions;
3. find its sites and measure what the batch builders need (:class:`~knockout.data.tasks.ModelInputs`).
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from knockout import distributed, runfolder
from knockout.config import SweepConfig
from knockout.data.tasks import DataSpec, ModelInputs, probe_inputs
from knockout.distributed import World
from knockout.errors import KnockoutError
from knockout.fingerprint import describe, model_fingerprint, same_model, source_fingerprint, tensors_fingerprint
from knockout.hooks import preout_length
from knockout.inference.sequential import design_changes
from knockout.loading import LoadedModel, load_model, model_identity
from knockout.sites import Site, find_sites, text_config
from knockout.version import __version__

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A run ready to go: its config (for the loaded model's task), the model, its sites, the data and identities."""

    cfg: SweepConfig
    loaded: LoadedModel
    sites: list[Site]
    spec: DataSpec
    inputs: ModelInputs
    identity: dict
    """The model's identity (:func:`knockout.loading.model_identity`), saved with statistics and run folders."""
    data_id: dict
    """What the data was (:func:`knockout.data.text.data_identity`)."""
    world: World
    folder: runfolder.RunFolder | None = None
    """The run folder as it was found (checked); ``None`` for a statistics-only run."""


def environment() -> dict:
    """The versions a run records."""
    import transformers

    return {
        "knockout": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def check(
    cfg: SweepConfig,
    restart: bool = False,
    stats_file: str | Path | None = None,
    lock: bool = False,
    fingerprint: dict | None = None,
) -> tuple[dict, runfolder.RunFolder | None]:
    """Everything checkable without the model; returns the data's identity and the run folder as found (``None``
    for a statistics-only run).

    A sweep: ``--out`` is a writable folder, the data exists, and an existing run folder is intact and holds a run
    of the same settings, data and model (``fingerprint``, when known before loading; ``restart``: move it aside
    first). ``lock``: make this process the folder's one writer first (:class:`knockout.runfolder.RunLock`; the
    caller releases it). A statistics-only run (``stats_file``): that file can be written, and the data exists."""
    from knockout.data.text import check_source, data_identity

    if stats_file is not None:
        path = Path(stats_file)
        if path.suffix != ".safetensors":
            raise KnockoutError(f"--out {str(path)!r} should end in .safetensors")
        if path.is_dir():
            raise KnockoutError(f"--out {str(path)!r} is a folder; give a .safetensors file name")
        runfolder.check_out(path.parent)
    else:
        runfolder.check_out(cfg.out)
    data_id = data_identity(cfg.data, cfg.data_revision)
    check_source(cfg.data, cfg.max_length)
    if needs_counterfactuals(cfg):
        check_counterfactuals(cfg)
        data_id = {**data_id, **counterfactual_identity(cfg.data)}
    if cfg.stats_data is not None:  # the statistics' source is part of what the data was
        data_id = {**data_id, "stats": data_identity(cfg.stats_data)}
        check_source(cfg.stats_data)
    if stats_file is not None:
        return data_id, None
    out = Path(cfg.out)
    if lock:
        runfolder.lock_run(out)
    if restart and (moved := runfolder.move_aside(out)) is not None:
        log.warning("--restart: moved the old run folder to %s", moved)
    if cfg.keeps:
        from knockout.experiments.circuits import check_keep

        check_keep(cfg)
    folder = runfolder.RunFolder(out)
    folder.check_integrity()
    check_settings(folder, cfg, task_known=cfg.task != "auto")
    runfolder.check_data(folder, data_id)
    if fingerprint is not None:
        runfolder.check_model(folder, fingerprint)
    return data_id, folder


def needs_counterfactuals(cfg: SweepConfig) -> bool:
    """Whether a method of ``cfg`` patches from counterfactuals (``patch``)."""
    from knockout.ablation.methods import get_method
    from knockout.config import ALL_METHODS

    return any(getattr(get_method(m), "needs_counterfactuals", False) for m in cfg.methods if m != ALL_METHODS)


def check_counterfactuals(cfg: SweepConfig) -> None:
    """Refuse, before the model loads, a method that patches from counterfactuals on data without them."""
    from knockout.data.prompts import has_counterfactuals, is_task_source

    if not (is_task_source(cfg.data) and has_counterfactuals(cfg.data)):
        names = ", ".join(m for m in cfg.methods if m == "patch") or "patch"
        raise KnockoutError(
            f"method {names} patches each prompt's counterfactual: it needs task prompts with counterfactuals "
            f'(--data ioi, or a task .jsonl file with a "counterfactual" field on every line); {cfg.data!r} has none'
        )


def counterfactual_identity(source: str) -> dict:
    """What the data identity adds when counterfactuals are read: the built-in task's counterfactual generator
    version (a task file's counterfactuals are in its sha256 already). Only runs that patch record it, so runs
    without ``patch`` keep their identity."""
    from knockout.data import prompts

    return {"counterfactuals": prompts._IOI_ABC} if source in prompts.BUILTIN_TASKS else {}


def check_settings(folder: runfolder.RunFolder, cfg: SweepConfig, task_known: bool = True) -> None:
    """Raise if ``folder`` holds a run whose results-defining settings differ from ``cfg``'s, or a run of the other
    kind (a scan's folder for a sweep, or the reverse) (``task_known=False``: the task is not compared, as it is
    not known before the model is loaded)."""
    if not folder.has_config:
        return
    was_scan, is_scan = folder.is_scan, cfg.scan.unit is not None
    if was_scan != is_scan:
        kinds = ("a scan", "a sweep") if was_scan else ("a sweep", "a scan")
        raise KnockoutError(
            f"{str(folder.dir)!r} holds {kinds[0]}'s run; {kinds[1]} cannot resume or extend it. Use another --out "
            "folder, or --restart to move it aside"
        )
    stored = folder.resolved.design
    if stored is not None and (changes := design_changes(stored, cfg.design() or {})):
        raise KnockoutError(
            f"{str(folder.dir)!r} holds a --seeds auto run whose sequential design was fixed before its first look "
            f"({'; '.join(changes[:3])}{' ...' if len(changes) > 3 else ''}): its error rate holds only for that "
            "design. Resume it with the same --seeds and --decide-* settings, or start a new analysis in another "
            "--out folder (or --restart)"
        )
    new = cfg.result_fields()
    if not task_known:
        new.pop("task")
    runfolder.check_same_settings(folder, new)


def load(cfg: SweepConfig) -> LoadedModel:
    """The model of ``cfg`` (a preset's load error names the preset: its model comes from the Hub)."""
    try:
        return load_model(
            cfg.model, cfg.gguf_file, cfg.task, cfg.dtype, cfg.device, cfg.device_map,
            trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
        )  # fmt: skip
    except KnockoutError as e:
        if cfg.preset is None or cfg.preset == "demo":
            raise
        detail = " ".join(str(e).split())  # one line
        raise KnockoutError(
            f"preset {cfg.preset!r} needs the model {cfg.model!r} from the Hugging Face Hub or its local cache "
            f"(and streams {cfg.data!r}): {detail}"
        ) from e


def check_max_length(max_length: int, model: torch.nn.Module, task: str) -> None:
    """Refuse a ``max_length`` beyond a text model's position embeddings (it would fail mid-run)."""
    if task == "image":
        return
    config = text_config(model.config)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # their positions start after the padding index
    if limit and max_length > limit:
        raise KnockoutError(f"--max-length {max_length} exceeds the model's {limit} positions; use at most {limit}")


def model_inputs(loaded: LoadedModel, sites: list[Site], spec: DataSpec) -> ModelInputs:
    """What the batch builders need to know about ``loaded`` (for image models, the pre-out length is measured on
    one collection image)."""
    config = loaded.model.config
    probe = probe_inputs(spec, loaded.task, loaded.processor, config)
    seq = None if probe is None else preout_length(loaded.model, sites, probe)
    return ModelInputs(loaded.task, loaded.processor, config, seq)


def stats_meta(spec: DataSpec, identity: dict, data_id: dict | None = None) -> dict[str, str]:
    """The metadata saved with statistics: the model's identity (with its fingerprint), the data's identity and how
    the collection set was made."""
    meta = {
        "model": json.dumps(identity),
        "data": spec.collection_source,
        "stats_tokens": str(spec.stats_tokens),
        "max_length": str(spec.max_length),
        "stats_skip_first": str(spec.stats_skip_first),
    }
    if data_id is not None:
        meta["data_identity"] = json.dumps(data_id)
    return meta


#: The collection settings a statistics file records (:func:`stats_meta`) and a run compares with its own.
STATS_SETTINGS = ("stats_tokens", "max_length", "stats_skip_first")


def _same_data(a: dict, b: dict) -> bool:
    """Two data identities name the same data: equal contents (sha256) when both have one, else equal records."""
    if isinstance(a, dict) and isinstance(b, dict) and a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return a == b


def stats_differences(meta: dict[str, str], run: Prepared) -> list[str]:
    """How the collection of statistics with metadata ``meta`` differs from what ``run`` would collect: the data
    (by content, so another path to the same file is the same data) and :data:`STATS_SETTINGS`; one phrase each."""
    spec, diffs = run.spec, []
    recorded = json.loads(meta.get("data_identity", "null"))
    if not _same_data(recorded, run.data_id):
        diffs.append(f"data: {_describe_data(recorded)} -> {_describe_data(run.data_id)}")
    for key in STATS_SETTINGS:
        mine = str(getattr(spec, key))
        if meta.get(key) != mine:
            diffs.append(f"{key}: {meta.get(key, 'not recorded')} -> {mine}")
    return diffs


def _describe_data(identity: dict) -> str:
    if not isinstance(identity, dict):
        return repr(identity)
    extra = f" sha256 {identity['sha256'][:12]}" if identity.get("sha256") else ""
    extra += f" revision {identity['revision']}" if identity.get("revision") else ""
    return f"{identity.get('source')!r}{extra}"


def check_stats_source(stats, run: Prepared, source: Path, given: bool) -> None:
    """Raise unless ``stats`` (read from ``source``) are of ``run``'s model: the same architecture and site, and the
    same weights (by fingerprint, whatever path the model was given by). A file given with ``--stats`` (``given``)
    must also be collected on the run's data with its collection settings, unless ``--stats-any-data``."""
    where = f"statistics in {str(source)!r}"
    stats.check_model({k: v for k, v in run.identity.items() if k not in ("name", "fingerprint")}, source=where)
    recorded = json.loads(stats.meta.get("model", "{}")).get("fingerprint")
    same = same_model(recorded, run.identity.get("fingerprint"))
    if same is False:
        raise KnockoutError(
            f"{where} were collected on a model with other weights (fingerprint {describe(recorded)}, this model's "
            f"{describe(run.identity.get('fingerprint'))}). Use statistics collected on this model, or delete the "
            "file so they are recomputed."
        )
    if same is None:
        log.warning("%s record no comparable model fingerprint (%s): the weights cannot be checked", where,
                    describe(recorded))  # fmt: skip
    diffs = stats_differences(stats.meta, run) if given else []
    if diffs and not run.cfg.stats_any_data:
        raise KnockoutError(
            f"{where} were collected differently from this run ({'; '.join(diffs)}): the methods would use "
            "statistics of other data. Drop --stats to collect them with this run's settings, collect a file with "
            "them (`knockout stats`), or pass --stats-any-data to use it anyway (config.json records what it was "
            "collected on)."
        )
    if diffs:
        log.warning("--stats-any-data: using %s although %s", where, "; ".join(diffs))


def stats_provenance(stats, file: str | None) -> dict:
    """What statistics were collected on (their own record, not the run's settings), for config.json."""
    meta = stats.meta
    out = {"file": file, "data": meta.get("data"), "n_tokens": stats.n_tokens, "eps": stats.eps, "limit": stats.limit}
    if "data_identity" in meta:
        out["data_identity"] = json.loads(meta["data_identity"])
    out.update({k: int(meta[k]) if str(meta.get(k, "")).isdigit() else meta.get(k) for k in STATS_SETTINGS})
    try:
        out["model_fingerprint"] = json.loads(meta.get("model", "{}")).get("fingerprint")
    except json.JSONDecodeError:
        out["model_fingerprint"] = None
    return out


def prepare(
    cfg: SweepConfig,
    world: World,
    restart: bool = False,
    loaded: LoadedModel | None = None,
    stats_file: str | Path | None = None,
) -> Prepared:
    """Check, load and measure (see the module docstring). Call it inside the process group (``world``); every
    rank must. ``loaded``: a model already loaded for ``cfg`` (it is not loaded again). ``stats_file``: a
    statistics-only run writing that file (no run folder is checked). A sweep's rank 0 takes the run folder's lock
    (:func:`knockout.runfolder.lock_run`); the caller releases it (:func:`knockout.runfolder.unlock_run`), also
    when this raises."""
    # the model's fingerprint, before loading it when its files are found (a bad --model path stops here, before
    # --restart moves anything); a model object handed in is fingerprinted by its tensors
    if loaded is not None:
        fingerprint = tensors_fingerprint(loaded.model)
    else:
        fingerprint = source_fingerprint(cfg.model, cfg.gguf_file, cfg.revision)
    sweep = stats_file is None
    if world.is_main:  # rank 0 alone locks and may move an old run folder aside (--restart); the others check after
        data_id, folder = check(cfg, restart, stats_file, lock=sweep, fingerprint=fingerprint)
    distributed.barrier()
    if not world.is_main:
        data_id, folder = check(cfg, stats_file=stats_file, fingerprint=fingerprint)
    loaded = loaded or load(cfg)
    if fingerprint is None:  # a hub model that was not in the local cache before loading
        fingerprint = model_fingerprint(cfg.model, cfg.gguf_file, loaded.model, cfg.revision)
        if sweep:
            runfolder.check_model(folder, fingerprint)
    cfg = cfg.for_task(loaded.task)
    if sweep:
        check_settings(folder, cfg)
    check_max_length(cfg.max_length, loaded.model, loaded.task)
    sites = find_sites(loaded.model, cfg.site_module, cfg.n_heads, cfg.site)
    identity = model_identity(cfg.model, loaded.model, sites, fingerprint)
    spec = cfg.data_spec()
    inputs = model_inputs(loaded, sites, spec)
    return Prepared(cfg, loaded, sites, spec, inputs, identity, data_id, world, folder)


def find_all_sites(cfg: SweepConfig, kinds: tuple[str, ...] | None = None) -> tuple[LoadedModel, dict]:
    """The model of ``cfg`` and its sites by kind (``knockout sites``): ``cfg.site`` (with ``cfg.site_module`` and
    ``cfg.n_heads``) and, when ``kinds`` is ``None``, the MLP site too; a kind the model lacks maps to the reason."""
    loaded = load(cfg)
    found: dict[str, list[Site] | str] = {cfg.site: find_sites(loaded.model, cfg.site_module, cfg.n_heads, cfg.site)}
    if kinds is None and cfg.site != "mlp":
        try:
            found["mlp"] = find_sites(loaded.model, kind="mlp")
        except KnockoutError as e:
            found["mlp"] = str(e)
    return loaded, found
