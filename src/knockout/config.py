"""Experiment configuration: one frozen dataclass, validated on creation, saved beside the results as JSON.

Every field is a :func:`knockout.options.setting`: its ``metadata`` holds its help text and, for fields that are
command-line flags, how the CLI parses them (the CLI builds its flags from these fields; names, defaults and help are
not repeated there). The settings of one method or concern are a typed group (:class:`OptimalOptions`,
:class:`ResampleOptions`, :class:`ImageOptions`, :class:`DecideOptions`, :class:`ScanOptions`): a nested object in
a config file, ``--optimal-steps`` etc. on the command line. Everything is validated when the config is made,
before a model is loaded.

A config is read from and written to a file (:meth:`SweepConfig.from_file`, :meth:`SweepConfig.from_dict`,
:meth:`SweepConfig.to_dict`): ``knockout sweep --config sweep.json`` (or ``.toml``, ``.yaml``), and ``config.json`` in a
run folder is such a file (with a ``resolved`` section the run adds: model identity, versions, data identity).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, ClassVar

from knockout.ablation.options import OptimalOptions, ResampleOptions
from knockout.ablation.selection import HEAD_MODES, MODES, validate_fractions
from knockout.components import parse_unit
from knockout.data.images import ImageOptions
from knockout.data.tasks import DataSpec
from knockout.errors import KnockoutError
from knockout.inference.sequential import DecideOptions
from knockout.inputs import MAX_DEPTH, brief, brief_text, check_size, loads_json, one_line, read_text
from knockout.loading import TASKS, parse_device_map
from knockout.options import OptionGroup, check_shapes, default_of, setting
from knockout.sites import SITE_KINDS
from knockout.stats.running import DEFAULT_EPS, DEFAULT_LIMIT, check_hist_params

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = tuple(round(0.1 * i, 10) for i in range(11))
DEFAULT_SEEDS = (0, 1, 2)
#: Seeds of ``--ablate`` runs and scans when none are given: their neuron sets are fixed, so the seed changes only
#: masked-LM masks and resampling draws (constant methods on causal LMs give the same rows for every seed).
TARGETED_SEEDS = (0,)
ALL_METHODS = "all"
AUTO = "auto"
#: Keys of a run folder's config.json that are not settings (what the run resolved and recorded).
RECORD_KEYS = ("resolved",)
#: The flag that alone turns on running a model's own Python code (never a settings file: see read_settings_file).
REMOTE_CODE_FLAG = "--trust-remote-code"


@dataclass(frozen=True)
class ScanOptions(OptionGroup):
    """Settings of ``knockout scan`` (``SweepConfig.scan``); ``unit`` is ``None`` for every other run."""

    prefix: ClassVar[str] = "scan"
    title: ClassVar[str] = "scan"

    unit: str | None = setting(
        None,
        "what to ablate one at a time: head (every attention head), layer (every layer's whole site) or neurons:K "
        "(groups of K consecutive neurons of each layer, for models too wide for single neurons)",
        "scan",
        kind="str",
        flag="--unit",
        affects_results=False,
    )
    attribution: bool = setting(
        False,
        "also compute the attribution-patching estimate of every unit's effect (gradient x (constant - activation), "
        "one forward and backward pass per batch; an estimate, reported beside the exact effects with its "
        "correlation to them)",
        "scan",
        kind="bool",
        flag="--attribution",
        affects_results=False,
    )
    top_k: int = setting(
        10, "units compared between methods in the report (overlap of the top-k)", "scan", kind="int",
        flag="--top-k", affects_results=False,
    )  # fmt: skip

    def __post_init__(self):
        if self.unit is not None:
            self._str("unit")
            parse_unit(self.unit)
        self._bool("attribution")
        self._int("top_k", 1)


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep. Settings that change results are compared when a run is resumed."""

    model: str | None = setting(
        None,
        "hub name (facebook/opt-1.3b), local folder, .gguf file, or built-in name (smollm2-135m, gemma3-270m)",
        "model",
        kind="str",
    )
    out: str = setting(
        "runs/sweep", "run folder: config.json, results.jsonl/csv, stats and selection", kind="str",
        affects_results=False,
    )  # fmt: skip
    data: str = setting(
        "wiki",
        "wiki (built-in Wikipedia paragraphs), a .txt/.jsonl/.json file, an image folder, or a HF datasets name",
        "data",
        kind="str",
    )
    methods: tuple[str, ...] = setting(
        (ALL_METHODS,),
        "comma-separated ablation methods by registry name, or 'all' for every one that applies to the model",
        kind="names",
        affects_results=False,
    )
    fractions: tuple[float, ...] = setting(
        DEFAULT_FRACTIONS, "fractions of neurons to ablate, nested per seed: 0,0.5,1 or 0:1:0.1", kind="floats",
        affects_results=False,
    )  # fmt: skip
    method_fractions: dict = setting(
        {},
        "run some methods at fewer fractions (each a subset of --fractions), e.g. 'optimal=0.5,0.9;resample-text=0.5' "
        "(quote it in a shell); the other methods run at every fraction",
        kind="method_fractions",
        affects_results=False,
    )
    seeds: tuple[int, ...] | str | None = setting(
        None,
        "seeds of the neuron selection (and of masks, random inputs): integers such as 0,1,2, or 'auto' to add neuron "
        "sets at the --decide-fractions until every pair of methods is decided (--decide-* settings; "
        "docs/decisions.md); --ablate runs and scans default to 0 (their neuron sets do not depend on the seed)",
        kind="seeds",
        affects_results=False,
    )
    ablate: str | None = setting(
        None,
        "ablate named components instead of random fractions: a spec such as 'L9.H6,L9.H9' (heads), 'L3:17', "
        "'L3:0-63', 'L5', several sets as 'name=L9.H6,L9.H9;L1.H3', or a .json/.csv file of named sets "
        "(docs/components.md); --fractions is then not used",
        kind="str",
        affects_results=False,
    )
    keep: str | None = setting(
        None,
        "keep named components and ablate every other neuron of the site, with each method: the same spec as "
        "--ablate; per set, the circuit's faithfulness against the full model and nothing kept, and the set's own "
        "ablation beside it (docs/components.md); --fractions is then not used",
        kind="str",
        affects_results=False,
    )
    keep_top: tuple[int, ...] | None = setting(
        None,
        "a faithfulness curve: keep the top K units of --keep-ranking for each K (e.g. 0,1,2,4,8,16,270; 0 keeps "
        "nothing, all of them is the full model), ablating every other neuron with each method",
        kind="ints",
        affects_results=False,
    )
    keep_ranking: str | None = setting(
        None,
        "the order of --keep-top: a scan's run folder, ranked by one method's |effect| (SCAN_DIR:METHOD; default "
        "its first method), or a .txt file of components, most important first (one or more per line, commas)",
        kind="str",
        affects_results=False,
    )
    eval_tokens: int = setting(
        4096,
        "exact number of scored evaluation targets (tokens; images for image models; prompts for task data)",
        kind="int",
    )
    eval_docs: int | None = setting(
        None,
        "causal text: evaluate the first N documents whole (up to --max-length tokens) instead of exactly "
        "--eval-tokens targets: the same documents for every model and tokenizer (two models compared by document)",
        kind="int",
    )
    stats_tokens: int = setting(16384, "non-padding positions of the statistics collection set", "data", kind="int")
    data_revision: str | None = setting(
        None,
        "Hugging Face datasets: the branch, tag or commit to load (config.json records the commit it resolved to)",
        "data",
        kind="str",
    )
    stats_data: str | None = setting(
        None,
        "collect the statistics for mean/peak on this source's collection part instead of --data's (the same kinds "
        "of source as --data, e.g. wiki for task prompts)",
        "data",
        kind="str",
    )
    stats_skip_first: int = setting(
        0,
        "text: leave the first N positions of each collection sequence out of the statistics. The pre-out at "
        "position 0 of a causal LM depends on the first token alone, so documents that start alike put point masses "
        "into the histogram that a fine eps can pick as the peak (docs/design.md)",
        "data",
        kind="int",
    )
    max_length: int = setting(128, "longest sequence, in tokens; longer documents are cut", "data", kind="int")
    batch_size: int = setting(8, "sequences (or images) per forward pass", "data", kind="int")
    sort_by_length: bool = setting(
        False,
        "text: batch sequences of similar length together (less padding, the same scored targets; resampling "
        "results change, as its random inputs are drawn per batch)",
        "data",
        kind="bool",
    )
    eps: float = setting(DEFAULT_EPS, "histogram bin width for the peak", "data", kind="float")
    hist_limit: float | str = setting(
        DEFAULT_LIMIT,
        "histogram window [-limit, limit); values outside are left out of the peak. auto: as wide as the memory caps "
        "allow for this model and eps (docs/centres.md), so no neuron's values are clipped in practice",
        "data",
        kind="float_or_auto",
    )
    selection: str = setting(
        "per-layer",
        "per-layer (the paper's) or global neurons, or whole attention heads: heads-per-layer or heads-global",
        kind="str",
        choices=MODES,
    )
    task: str = setting("auto", "auto (from the model's config), causal, masked or image", "model", kind="str",
                        choices=("auto", *TASKS))  # fmt: skip
    gguf_file: str | None = setting(None, "GGUF file name inside the model folder", "model", kind="str")
    revision: str | None = setting(
        None,
        "hub models: the branch, tag or commit to load (config.json records the commit it resolved to); default: "
        "the main branch",
        "model",
        kind="str",
    )
    site: str = setting(
        "attention",
        "which neurons: attention (the pre-out, input of the attention output projection) or mlp (input of the "
        "MLP output projection: down_proj, fc2, mlp.c_proj, dense_4h_to_h, output.dense)",
        "model",
        kind="str",
        choices=SITE_KINDS,
    )
    site_module: str | None = setting(
        None,
        "out-projection path with {i} for the layer, for unknown architectures, "
        "e.g. 'model.layers.{i}.self_attn.o_proj'",
        "model",
        kind="str",
    )
    n_heads: int | None = setting(None, "override the number of attention heads read from the config", "model",
                                  kind="int")  # fmt: skip
    stats_path: str | None = setting(
        None, "reuse statistics from this file (of the same model) instead of collecting them", kind="str",
        flag="--stats", affects_results=False,
    )  # fmt: skip
    stats_any_data: bool = setting(
        False,
        "with --stats: use the file even when it was collected on other data or with other collection settings "
        "(config.json records what it was collected on)",
        kind="bool",
        affects_results=False,
    )
    trust_remote_code: bool = setting(
        False,
        "run Python code shipped with the model (a folder's or hub repository's own model classes); off by default, "
        "such a model is refused",
        "model",
        kind="bool",
        affects_results=False,
    )
    device: str = setting("auto", "auto, cpu, cuda, cuda:N", "model", kind="str", affects_results=False)
    device_map: str | None = setting(
        None,
        "place a model larger than one device with accelerate: auto, balanced, sequential, or a JSON object of "
        'module -> device (\'{"model.layers.1": "disk", ...}\'); layers may sit on several devices, the CPU or '
        "disk. Default: the whole model on --device",
        "model",
        kind="str",
        affects_results=False,
    )
    dtype: str = setting("auto", "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16", "model",
                         kind="str")  # fmt: skip
    preset: str | None = setting(None, "the preset this config came from (recorded, not compared)",
                                 affects_results=False)  # fmt: skip
    optimal: OptimalOptions = setting(OptimalOptions(), "settings of the optimal method")
    resample: ResampleOptions = setting(ResampleOptions(), "settings of the resampling methods")
    image: ImageOptions = setting(ImageOptions(), "image preprocessing for models without an image processor")
    decide: DecideOptions = setting(
        DecideOptions(), "how --seeds auto adds neuron sets, and the answer's error rate", affects_results=False
    )
    scan: ScanOptions = setting(
        ScanOptions(), "settings of a per-component scan (knockout scan)", affects_results=False
    )

    #: The option groups, by field name.
    recorded: InitVar[bool] = False
    """Made from a run folder's record (:meth:`from_record`): what needs this machine (a component set file, a
    registered method) is not checked again."""

    GROUPS: ClassVar[dict[str, type[OptionGroup]]] = {
        "optimal": OptimalOptions,
        "resample": ResampleOptions,
        "image": ImageOptions,
        "decide": DecideOptions,
        "scan": ScanOptions,
    }

    def __post_init__(self, recorded: bool = False):
        check_shapes(SweepConfig, self)  # a string where a list is expected, a list where a number is...
        if self.preset is not None and not isinstance(self.preset, str):
            raise KnockoutError(f"preset must be a preset's name, got {brief(self.preset)}")
        if self.n_heads is not None and (type(self.n_heads) is not int or self.n_heads < 1):
            raise KnockoutError(f"--n-heads must be a positive integer, got {brief(self.n_heads)}")
        for name, group in self.GROUPS.items():
            object.__setattr__(self, name, group.from_dict(getattr(self, name)))
        if not self.model:
            raise KnockoutError("give a model (--model), or --preset NAME for one of the paper's settings")
        object.__setattr__(self, "fractions", validate_fractions(tuple(self.fractions)))
        object.__setattr__(self, "methods", tuple(self.methods))
        if self.seeds is None:
            object.__setattr__(self, "seeds", TARGETED_SEEDS if self.targeted else DEFAULT_SEEDS)
        if self.seeds != AUTO:
            if isinstance(self.seeds, str):
                raise KnockoutError(f"seeds must be integers or {AUTO!r}, got {self.seeds!r}")
            object.__setattr__(self, "seeds", tuple(_integer(s, "seeds") for s in self.seeds))
        elif self.targeted:
            raise KnockoutError("--seeds auto adds random neuron sets; --ablate, --keep runs and scans have fixed ones")
        if not self.methods:
            raise KnockoutError("give at least one ablation method")
        if len(set(self.methods)) != len(self.methods):
            raise KnockoutError(f"methods are repeated: {self.methods}")
        if ALL_METHODS in self.methods and len(self.methods) > 1:
            raise KnockoutError(f"'{ALL_METHODS}' stands for every applicable method; give it alone")
        object.__setattr__(self, "method_fractions", self._checked_method_fractions())
        if self.sequential:
            extra = [f for f in self.decide.fractions if f not in self.fractions]
            if extra:
                raise KnockoutError(
                    f"--decide-fractions {','.join(f'{f:g}' for f in extra)} not among the fractions "
                    f"{','.join(f'{f:g}' for f in self.fractions)}: sets are added at fractions the sweep runs"
                )
        self.decide.check_docs(self.sequential, self.eval_docs)
        if not self.seeds:
            raise KnockoutError("give at least one seed")
        bad = [s for s in self.fixed_seeds if not 0 <= s < 2**63]
        if bad:
            raise KnockoutError(f"seeds must be integers from 0 to 2**63 - 1 (torch's generator range), got {bad[0]}")
        for name in ("sort_by_length", "stats_any_data", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise KnockoutError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("revision", "data_revision"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise KnockoutError(f"{name} must be a branch, tag or commit name (a non-empty string), got {value!r}")
        self.data_spec()  # validates the data fields
        if "optimal" in self.methods and self.optimal.held_out_tokens > self.stats_tokens // 4:
            raise KnockoutError(
                f"optimal holds out {self.optimal.held_out_tokens} scored targets from every fourth row of the "
                f"{self.stats_tokens}-token collection split, which holds about a quarter of it: raise --stats-tokens "
                f"to at least {4 * self.optimal.held_out_tokens} or lower --optimal-held-out-tokens"
            )
        self._check_targets(recorded)
        check_hist_params(self.eps, self.hist_limit)
        parse_device_map(self.device_map)
        if self.selection not in MODES:
            raise KnockoutError(f"selection must be one of {MODES}, got {self.selection!r}")
        if self.site not in SITE_KINDS:
            raise KnockoutError(f"site must be one of {SITE_KINDS}, got {self.site!r}")
        if self.site != "attention" and self.selection in HEAD_MODES:
            raise KnockoutError(
                f"selection {self.selection!r} chooses whole attention heads; the {self.site} site has no heads"
            )
        if self.task not in ("auto", *TASKS):
            raise KnockoutError(f"unknown task {self.task!r}; use auto, {', '.join(TASKS)}")
        from knockout.ablation.methods import get_method

        for m in self.methods:
            if not m.isascii():  # float() would read peak@١ (another script's 1) as peak@1
                raise KnockoutError(f"unknown ablation method {brief(m)}; method names are ASCII (knockout methods)")
            if m != ALL_METHODS and not recorded:
                get_method(m)

    @property
    def targeted(self) -> bool:
        """Whether the run ablates named components (``--ablate``) or scan units rather than random fractions."""
        return self.ablate is not None or self.scan.unit is not None or self.keeps

    @property
    def keeps(self) -> bool:
        """Whether the run keeps named components (``--keep``) or the top units of a ranking (``--keep-top``)."""
        return self.keep is not None or self.keep_top is not None

    def _check_targets(self, recorded: bool = False) -> None:
        """``--ablate``'s syntax (its ranges are checked against the model's sites when it is loaded; a recorded
        run's set file is not read again: its sets are in the record)."""
        if self.ablate is not None and self.scan.unit is not None:
            raise KnockoutError("a scan ablates its units one at a time; --ablate is for sweeps")
        if self.stats_data is not None and (not isinstance(self.stats_data, str) or not self.stats_data.strip()):
            raise KnockoutError(f"stats_data (--stats-data) must be a data source, got {self.stats_data!r}")
        if self.keeps and (self.ablate is not None or self.scan.unit is not None):
            raise KnockoutError(
                "--keep/--keep-top keep components and ablate the rest; --ablate and scans ablate them: give one"
            )
        if (self.keep_top is None) != (self.keep_ranking is None):
            raise KnockoutError(
                "--keep-top K1,K2,... and --keep-ranking SCAN_DIR[:METHOD] (or a file of components) go together"
            )
        if self.keep_top is not None:
            sizes = [_integer(k, "keep_top") for k in self.keep_top]
            if not sizes or any(k < 0 for k in sizes) or sorted(set(sizes)) != sizes:
                raise KnockoutError(
                    f"--keep-top must be increasing, distinct integers of at least 0, got {list(self.keep_top)}"
                )
            object.__setattr__(self, "keep_top", tuple(sizes))
            if not isinstance(self.keep_ranking, str) or not self.keep_ranking.strip():
                raise KnockoutError(f"--keep-ranking must be a scan folder or a file, got {self.keep_ranking!r}")
        for spec in (self.ablate, self.keep):
            if spec is None:
                continue
            from knockout.components import is_file_spec, parse_spec

            if not (recorded and is_file_spec(spec)):
                parse_spec(spec)
        if self.ablate is not None or self.keeps:
            flag = "--ablate" if self.ablate is not None else "--keep"
            if self.method_fractions:
                raise KnockoutError(f"--method-fractions chooses fractions, which {flag} runs do not use")
            if self.fractions != DEFAULT_FRACTIONS:
                log.warning(
                    "fractions %s are not used: an %s run ablates each named set whole",
                    ",".join(f"{f:g}" for f in self.fractions),
                    flag,
                )

    def _checked_method_fractions(self) -> dict[str, list[float]]:
        """``method_fractions`` with each list validated, sorted, and checked to be a subset of ``fractions``."""
        if not isinstance(self.method_fractions, dict):
            raise KnockoutError(f"method_fractions must map methods to fractions, got {self.method_fractions!r}")
        checked = {}
        for name, fractions in self.method_fractions.items():
            if ALL_METHODS not in self.methods and name not in self.methods:
                raise KnockoutError(
                    f"method_fractions names {name!r}, which is not among the methods {', '.join(self.methods)}"
                )
            fractions = validate_fractions(tuple(fractions))
            extra = [f for f in fractions if f not in self.fractions]
            if extra:
                raise KnockoutError(
                    f"method_fractions of {name!r} has {', '.join(f'{f:g}' for f in extra)}, not among the "
                    f"fractions {','.join(f'{f:g}' for f in self.fractions)}: give a subset (selections are nested "
                    "over --fractions)"
                )
            checked[name] = list(fractions)
        return checked

    @property
    def sequential(self) -> bool:
        """Whether neuron sets are added until the answer is decided (``seeds='auto'``)."""
        return self.seeds == AUTO

    def design(self) -> dict | None:
        """``--seeds auto``: the record of the sequential design (:meth:`DecideOptions.design_record`, over the
        answer's families); ``None`` otherwise."""
        from knockout.inference.sequential import families

        return self.decide.design_record(families(self.decide.fractions), self.eval_docs) if self.sequential else None

    @property
    def fixed_seeds(self) -> tuple[int, ...]:
        """The seeds every method runs at all its fractions: ``seeds``, or with ``seeds='auto'`` the first look's."""
        return tuple(range(self.decide.first)) if self.sequential else self.seeds

    def fractions_of(self, method: str) -> tuple[float, ...]:
        """The fractions at which ``method`` runs: its ``method_fractions`` entry, else every fraction."""
        return tuple(self.method_fractions.get(method, self.fractions))

    # -- reading and writing -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every setting, option groups as nested dicts (what config.json holds, less ``resolved``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, recorded: bool = False, **overrides) -> SweepConfig:
        """The config of ``values`` (a config file's or config.json's contents; its ``resolved`` record is ignored)
        with ``overrides`` on top (an option group's overrides replace only the settings they name); ``recorded``:
        see :meth:`from_record`."""
        if not isinstance(values, dict):
            raise KnockoutError(f"a config must be an object of settings, got {type(values).__name__}")
        merged = merge_settings({k: v for k, v in values.items() if k not in RECORD_KEYS}, overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k if isinstance(k, str) else brief(k) for k in set(merged) - known)
        if unknown:
            raise KnockoutError(
                f"unknown setting(s) {brief_text(', '.join(unknown))}; known: {', '.join(sorted(known))} "
                "(docs/configuration.md)"
            )
        return cls(**merged, recorded=recorded)

    @classmethod
    def from_record(cls, values: dict) -> SweepConfig:
        """The settings a run folder's config.json recorded (its ``resolved`` record is :class:`Resolved`), checked
        as any config except for what needs this machine (see :attr:`recorded`). A setting the record lacks (an
        older version wrote it) takes today's default."""
        return cls.from_dict(values, recorded=True)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> SweepConfig:
        """The config in ``path``: JSON (e.g. a run folder's config.json), TOML or YAML, by its suffix. A file never
        turns on remote code: pass ``trust_remote_code=True`` here (see :func:`read_settings_file`)."""
        trust = overrides.get("trust_remote_code") is True
        return cls.from_dict(read_settings_file(path, trust_remote_code=trust), **overrides)

    def result_fields(self) -> dict:
        """The settings whose change makes stored results incomparable (JSON types: what config.json holds)."""
        return json.loads(json.dumps(result_settings(self.to_dict())))

    def data_spec(self) -> DataSpec:
        """The description of the data this sweep's batches are built from."""
        return DataSpec(
            source=self.data,
            eval_tokens=self.eval_tokens,
            eval_docs=self.eval_docs,
            stats_tokens=self.stats_tokens,
            max_length=self.max_length,
            batch_size=self.batch_size,
            stats_skip_first=self.stats_skip_first,
            image=self.image,
            sort_by_length=self.sort_by_length,
            revision=self.data_revision,
            stats_source=self.stats_data,
        )

    def for_task(self, task: str) -> SweepConfig:
        """This config for a loaded model of ``task``: ``task`` filled in and ``methods='all'`` expanded."""
        if self.task not in ("auto", task):
            raise KnockoutError(f"config task {self.task!r} does not match the loaded model's task {task!r}")
        return dataclasses.replace(self, task=task, methods=resolve_methods(self.methods, task, self.resample))


def _integer(value: Any, name: str) -> int:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and int(value) == value):
        raise KnockoutError(f"{name} must be integers, got {value!r}")
    return int(value)


def default(name: str) -> Any:
    """The default value of :class:`SweepConfig` setting ``name``."""
    return default_of(SweepConfig, name)


def merge_settings(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` on top; an option group (a dict, or an :class:`OptionGroup`) is merged setting
    by setting, so ``{"optimal": {"steps": 5}}`` keeps the base's other optimal settings."""
    out = dict(base)
    for key, value in overrides.items():
        if key in SweepConfig.GROUPS and key in out:
            old = out[key].to_dict() if isinstance(out[key], OptionGroup) else out[key]
            new = value.to_dict() if isinstance(value, OptionGroup) else value
            if isinstance(old, dict) and isinstance(new, dict):
                value = {**old, **new}
        out[key] = value
    return out


def result_settings(values: dict) -> dict:
    """The entries of a config dict (:meth:`SweepConfig.to_dict`, or a stored config.json) whose settings change
    results: every setting with ``affects_results``, and within option groups the same."""
    out = {}
    for f in dataclasses.fields(SweepConfig):
        if not f.metadata.get("affects_results", True) or f.name not in values:
            continue
        value = values[f.name]
        group = SweepConfig.GROUPS.get(f.name)
        if group is not None and isinstance(value, dict):
            keep = {g.name for g in dataclasses.fields(group) if g.metadata.get("affects_results", True)}
            value = {k: v for k, v in value.items() if k in keep}
        out[f.name] = value
    return out


def read_settings_file(path: str | Path, trust_remote_code: bool = False) -> dict:
    """The settings in a ``.json``, ``.toml`` or ``.yaml``/``.yml`` file, as a dict (not yet validated).

    Settings files come from others (a colleague's, a run folder's ``config.json``), so they are read within bounds
    (:mod:`knockout.inputs`: at most 16 MiB, nested at most 64 levels, 100,000 values) and every problem is one line.
    A file never turns on remote code: ``trust_remote_code`` other than false is refused, naming the flag
    ``--trust-remote-code``, unless the caller passes ``trust_remote_code=True`` (the command-line flag or the Python
    argument was given); the key is dropped either way, so the flag or the argument alone decides."""
    path = Path(path)
    where = f"config file {str(path)!r}"
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml", ".yaml", ".yml"):
        if not path.is_file():
            raise KnockoutError(f"{where} does not exist")
        raise KnockoutError(f"{where} should end in .json, .toml, .yaml or .yml")
    if not path.is_file():
        raise KnockoutError(f"{where} does not exist")
    text = read_text(path, "config file")
    if suffix == ".json":
        values = loads_json(text, where)
    elif suffix == ".toml":
        values = _read_toml(text, where)
    else:
        values = _read_yaml(text, where)
    if not isinstance(values, dict):
        raise KnockoutError(f"{where} must hold an object of settings, got {type(values).__name__}")
    check_size(values, where)
    remote = values.pop("trust_remote_code", False)
    if remote is not False and not trust_remote_code:
        shown = "true" if remote is True else brief(remote)
        raise KnockoutError(
            f"{where} sets trust_remote_code to {shown}: a settings file never turns on running a model's "
            f"own Python code; pass {REMOTE_CODE_FLAG} on the command line (Python: trust_remote_code=True) if you "
            "trust that code, or remove the setting"
        )
    return values


def _read_toml(text: str, where: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise KnockoutError("TOML config files need Python 3.11 or later; use JSON") from None
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise KnockoutError(f"{where} nests lists or tables too deeply; at most {MAX_DEPTH} levels are read") from None
    except (tomllib.TOMLDecodeError, ValueError) as e:  # ValueError: an integer beyond Python's digit limit
        raise KnockoutError(f"{where} cannot be read: it is not valid TOML ({brief_text(str(e))})") from None


def _read_yaml(text: str, where: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise KnockoutError(
            f"{where} nests lists or mappings too deeply; at most {MAX_DEPTH} levels are read"
        ) from None
    except yaml.constructor.ConstructorError as e:  # a tag safe_load does not build (!!python/object...)
        raise KnockoutError(
            f"{where} uses a YAML tag knockout does not read ({brief_text(one_line(e.problem or str(e)))}"
            f"{_yaml_line(e)}); settings files hold plain values: strings, numbers, lists and mappings"
        ) from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer beyond Python's digit limit
        problem = getattr(e, "problem", None) or str(e)
        raise KnockoutError(
            f"{where} cannot be read: it is not valid YAML ({brief_text(problem)}{_yaml_line(e)})"
        ) from None


def _yaml_line(e) -> str:
    mark = getattr(e, "problem_mark", None)
    return f", line {mark.line + 1}" if mark is not None else ""


def resolve_methods(methods: tuple[str, ...], task: str, resample: ResampleOptions | None = None) -> tuple[str, ...]:
    """``methods`` with ``'all'`` expanded into every registered method that applies to ``task`` with the
    ``resample`` settings (registration order); a method that applies only with more settings (e.g.
    ``resample-text`` on a masked LM without ``--resample-model``) is left out with a warning."""
    if tuple(methods) != (ALL_METHODS,):
        return tuple(methods)
    from knockout.ablation.methods import METHODS, methods_for

    chosen = methods_for(task, resample)
    skipped = [m for m, cls in METHODS.items() if m not in chosen and cls.in_all and task in cls.tasks]
    if skipped:
        log.warning(
            "leaving out %s for a %s model (see `knockout methods`, e.g. --resample-model)", ", ".join(skipped), task
        )
    return tuple(chosen)


@dataclass(frozen=True)
class Resolved:
    """What a run resolved and recorded beside its settings (config.json's ``resolved``): the loaded model's task,
    identity and revision, its site modules, device and dtype, the versions, the data's identity, the statistics'
    provenance and, for runs of named sets, the sets. A record of an older version lacks some: they read as
    ``None``."""

    task: str | None = None
    positions_used: dict | None = None
    """``eval_scored_fraction`` (the share of computed evaluation positions that are scored) and ``sort_by_length``."""
    model_identity: dict | None = None
    """:func:`knockout.loading.model_identity`: name, model type, site, widths, heads, fingerprint."""
    model_revision: dict | None = None
    site_modules: list[str] | None = None
    device: str | None = None
    dtype: str | None = None
    device_map: dict | None = None
    environment: dict | None = None
    data_identity: dict | None = None
    statistics: dict | None = None
    """Where the statistics came from (:func:`knockout.experiments.prepare.stats_provenance`)."""
    targets: dict | None = None
    """Named sets (``--ablate``, scan units): name -> components, neurons ablated, fraction, digest."""
    design: dict | None = None
    """``--seeds auto``: the sequential design, fixed before its first look
    (:meth:`~knockout.inference.sequential.DecideOptions.design_record`); a resume may not change it."""

    @classmethod
    def from_dict(cls, values: dict | None) -> Resolved:
        """The record of config.json (keys it does not know are left out; a damaged record is an error)."""
        if values is None:
            return cls()
        if not isinstance(values, dict):
            raise KnockoutError(f"the run's resolved record must be an object, got {type(values).__name__}")
        out = {}
        for f in dataclasses.fields(cls):
            value = values.get(f.name)
            expected = dict if "dict" in str(f.type) else list if "list" in str(f.type) else str
            if value is not None and not isinstance(value, expected):
                raise KnockoutError(f"the run's resolved.{f.name} must be a {expected.__name__}, got {value!r}")
            out[f.name] = value
        return cls(**out)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("targets", "design") or v is not None}

    @property
    def identity(self) -> dict:
        """The model identity (``{}`` when not recorded)."""
        return self.model_identity or {}

    @property
    def site_kind(self) -> str:
        return str(self.identity.get("site") or "attention")
