"""Where a model's inputs go, and which weights are not where the module says: models placed with ``device_map``.

A model loaded with ``device_map`` (``--device-map auto``, accelerate's big-model inference) may have its layers on
several devices, on the CPU, or offloaded to disk. accelerate then wraps modules with hooks that move inputs to
each module's execution device; an offloaded module's parameters sit on the ``meta`` device and are loaded from
the hook's ``weights_map`` for every forward pass. Two consequences for knockout:

- inputs go to the model's *main* device (accelerate's rule: the first device of the map that is neither ``cpu``
  nor ``disk``, else the CPU), not to the device of its first parameter, which may be ``meta``;
- a weight edit on an offloaded module's parameter would edit nothing: :func:`knockout.hooks.fold_constants` uses
  a hook for such layers instead (:func:`is_offloaded`).
"""

from __future__ import annotations

import torch
from torch import nn


def input_device(model: nn.Module) -> torch.device:
    """The device a batch for ``model`` should be on."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        placed = [d for d in device_map.values() if d not in ("cpu", "disk")]
        if not placed:
            return torch.device("cpu")
        return torch.device("cuda", placed[0]) if isinstance(placed[0], int) else torch.device(placed[0])
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's (first floating-point) parameters."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def is_offloaded(module: nn.Module) -> bool:
    """Whether ``module``'s weight is not held by the module (on ``meta``, loaded by an accelerate hook)."""
    weight = getattr(module, "weight", None)
    return weight is not None and weight.device.type == "meta"
