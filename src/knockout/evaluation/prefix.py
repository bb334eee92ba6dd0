"""Skip the layers below an ablation: reuse their unablated outputs instead of computing them again.

Ablating neurons of layer ``l`` to constants (a weight edit of that layer's out-projection) cannot change what layers
``0 .. l-1`` compute: information flows upwards only. A scan ablates every unit of every layer, one at a time, and
evaluates the same batches each time, so half of all the layer computations of a scan would repeat the unablated
model. :class:`LayerCache` records, during one unablated evaluation, the output of the decoder layers that will be
needed (the one just below each ablated layer); :meth:`LayerCache.skip_below` then replaces the forward of every
decoder layer below layer ``l`` by a stub that returns the recorded output of layer ``l - 1`` for the current batch.
The model's own forward runs unchanged around them (embeddings, masks, the layers from ``l`` on, the head), and
since the recorded outputs are exactly what those layers compute, the logits are the same, bit for bit, as a full
forward pass (tests check this on several families).

It is used for constant methods only (their ablation is a weight edit of the ablated layer); input-dependent methods
run the unablated model themselves (resampling) and are evaluated in full. Decoder layers are found as the
``ModuleList`` items that hold each site's module; a model where that fails (no such list, shared layers, layers
placed by accelerate's ``device_map``) is evaluated in full, which is never wrong, only slower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from knockout.data.batch import Batch
from knockout.sites import Site

log = logging.getLogger(__name__)


def decoder_layers(model: nn.Module, sites: Sequence[Site]) -> list[nn.Module] | None:
    """Per site, the decoder layer that holds it: the item of an ``nn.ModuleList`` on the path to the site's module,
    all items of one list, in order, one per layer. ``None`` when the model is not built that way, or is dispatched
    over devices by accelerate (its hooks move tensors between layers)."""
    if getattr(model, "hf_device_map", None):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    lists = {n: m for n, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    found: list[nn.Module] = []
    parent = None
    for site in sites:
        name = names.get(id(site.module))
        if name is None:
            return None
        holder = None
        for list_name, ml in lists.items():
            prefix = f"{list_name}." if list_name else ""
            if name.startswith(prefix):
                index = name[len(prefix) :].split(".", 1)[0]
                if index.isdigit() and int(index) < len(ml):
                    if holder is None or len(list_name) > len(holder[0]):  # the innermost list
                        holder = (list_name, ml, int(index))
        if holder is None:
            return None
        if parent is None:
            parent = holder[1]
        if holder[1] is not parent or holder[2] != site.layer:
            return None
        found.append(holder[1][holder[2]])
    if len({id(m) for m in found}) != len(found):  # shared layers (one module run several times)
        return None
    return found


def _detached(output):
    """A copy of a layer's output (a tensor, or a tuple/list of them) that later computations cannot change."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, (tuple, list)):
        return type(output)(_detached(o) for o in output)
    return output


class LayerCache:
    """Unablated outputs of chosen decoder layers, per evaluation batch (see the module docstring).

    ``needed``: the layers whose output is kept (``l - 1`` for every lowest ablated layer ``l > 0``). Memory: one
    ``[batch, pos, hidden]`` output per kept layer and evaluation batch."""

    def __init__(self, layers: Sequence[nn.Module], needed: Sequence[int]):
        self.layers = list(layers)
        self.needed = sorted(set(needed))
        self.outputs: dict[int, dict[int, object]] = {j: {} for j in self.needed}
        self.batch = -1

    def on_batch(self, then: Callable[[int, Batch], None] | None = None) -> Callable[[int, Batch], None]:
        """An ``on_batch`` for :func:`knockout.evaluation.evaluate` that tells the cache the batch index (and calls
        ``then``, the method's own, after it)."""

        def hook(index: int, batch: Batch) -> None:
            self.batch = index
            if then is not None:
                then(index, batch)

        return hook

    @contextmanager
    def record(self) -> Iterator[None]:
        """Record the kept layers' outputs of every batch evaluated inside (with :meth:`on_batch` as the
        ``on_batch``). The model must be unablated."""
        handles = []

        def make(j: int):
            def hook(module, args, output):
                self.outputs[j][self.batch] = _detached(output)

            return hook

        try:
            for j in self.needed:
                handles.append(self.layers[j].register_forward_hook(make(j)))
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def skip_below(self, layer: int) -> Iterator[None]:
        """Inside, decoder layers ``0 .. layer - 1`` do not compute: each returns a copy of the recorded output of
        layer ``layer - 1`` for the current batch (only the last one's reaches a layer that computes)."""
        if layer == 0:
            yield
            return
        cached = self.outputs[layer - 1]

        def stub(*args, **kwargs):
            return _detached(cached[self.batch])

        saved = []
        try:
            for j in range(layer):
                module = self.layers[j]
                saved.append((module, module.__dict__.get("forward")))
                module.forward = stub
            yield
        finally:
            for module, forward in saved:
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward
