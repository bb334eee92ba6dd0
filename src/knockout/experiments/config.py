"""Experiment configuration: one frozen dataclass, validated on creation, saved beside the results as JSON.

Each field's ``metadata`` holds its help text and, for fields that are command-line flags, how the CLI parses them:
the CLI builds its flags from these fields (names, defaults and help are not repeated there).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from knockout.ablation.selection import HEAD_MODES, MODES, validate_fractions
from knockout.data.images import IMAGE_OPTIONS
from knockout.data.tasks import DataSpec
from knockout.errors import KnockoutError
from knockout.loading import TASKS, parse_device_map
from knockout.sites import SITE_KINDS
from knockout.stats.running import DEFAULT_EPS, DEFAULT_LIMIT, check_hist_params

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = tuple(round(0.1 * i, 10) for i in range(11))
ALL_METHODS = "all"


def _field(default: Any, help: str, group: str = "sweep", **cli: Any) -> Any:
    """A config field; ``cli`` keys: ``kind`` (how the flag is parsed: int, float, str, floats, ints, names),
    ``flag`` (when it differs from ``--field-name``), ``choices``."""
    meta = {"help": help, "group": group, **cli}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep. Fields that change results are compared when a run is resumed."""

    model: str | None = _field(
        None,
        "hub name (facebook/opt-1.3b), local folder, .gguf file, or built-in name (smollm2-135m, gemma3-270m)",
        "model",
        kind="str",
    )
    out: str = _field("runs/sweep", "run folder: config.json, results.jsonl/csv, stats and selection", kind="str")
    data: str = _field(
        "wiki",
        "wiki (built-in Wikipedia paragraphs), a .txt/.jsonl/.json file, an image folder, or a HF datasets name",
        "data",
        kind="str",
    )
    methods: tuple[str, ...] = _field(
        (ALL_METHODS,),
        "comma-separated ablation methods by registry name, or 'all' for every one that applies to the model",
        kind="names",
    )
    fractions: tuple[float, ...] = _field(
        DEFAULT_FRACTIONS, "fractions of neurons to ablate, nested per seed: 0,0.5,1 or 0:1:0.1", kind="floats"
    )
    method_fractions: dict = _field(
        {},
        "run some methods at fewer fractions (each a subset of --fractions), e.g. 'optimal=0.5,0.9;resample-text=0.5' "
        "(quote it in a shell); the other methods run at every fraction",
        kind="method_fractions",
    )
    seeds: tuple[int, ...] = _field(
        (0, 1, 2), "seeds of the neuron selection (and of masks, random inputs)", kind="ints"
    )
    eval_tokens: int = _field(
        4096, "exact number of scored evaluation targets (tokens; images for image models)", kind="int"
    )
    stats_tokens: int = _field(16384, "non-padding positions of the statistics collection set", "data", kind="int")
    stats_skip_first: int = _field(
        0,
        "text: leave the first N positions of each collection sequence out of the statistics. The pre-out at "
        "position 0 of a causal LM depends on the first token alone, so documents that start alike put point masses "
        "into the histogram that a fine eps can pick as the peak (docs/design.md)",
        "data",
        kind="int",
    )
    max_length: int = _field(128, "longest sequence, in tokens; longer documents are cut", "data", kind="int")
    batch_size: int = _field(8, "sequences (or images) per forward pass", "data", kind="int")
    eps: float = _field(DEFAULT_EPS, "histogram bin width for the peak", "data", kind="float")
    hist_limit: float = _field(
        DEFAULT_LIMIT, "histogram window [-limit, limit); values outside are left out of the peak", "data", kind="float"
    )
    selection: str = _field(
        "per-layer",
        "per-layer (the paper's) or global neurons, or whole attention heads: heads-per-layer or heads-global",
        kind="str",
        choices=MODES,
    )
    task: str = _field("auto", "auto (from the model's config), causal, masked or image", "model", kind="str",
                       choices=("auto", *TASKS))  # fmt: skip
    gguf_file: str | None = _field(None, "GGUF file name inside the model folder", "model", kind="str")
    site: str = _field(
        "attention",
        "which neurons: attention (the pre-out, input of the attention output projection) or mlp (input of the "
        "MLP output projection: down_proj, fc2, mlp.c_proj, dense_4h_to_h, output.dense)",
        "model",
        kind="str",
        choices=SITE_KINDS,
    )
    site_module: str | None = _field(
        None,
        "out-projection path with {i} for the layer, for unknown architectures, "
        "e.g. 'model.layers.{i}.self_attn.o_proj'",
        "model",
        kind="str",
    )
    n_heads: int | None = _field(None, "override the number of attention heads read from the config", "model",
                                 kind="int")  # fmt: skip
    stats_path: str | None = _field(
        None, "reuse statistics from this file (of the same model) instead of collecting them", kind="str",
        flag="--stats",
    )  # fmt: skip
    device: str = _field("auto", "auto, cpu, cuda, cuda:N", "model", kind="str")
    device_map: str | None = _field(
        None,
        "place a model larger than one device with accelerate: auto, balanced, sequential, or a JSON object of "
        'module -> device (\'{"model.layers.1": "disk", ...}\'); layers may sit on several devices, the CPU or '
        "disk. Default: the whole model on --device",
        "model",
        kind="str",
    )
    dtype: str = _field("auto", "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16", "model",
                        kind="str")  # fmt: skip
    options: dict = _field({}, "method- and task-specific options (resampling, image preprocessing)")

    def __post_init__(self):
        if not self.model:
            raise KnockoutError("give a model (--model), or --preset NAME for one of the paper's settings")
        object.__setattr__(self, "fractions", validate_fractions(tuple(self.fractions)))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.methods:
            raise KnockoutError("give at least one ablation method")
        if len(set(self.methods)) != len(self.methods):
            raise KnockoutError(f"methods are repeated: {self.methods}")
        if ALL_METHODS in self.methods and len(self.methods) > 1:
            raise KnockoutError(f"'{ALL_METHODS}' stands for every applicable method; give it alone")
        object.__setattr__(self, "method_fractions", self._checked_method_fractions())
        if not self.seeds:
            raise KnockoutError("give at least one seed")
        bad = [s for s in self.seeds if not 0 <= s < 2**63]
        if bad:
            raise KnockoutError(f"seeds must be integers from 0 to 2**63 - 1 (torch's generator range), got {bad[0]}")
        self.data_spec()  # validates the data fields
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
            if m != ALL_METHODS:
                get_method(m)

    # Fields a resumed run may change without invalidating stored rows: which rows exist, and where it runs.
    # batch_size is not among them: resampling draws one random input per evaluation batch.
    RESUMABLE_FIELDS = (
        "methods",
        "fractions",
        "method_fractions",
        "seeds",
        "out",
        "device",
        "device_map",
        "stats_path",
    )
    # Options that change only speed, not results.
    SPEED_OPTIONS = ("resample_cache",)

    def _checked_method_fractions(self) -> dict[str, list[float]]:
        """``method_fractions`` with each list validated, sorted, and checked to be a subset of ``fractions``."""
        checked = {}
        for name, fractions in dict(self.method_fractions).items():
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

    def fractions_of(self, method: str) -> tuple[float, ...]:
        """The fractions at which ``method`` runs: its ``method_fractions`` entry, else every fraction."""
        return tuple(self.method_fractions.get(method, self.fractions))

    @classmethod
    def defaults(cls) -> dict:
        """Every field's default value (what a field that a run folder's config lacks meant when it was written)."""
        return {name: default(name) for name in cls.__dataclass_fields__}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def result_fields(self) -> dict:
        """The fields whose change makes stored results incomparable."""
        fields = {k: v for k, v in self.to_dict().items() if k not in self.RESUMABLE_FIELDS}
        fields["options"] = {k: v for k, v in self.options.items() if k not in self.SPEED_OPTIONS}
        return fields

    def data_spec(self) -> DataSpec:
        """The description of the data this sweep's batches are built from."""
        return data_spec(self.__dict__)

    def for_task(self, task: str) -> SweepConfig:
        """This config for a loaded model of ``task``: ``task`` filled in and ``methods='all'`` expanded."""
        if self.task not in ("auto", task):
            raise KnockoutError(f"config task {self.task!r} does not match the loaded model's task {task!r}")
        return dataclasses.replace(self, task=task, methods=resolve_methods(self.methods, task, self.options))


