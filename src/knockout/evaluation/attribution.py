"""Attribution patching: a first-order *estimate* of every unit's ablation effect from one backward pass.

For a metric ``M`` of the whole evaluation set (the mean cross-entropy over its scored targets, or, for task prompts
with a correct and an incorrect answer, the mean logit difference) and an ablation that sets neuron ``i`` of a layer's
pre-out to the constant ``c_i`` at every position, Taylor's formula to first order gives::

    M(ablated) - M(unablated)  ~  sum over ablated i, batches b, positions t of  dM/dz[b, t, i] * (c_i - z[b, t, i])
                               =  sum over ablated i of  c_i * G_i - H_i

with ``G_i = sum_{b,t} dM/dz[b,t,i]`` and ``H_i = sum_{b,t} dM/dz[b,t,i] * z[b,t,i]`` taken on the unablated model.
``dM/dz`` is the total derivative (everything downstream of the pre-out recomputed), as in Nanda's attribution
patching and Syed et al. (2023). Since ``G`` and ``H`` do not depend on the constants, one forward and backward pass
per evaluation batch serves every constant method (zero, mean, peak ...) and every unit.

It is an estimate: exact for an ablation that changes the pre-out little, and off by the curvature for larger
changes (whole heads set to a constant far from their values). Reports show it beside the exact effects with its
correlation to them, never in their place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from knockout.data.batch import IGNORE, Batch
from knockout.devices import input_device
from knockout.errors import KnockoutError
from knockout.evaluation.evaluate import forward_scored
from knockout.evaluation.metrics import scored_metrics
from knockout.hooks import edit_preout
from knockout.sites import Site


def metric_name(batches: Sequence[Batch]) -> str:
    """The metric the estimate is of: ``logit_diff`` for contrast batches, else ``ce``."""
    return "logit_diff" if batches and batches[0].contrast is not None else "ce"


def attribution_sums(
    model: torch.nn.Module, sites: Sequence[Site], batches: Sequence[Batch]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(G, H)``, each ``[width]`` float64 (see the module docstring), for the mean metric over all scored
    targets of ``batches``. Runs one forward and one backward pass per batch; the model's weights are not changed
    and no parameter gradient is kept."""
    n_total = sum(int((b.targets != IGNORE).sum()) for b in batches)
    if n_total == 0:
        raise KnockoutError("the evaluation set has no scored targets; give more evaluation data")
    device = input_device(model)
    sums = [(torch.zeros(s.width, dtype=torch.float64), torch.zeros(s.width, dtype=torch.float64)) for s in sites]
    first = min(s.layer for s in sites)
    for batch in batches:
        batch = batch.to(device)
        seen: dict[int, torch.Tensor] = {}

        def keep(site: Site, z: torch.Tensor, seen: dict = seen) -> torch.Tensor | None:
            new = None
            if site.layer == first and not z.requires_grad:  # frozen weights: start the graph here
                new = z = z.detach().requires_grad_(True)
            seen[site.layer] = z
            return new

        with torch.inference_mode(False), torch.enable_grad(), edit_preout(sites, keep):
            logits, targets, contrast = forward_scored(model, batch)
            scored = targets != IGNORE
            s = scored_metrics(logits[scored], targets[scored], None if contrast is None else contrast[scored])
            value = (s.ce if s.logit_diff is None else s.logit_diff).sum() / n_total
            zs = [seen[site.layer] for site in sites]
            grads = torch.autograd.grad(value, zs, allow_unused=True)
        for (g_sum, h_sum), z, g in zip(sums, zs, grads):
            if g is None:
                continue
            g = g.detach().double()
            g_sum += g.sum(dim=tuple(range(g.ndim - 1))).cpu()
            h_sum += (g * z.detach().double()).sum(dim=tuple(range(g.ndim - 1))).cpu()
    return sums


def estimate(sums: Sequence[tuple[torch.Tensor, torch.Tensor]], constants: Sequence[torch.Tensor], neurons) -> float:
    """The estimated change of the metric when ``neurons[l]`` (per layer, indices) are set to ``constants[l]``."""
    total = 0.0
    for (g, h), c, idx in zip(sums, constants, neurons):
        if idx.numel():
            total += float((c.double()[idx] * g[idx] - h[idx]).sum())
    return total
