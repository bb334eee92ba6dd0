"""Scoped access to the pre-out: read it, replace it with a hook, or fold constants into W_O.

Every context manager here undoes what it did in ``finally``: hooks are removed and weights restored bit-exactly
(from saved copies, not by subtracting), also when the body raises.

The hooks always see a site's input as ``[batch, pos, width]``. Some blocks flatten batch and position before the
projection (OPT's MLP gives ``fc2`` a ``[batch * pos, width]`` input): there the shape is read from the input of the
site's parent block (:attr:`Site.parent`) on the same forward pass, and the input is viewed as ``[batch, pos,
width]`` (an edit is flattened back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from knockout.devices import input_device, is_offloaded, model_dtype
from knockout.errors import KnockoutError
from knockout.sites import Site

log = logging.getLogger(__name__)


@contextmanager
def _pre_hooks(sites: Sequence[Site], make_hook: Callable[[Site], Callable]) -> Iterator[None]:
    """Register ``make_hook(site)`` as a forward pre-hook on every site's out-projection (and, where the site has a
    parent block, a hook that records the ``[batch, pos]`` of the block's input, for :func:`_unflatten`); remove them
    on exit."""
    handles = []
    try:
        for site in sites:
            shape: dict[str, torch.Size] = {}
            if site.parent is not None:
                handles.append(site.parent.register_forward_pre_hook(_record_shape(shape), with_kwargs=True))
            handles.append(site.module.register_forward_pre_hook(make_hook(site, shape)))
        yield
    finally:
        for h in handles:
            h.remove()


def _record_shape(shape: dict) -> Callable:
    """A pre-hook that keeps the leading ``[batch, pos]`` of a block's hidden-states input in ``shape["lead"]``."""

    def hook(module, args, kwargs):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor) and x.ndim >= 3:
            shape["lead"] = x.shape[:-1]

    return hook


def _unflatten(site: Site, z: torch.Tensor, shape: dict) -> torch.Tensor:
    """``z`` as ``[batch, pos, width]``: a ``[batch * pos, width]`` input is viewed with the ``[batch, pos]`` its
    parent block was called with (``[1, n, width]`` when that is unknown)."""
    if z.ndim != 2:
        return z
    lead = shape.get("lead")
    if lead is not None and lead.numel() == z.shape[0]:
        return z.view(*lead, z.shape[-1])
    return z.unsqueeze(0)


def capture(sites: Sequence[Site], fn: Callable[[Site, torch.Tensor], None]) -> AbstractContextManager[None]:
    """Call ``fn(site, z)`` with each site's pre-out ``z: [batch, pos, width]`` on every forward pass.

    The hook only reads: the model's outputs are bit-identical to running without it.
    """

    def make_hook(site: Site, shape: dict):
        def hook(module, args):
            fn(site, _unflatten(site, args[0], shape))

        return hook

    return _pre_hooks(sites, make_hook)


def edit_preout(
    sites: Sequence[Site], fn: Callable[[Site, torch.Tensor], torch.Tensor | None]
) -> AbstractContextManager[None]:
    """Replace each site's pre-out by ``fn(site, z)`` (``None`` keeps it). The general, hook-based ablation."""

    def make_hook(site: Site, shape: dict):
        def hook(module, args):
            z = args[0]
            new = fn(site, _unflatten(site, z, shape))
            return None if new is None else (new.reshape(z.shape), *args[1:])

        return hook

    return _pre_hooks(sites, make_hook)


def preout_length(model: nn.Module, sites: Sequence[Site], inputs: dict[str, torch.Tensor]) -> int:
    """Sequence length of the pre-out on ``inputs`` (one forward pass of the first row, read at the first site).

    For ViT it is ``(image_size / patch_size) ** 2 + 1``; reading it covers DeiT's extra token and friends.
    """
    device, dtype = input_device(model), model_dtype(model)
    one = {k: v[:1].to(device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    seen: list[int] = []
    with torch.inference_mode(), capture(sites[:1], lambda site, z: seen.append(z.shape[1])):
        model(**one)
    return seen[0]


@contextmanager
def replace_with_constants(
    sites: Sequence[Site], neurons: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Hook-based ``z[..., i] = values[l][i]`` for ``i in neurons[l]``. Slower than :func:`fold_constants`; it is
    the reference the weight edit is tested against, and the fallback for layers whose weights cannot be edited."""

    def fn(site, z):
        idx = neurons[site.layer]
        if idx.numel() == 0:
            return None
        z = z.clone()
        z[..., idx.to(z.device)] = values[site.layer].to(z)[idx.to(z.device)]
        return z

    with edit_preout(sites, fn):
        yield


@contextmanager
def fold_constants(
    sites: Sequence[Site], neurons: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Ablate ``z_i := c_i`` for ``i in neurons[l]`` by editing W_O, at no cost per forward pass.

    With out = W_O z + b, setting z_i to c_i for the chosen i equals zeroing those columns of W_O and adding
    ``W_O[:, i] @ c_i`` to b. A layer without a bias gets a temporary one, removed afterwards.

    ``neurons[l]``: ``[k]`` long indices into layer l's pre-out; ``values[l]``: ``[width]`` constants (only the
    chosen entries are used).

    Layers whose weight the module does not hold (offloaded by accelerate with ``device_map``: the parameter is on
    ``meta`` and the real weight is loaded from the hook's ``weights_map`` for each forward pass) are ablated with
    :func:`replace_with_constants` instead, the same values by a hook; this is logged once per process.
    """
    offloaded = [s for s in sites if is_offloaded(s.module)]
    if offloaded:
        _log_offloaded_once(len(offloaded), len(sites))
        edited = [s for s in sites if not is_offloaded(s.module)]
        with replace_with_constants(offloaded, neurons, values), fold_constants(edited, neurons, values):
            yield
        return
    undo: list[Callable[[], None]] = []
    try:
        with torch.no_grad():
            for site in sites:
                idx = neurons[site.layer]
                if idx.numel() == 0:
                    continue
                w = site.weight()  # [d_out, width] view
                idx = idx.to(w.device)
                cols = w[:, idx].clone()
                c = values[site.layer].to(device=w.device, dtype=torch.float64)[idx]
                if not torch.isfinite(c).all():
                    j = int(idx[~torch.isfinite(c)][0])
                    raise KnockoutError(
                        f"layer {site.layer} neuron {j}: the ablation value {float(values[site.layer][j])} is not "
                        "finite (NaN/inf statistics or a damaged file); nothing was ablated"
                    )
                delta = (cols.to(torch.float64) @ c).to(w.dtype)
                module = site.module
                undo.append(_restore_columns(w, idx, cols))
                w[:, idx] = 0
                if module.bias is None:
                    module.bias = nn.Parameter(delta, requires_grad=False)
                    undo.append(lambda m=module: setattr(m, "bias", None))
                else:
                    saved = module.bias.detach().clone()
                    undo.append(lambda b=module.bias, s=saved: b.data.copy_(s))
                    module.bias.data += delta
        yield
    finally:
        with torch.no_grad():
            for fn in reversed(undo):
                fn()


_logged: set[str] = set()


def _log_offloaded_once(n: int, total: int) -> None:
    if "offloaded" not in _logged:
        _logged.add("offloaded")
        log.info(
            "%d of %d out-projections are offloaded (weights loaded per forward pass): their constant ablation "
            "uses a hook instead of a weight edit",
            n,
            total,
        )


def _restore_columns(w: torch.Tensor, idx: torch.Tensor, cols: torch.Tensor) -> Callable[[], None]:
    def restore():
        w[:, idx] = cols

    return restore
