"""Where the neurons are: the input of each layer's attention output projection (the "pre-out"), or of its MLP's
output projection (the MLP neurons).

The pre-out of layer ``l`` is the concatenation of the per-head outputs softmax(QK^T/sqrt(d))V, shape
``[batch, pos, n_heads * d_head]``, read with a forward *pre*-hook on the output projection (o_proj / out_proj /
c_proj / attention.output.dense ...). A neuron is one of its ``n_heads * d_head`` dimensions; neuron
``head * d_head + j`` is dimension ``j`` of head ``head``.

One row of :data:`SITE_PATTERNS` per family says which module that is. Patterns are matched against the *end* of
module names, so they work for every head class (``OPTForCausalLM``, ``OPTModel``, ``RobertaForMaskedLM``...) and
for composite models whose text model is nested (Gemma 3 multimodal).

The second site, ``kind="mlp"``, is the input of each layer's MLP output projection (down_proj / fc2 / the MLP's
c_proj / dense_4h_to_h / output.dense ...), shape ``[batch, pos, d_mlp]``: act_fn(gate_proj x) * up_proj x for gated
MLPs (Llama, Mistral, Qwen, Gemma), act(fc1 x) otherwise. One row of :data:`MLP_SITE_PATTERNS` per family. An MLP
site has no heads: ``n_heads = 1``, ``d_head = width``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from knockout.errors import KnockoutError

log = logging.getLogger(__name__)

_LLAMA_LIKE = r"layers\.(\d+)\.self_attn\.o_proj"
_BERT_LIKE = r"encoder\.layer\.(\d+)\.attention\.output\.dense"
_VIT_LIKE = r"layers?\.(\d+)\.attention\.(?:o_proj|output\.dense)"

#: model_type -> regex matching the end of the out-projection's module name; group 1 is the layer index.
SITE_PATTERNS: dict[str, str] = {
    "gpt2": r"h\.(\d+)\.attn\.c_proj",
    "gpt_bigcode": r"h\.(\d+)\.attn\.c_proj",
    "opt": r"decoder\.layers\.(\d+)\.self_attn\.out_proj",
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": r"language_model\.(?:model\.)?layers\.(\d+)\.self_attn\.o_proj",
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "starcoder2": _LLAMA_LIKE,
    "phi": r"layers\.(\d+)\.self_attn\.dense",
    "gpt_neox": r"layers\.(\d+)\.attention\.dense",
    "gptj": r"h\.(\d+)\.attn\.out_proj",
    "codegen": r"h\.(\d+)\.attn\.out_proj",
    "bloom": r"h\.(\d+)\.self_attention\.dense",
    "falcon": r"h\.(\d+)\.self_attention\.dense",
    "mpt": r"blocks\.(\d+)\.attn\.out_proj",
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": _BERT_LIKE,
    "distilbert": r"transformer\.layer\.(\d+)\.attention\.out_lin",
    "vit": _VIT_LIKE,
    "deit": _VIT_LIKE,
    "beit": _VIT_LIKE,
    "dinov2": _VIT_LIKE,
}

_LLAMA_MLP = r"layers\.(\d+)\.mlp\.down_proj"
_BERT_MLP = r"encoder\.layer\.(\d+)\.output\.dense"  # the intermediate -> output projection, not attention.output
_VIT_MLP = r"layers?\.(\d+)\.(?:mlp\.fc2|output\.dense)"

#: model_type -> regex matching the end of the MLP output projection's module name (its input: the MLP neurons).
#: The same families as :data:`SITE_PATTERNS`, except mixture-of-experts models (Mixtral), which have no single MLP.
MLP_SITE_PATTERNS: dict[str, str] = {
    "gpt2": r"h\.(\d+)\.mlp\.c_proj",
    "gpt_bigcode": r"h\.(\d+)\.mlp\.c_proj",
    "opt": r"decoder\.layers\.(\d+)\.fc2",
    "llama": _LLAMA_MLP,
    "mistral": _LLAMA_MLP,
    "qwen2": _LLAMA_MLP,
    "qwen3": _LLAMA_MLP,
    "gemma": _LLAMA_MLP,
    "gemma2": _LLAMA_MLP,
    "gemma3_text": _LLAMA_MLP,
    "gemma3": r"language_model\.(?:model\.)?layers\.(\d+)\.mlp\.down_proj",
    "phi3": _LLAMA_MLP,
    "olmo": _LLAMA_MLP,
    "olmo2": _LLAMA_MLP,
    "stablelm": _LLAMA_MLP,
    "starcoder2": r"layers\.(\d+)\.mlp\.c_proj",
    "phi": r"layers\.(\d+)\.mlp\.fc2",
    "gpt_neox": r"layers\.(\d+)\.mlp\.dense_4h_to_h",
    "gptj": r"h\.(\d+)\.mlp\.fc_out",
    "codegen": r"h\.(\d+)\.mlp\.fc_out",
    "bloom": r"h\.(\d+)\.mlp\.dense_4h_to_h",
    "falcon": r"h\.(\d+)\.mlp\.dense_4h_to_h",
    "mpt": r"blocks\.(\d+)\.ffn\.down_proj",
    "bert": _BERT_MLP,
    "roberta": _BERT_MLP,
    "xlm-roberta": _BERT_MLP,
    "camembert": _BERT_MLP,
    "electra": _BERT_MLP,
    "deberta-v2": _BERT_MLP,
    "distilbert": r"transformer\.layer\.(\d+)\.ffn\.lin2",
    "vit": _VIT_MLP,
    "deit": _VIT_MLP,
    "beit": _VIT_MLP,
    "dinov2": r"layers?\.(\d+)\.mlp\.(?:fc2|down_proj|weights_out)",
}

#: Site kinds: the attention pre-out, or the MLP neurons.
SITE_KINDS = ("attention", "mlp")
_TABLES = {"attention": SITE_PATTERNS, "mlp": MLP_SITE_PATTERNS}
_WHAT = {"attention": "attention output projection", "mlp": "MLP output projection"}
_EXAMPLE = {"attention": "model.layers.{i}.self_attn.o_proj", "mlp": "model.layers.{i}.mlp.down_proj"}


@dataclass(frozen=True, eq=False)
class Site:
    """The out-projection of one layer. Its input, ``[batch, pos, n_heads * d_head]``, is the pre-out (``kind
    "attention"``), or the MLP neurons (``kind "mlp"``: ``n_heads = 1``, ``d_head = width``)."""

    layer: int
    name: str
    module: nn.Module
    n_heads: int
    d_head: int
    kind: str = "attention"
    parent: nn.Module | None = None
    """The block that holds the projection (its hidden-states input gives ``[batch, pos]`` where the block flattens
    them before the projection, as OPT's MLP does; see :mod:`knockout.hooks`)."""

    @property
    def width(self) -> int:
        """Number of neurons in this layer: ``n_heads * d_head``."""
        return self.n_heads * self.d_head

    def weight(self) -> torch.Tensor:
        """W_O as ``[d_out, width]`` (out = W_O z + b). A view: writing to it edits the module.

        ``nn.Linear`` stores ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]``, so it is transposed here.
        """
        w = self.module.weight
        return w.T if _is_conv1d(self.module) else w


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _in_features(module: nn.Module, kind: str = "attention") -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if _is_conv1d(module):
        return module.weight.shape[0]
    what = (
        "the pre-out at the input of the attention"
        if kind == "attention"
        else "the MLP neurons at the input of the MLP"
    )
    raise KnockoutError(
        f"{type(module).__name__} is not a Linear or Conv1D layer; knockout reads {what} output projection. "
        "Pass the output projection's path with --site-module."
    )


def text_config(config):
    """The text model's config of ``config`` (the decoder's, for a composite model such as Gemma 3 multimodal),
    or ``config`` itself when it has no separate text config (vision models, older configs)."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def _match(model: nn.Module, pattern: str) -> dict[int, tuple[str, nn.Module]]:
    rx = re.compile(r"(?:^|\.)" + pattern + r"$")
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        m = rx.search(name)
        if m:
            layer = int(m.group(1))
            if layer in found:  # two towers match (e.g. an encoder and a decoder): ambiguous
                return {}
            found[layer] = (name, module)
    if sorted(found) != list(range(len(found))):
        return {}
    return found


def _match_template(model: nn.Module, template: str) -> dict[int, tuple[str, nn.Module]]:
    if "{i}" not in template:
        raise KnockoutError(f"--site-module {template!r} must contain '{{i}}' where the layer index goes")
    modules = dict(model.named_modules())
    found = {}
    i = 0
    while template.format(i=i) in modules:
        found[i] = (template.format(i=i), modules[template.format(i=i)])
        i += 1
    if not found:
        ends = ("o_proj", "out_proj", "c_proj", "dense", "down_proj", "fc2")
        example = next((n for n in modules if n.endswith(ends)), "...")
        raise KnockoutError(
            f"no module matches --site-module {template!r} with {{i}} = 0; module names look like {example!r}"
        )
    return found


def _find_modules(model: nn.Module, site_module: str | None, kind: str) -> dict[int, tuple[str, nn.Module]]:
    """Layer -> (name, module) of the output projections of ``kind`` (see :func:`find_sites`)."""
    table, what, example = _TABLES[kind], _WHAT[kind], _EXAMPLE[kind]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if site_module is not None:
        return _match_template(model, site_module)
    if model_type in table:
        found = _match(model, table[model_type])
        if not found:
            raise KnockoutError(
                f"model_type {model_type!r} is supported but no module matched {table[model_type]!r}; "
                f"name the {what} with --site-module '{example}'"
            )
        return found
    if kind == "mlp" and model_type in SITE_PATTERNS:
        raise KnockoutError(
            f"model_type {model_type!r} has no single MLP output projection (a mixture of experts?); knockout's MLP "
            f"site knows {', '.join(sorted(table))}. Name a Linear layer whose input is the MLP neurons with "
            f"--site-module, or use --site attention"
        )
    candidates: dict[str, dict[int, tuple[str, nn.Module]]] = {}
    for pattern in dict.fromkeys(table.values()):
        found = _match(model, pattern)
        # Two patterns that find the same modules (e.g. ViT's and BERT's on a BERT-like model) are one candidate.
        if found and [n for n, _ in found.values()] not in ([n for n, _ in f.values()] for f in candidates.values()):
            candidates[pattern] = found
    if len(candidates) != 1:
        raise KnockoutError(
            f"unknown architecture {model_type!r}: knockout knows {', '.join(sorted(table))}. "
            f"Name the {what} (the module whose input is "
            + ("the concatenated heads" if kind == "attention" else "the MLP neurons")
            + f") with --site-module, e.g. --site-module '{example}' (Python: find_sites(model, site_module=...))."
        )
    ((pattern, found),) = candidates.items()
    log.warning("model_type %r is not in the %s site table; auto-detected sites with %r", model_type, kind, pattern)
    return found


def _parent(model: nn.Module, name: str) -> nn.Module | None:
    """The module that holds module ``name`` (``None`` for a top-level module)."""
    head, _, _ = name.rpartition(".")
    return model.get_submodule(head) if head else None


def find_sites(
    model: nn.Module, site_module: str | None = None, n_heads: int | None = None, kind: str = "attention"
) -> list[Site]:
    """The sites of ``model``, one per layer, in layer order.

    ``kind="attention"`` (the default): the pre-out, the input of the attention output projection.
    ``kind="mlp"``: the MLP neurons, the input of the MLP output projection; they have no heads (``n_heads = 1``,
    ``d_head = width``), so ``n_heads`` cannot be given.

    ``site_module`` names the output projection explicitly as a template with ``{i}`` for the layer index, e.g.
    ``"model.layers.{i}.self_attn.o_proj"``; otherwise it is looked up from ``config.model_type`` in
    :data:`SITE_PATTERNS` (:data:`MLP_SITE_PATTERNS` for ``kind="mlp"``), and for an unknown type auto-detected when
    exactly one known pattern matches. ``n_heads`` overrides the config's number of attention (query) heads.
    """
    if kind not in SITE_KINDS:
        raise KnockoutError(f"site must be one of {', '.join(SITE_KINDS)}, got {kind!r}")
    found = _find_modules(model, site_module, kind)
    parents = {layer: _parent(model, name) for layer, (name, _) in found.items()}
    if n_heads is not None and n_heads <= 0:
        raise KnockoutError(f"--n-heads must be a positive integer, got {n_heads}")
    if kind == "mlp":
        if n_heads is not None:
            raise KnockoutError("--n-heads applies to the attention site only; MLP neurons have no heads")
        sites = []
        for layer in range(len(found)):
            name, module = found[layer]
            width = _in_features(module, kind)
            sites.append(
                Site(layer=layer, name=name, module=module, n_heads=1, d_head=width, kind="mlp", parent=parents[layer])
            )
        return sites
    config = text_config(getattr(model, "config", None))
    heads = n_heads or getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not heads:
        raise KnockoutError("cannot read the number of attention heads from the config; pass --n-heads")
    sites = []
    for layer in range(len(found)):
        name, module = found[layer]
        width = _in_features(module)
        if width % heads:
            raise KnockoutError(f"{name} has {width} inputs, not a multiple of {heads} heads; pass --n-heads")
        sites.append(
            Site(layer=layer, name=name, module=module, n_heads=heads, d_head=width // heads, parent=parents[layer])
        )
    return sites
