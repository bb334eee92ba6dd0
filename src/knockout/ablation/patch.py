"""Counterfactual patching (``patch``): an ablated neuron takes its value on the counterfactual of the evaluated
prompt, the interchange intervention (Geiger et al. 2021; the activation patching of Wang et al. 2022 and Meng et al.
2022, and MIB's counterfactual ablation).

Each task prompt has a counterfactual (:mod:`knockout.data.prompts`: for ``ioi`` the ABC prompt, the same sentence
with three other names; a task ``.jsonl`` line's ``counterfactual`` field), and evaluation batch ``i`` has a
counterfactual batch ``i`` of the same ``[batch, pos]``, row ``b`` position ``t`` the counterfactual of row ``b``'s
prompt at its position ``t`` (:attr:`MethodContext.counterfactual_batches`,
:func:`knockout.data.tasks.counterfactual_eval_batches`). For each evaluation batch the *unablated* model reads the
counterfactual batch once, capturing every site's pre-out ``z_cf``; the evaluated forward pass then sets

    z[b, t, i] := z_cf[b, t, i]     for the ablated neurons i of each layer

with a forward pre-hook on the out-projection (:func:`knockout.hooks.edit_preout`). Ablating no neuron changes
nothing; patching every neuron from a counterfactual equal to the prompt changes nothing either.

It applies to causal LMs evaluated on task prompts with counterfactuals; constructed without counterfactual batches
it raises :class:`KnockoutError`. It is not in ``--methods all`` (it needs such data): ask for it by name.

Cost. One unablated forward pass per evaluation batch (logits at one position only where the model takes
``logits_to_keep``), cached by batch index for the later rows of the run like resampling's random-input activations
(``ResampleOptions.cache``, ``--no-resample-cache``): ``n_batches * batch * pos * n_layers * width`` values in the
model's dtype (SmolLM2-135M, 64 ioi prompts of ~20 tokens: about 90 MB in float32).
"""

from __future__ import annotations

import torch

from knockout.ablation.methods import MethodContext, register
from knockout.ablation.resample import ActivationReplacement
from knockout.data.batch import Batch
from knockout.errors import KnockoutError


@register("patch")
class PatchAblation(ActivationReplacement):
    """z_i := its value on the evaluated prompt's counterfactual, position by position (task data with those)."""

    tasks = ("causal",)
    replaced_by = "counterfactual"
    in_all = False
    needs_counterfactuals = True

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        if not ctx.counterfactual_batches:
            raise KnockoutError(
                f"method {self.name!r} patches values from each prompt's counterfactual: it needs task prompts with "
                'counterfactuals (--data ioi, or a task .jsonl file with a "counterfactual" field per line) and '
                "their batches in MethodContext.counterfactual_batches "
                "(knockout.data.tasks.counterfactual_eval_batches(spec, inputs)); none were given"
            )

    def counterfactual(self, index: int, batch: Batch) -> Batch:
        """The counterfactual batch of evaluation batch ``index``, checked to align with ``batch`` (same rows and
        positions, same real positions)."""
        cfs = self.ctx.counterfactual_batches
        if not 0 <= index < len(cfs):
            raise KnockoutError(
                f"{self.name}: evaluation batch {index} has no counterfactual batch (there are {len(cfs)}); the "
                "counterfactual batches must be built from the same prompts as the evaluation batches"
            )
        cf = cfs[index]
        if cf.valid.shape != batch.valid.shape or not torch.equal(cf.valid.cpu(), batch.valid.cpu()):
            raise KnockoutError(
                f"{self.name}: counterfactual batch {index} {tuple(cf.valid.shape)} does not align with evaluation "
                f"batch {index} {tuple(batch.valid.shape)} position by position; build both from the same prompts, "
                "batch size and order"
            )
        return cf

    def counterfactual_activations(self, cf: Batch, device) -> list[torch.Tensor]:
        """Per layer, the unablated model's pre-out ``[batch, pos, width]`` on the counterfactual batch ``cf``."""
        from knockout.evaluation.evaluate import _takes_logits_to_keep

        extra = {"logits_to_keep": 1} if _takes_logits_to_keep(type(self.ctx.model)) else {}
        return self.activations_of({k: v.to(device) for k, v in cf.inputs.items()}, **extra)

    def on_batch(self, index: int, batch: Batch) -> None:
        """Make the counterfactual activations of evaluation batch ``index`` current (computed once, then cached)."""
        acts = self._cache.get(index)
        cf = self.counterfactual(index, batch)
        if acts is None:
            acts = self.counterfactual_activations(cf, batch.valid.device)
            if self.use_cache:
                self._cache[index] = acts
        self._current = acts
