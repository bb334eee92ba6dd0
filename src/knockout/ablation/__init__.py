"""Ablation methods (registry: zero, mean, peak, resampling ...) and nested neuron selection."""

import knockout.ablation.centres  # noqa: F401  (registers median, mode, peak-nopm and peak@EPS)
import knockout.ablation.optimal  # noqa: F401  (registers optimal)
import knockout.ablation.patch  # noqa: F401  (registers patch)
import knockout.ablation.resample  # noqa: F401  (registers the resample-* methods)
from knockout.ablation.methods import (
    METHODS,
    AblationMethod,
    ConstantAblation,
    MethodContext,
    get_method,
    methods_for,
    register,
    register_parametrised,
)
from knockout.ablation.selection import NeuronSelection, count_for, validate_fractions

__all__ = [
    "METHODS",
    "AblationMethod",
    "ConstantAblation",
    "MethodContext",
    "NeuronSelection",
    "count_for",
    "get_method",
    "methods_for",
    "register",
    "register_parametrised",
    "validate_fractions",
]
