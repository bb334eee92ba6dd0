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

``roberta-large`` sets option ``resample_model`` to ``facebook/opt-1.3b``: a masked LM cannot write the random text
of ``resample-text``, so OPT-1.3B (the paper's other text model) writes it. The statistics sizes
(``stats_tokens``), ``max_length`` and that choice are this package's, not the paper's: 100,000
collection tokens for text and 1,000 collection images (197 pre-out positions each) for ViT. The Pile is streamed
(collection from its ``train`` split, evaluation from ``test``); ImageNet-1k is gated on the Hub (accept its terms
and log in with ``huggingface-cli login``); see ``docs/data.md``. Every field can be overridden.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from knockout.errors import KnockoutError
from knockout.experiments.config import DEFAULT_FRACTIONS, SweepConfig

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

    def config(self, **overrides) -> SweepConfig:
        import knockout.ablation  # noqa: F401  (registers every built-in method)
        from knockout.ablation.methods import methods_for

        values = {
            "model": self.model,
            "out": f"runs/{self.name}",
            "data": self.data,
            "task": self.task,
            "methods": tuple(methods_for(self.task, self.options)),
            "fractions": DEFAULT_FRACTIONS,
            "seeds": PAPER_SEEDS,
            "eval_tokens": self.eval_tokens,
            "stats_tokens": self.stats_tokens,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "options": dict(self.options),
        }
        known = {f.name for f in fields(SweepConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise KnockoutError(f"unknown setting(s) {', '.join(unknown)} for preset {self.name!r}")
        return SweepConfig(**{**values, **overrides})


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


def resolve_preset(name: str, **overrides) -> SweepConfig:
    """The :class:`SweepConfig` of preset ``name``, with any field replaced by ``overrides``."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise KnockoutError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    return preset.config(**overrides)