def image_options(options: dict) -> dict:
    """The image-preprocessing entries of ``options`` (used for models without an image processor)."""
    return {k: v for k, v in options.items() if k in IMAGE_OPTIONS}


def data_spec(values: dict[str, Any]) -> DataSpec:
    """A :class:`DataSpec` from :class:`SweepConfig` field values (``knockout stats`` gives only some: the others
    take the config's defaults)."""
    value = lambda name: values[name] if values.get(name) is not None else default(name)  # noqa: E731
    return DataSpec(
        source=value("data"),
        eval_tokens=value("eval_tokens"),
        stats_tokens=value("stats_tokens"),
        max_length=value("max_length"),
        batch_size=value("batch_size"),
        stats_skip_first=value("stats_skip_first"),
        image_options=image_options(value("options")),
        sort_by_length=bool(value("options").get("sort_by_length", False)),
    )


def default(name: str) -> Any:
    """The default value of :class:`SweepConfig` field ``name``."""
    f = SweepConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def resolve_methods(methods: tuple[str, ...], task: str, options: dict | None = None) -> tuple[str, ...]:
    """``methods`` with ``'all'`` expanded into every registered method that applies to ``task`` with ``options``
    (registration order); a method that applies only with more options (e.g. ``resample-text`` on a masked LM
    without ``resample_model``) is left out with a warning."""
    if tuple(methods) != (ALL_METHODS,):
        return tuple(methods)
    from knockout.ablation.methods import METHODS, methods_for

    chosen = methods_for(task, options)
    skipped = [m for m, cls in METHODS.items() if m not in chosen and cls.in_all and task in cls.tasks]
    if skipped:
        log.warning(
            "leaving out %s for a %s model (see `knockout methods`, e.g. --resample-model)", ", ".join(skipped), task
        )
    return tuple(chosen)
