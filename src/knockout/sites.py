"""Where the neurons are: the input of each layer's attention output projection (the "pre-out").

The pre-out of layer ``l`` is the concatenation of the per-head outputs softmax(QK^T/sqrt(d))V, shape
``[batch, pos, n_heads * d_head]``, read with a forward *pre*-hook on the output projection (o_proj / out_proj /
c_proj / attention.output.dense ...). A neuron is one of its ``n_heads * d_head`` dimensions; neuron
``head * d_head + j`` is dimension ``j`` of head ``head``.

One row of :data:`SITE_PATTERNS` per family says which module that is. Patterns are matched against the *end* of
module names, so they work for every head class (``OPTForCausalLM``, ``OPTModel``, ``RobertaForMaskedLM``...) and
for composite models whose text model is nested (Gemma 3 multimodal).
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


@dataclass(frozen=True, eq=False)
class Site:
    """The out-projection of one layer. Its input, ``[batch, pos, n_heads * d_head]``, is the pre-out."""

    layer: int
    name: str
    module: nn.Module
    n_heads: int
    d_head: int

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


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if _is_conv1d(module):
        return module.weight.shape[0]
    raise KnockoutError(
        f"{type(module).__name__} is not a Linear or Conv1D layer; knockout reads the pre-out at the input of the "
        "attention output projection. Pass the output projection's path with --site-module."
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
        example = next((n for n in modules if n.endswith(("o_proj", "out_proj", "c_proj", "dense"))), "...")
        raise KnockoutError(
            f"no module matches --site-module {template!r} with {{i}} = 0; module names look like {example!r}"
        )
    return found


def find_sites(model: nn.Module, site_module: str | None = None, n_heads: int | None = None) -> list[Site]:
    """The pre-out sites of ``model``, one per layer, in layer order.

    ``site_module`` names the out-projection explicitly as a template with ``{i}`` for the layer index, e.g.
    ``"model.layers.{i}.self_attn.o_proj"``; otherwise it is looked up from ``config.model_type`` in
    :data:`SITE_PATTERNS`, and for an unknown type auto-detected when exactly one known pattern matches.
    ``n_heads`` overrides the config's number of attention (query) heads.
    """
    config = text_config(getattr(model, "config", None))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if site_module is not None:
        found = _match_template(model, site_module)
    elif model_type in SITE_PATTERNS:
        found = _match(model, SITE_PATTERNS[model_type])
        if not found:
            raise KnockoutError(
                f"model_type {model_type!r} is supported but no module matched {SITE_PATTERNS[model_type]!r}; "
                "name the attention output projection with --site-module 'path.{i}.to.o_proj'"
            )
    else:
        candidates = {p: f for p in dict.fromkeys(SITE_PATTERNS.values()) if (f := _match(model, p))}
        if len(candidates) != 1:
            raise KnockoutError(
                f"unknown architecture {model_type!r}: knockout knows {', '.join(sorted(SITE_PATTERNS))}. "
                "Name the attention output projection (the module whose input is the concatenated heads) with "
                "--site-module, e.g. --site-module 'model.layers.{i}.self_attn.o_proj' "
                "(Python: find_sites(model, site_module=...))."
            )
        ((pattern, found),) = candidates.items()
        log.warning("model_type %r is not in the site table; auto-detected pre-out sites with %r", model_type, pattern)

    if n_heads is not None and n_heads <= 0:
        raise KnockoutError(f"--n-heads must be a positive integer, got {n_heads}")
    heads = n_heads or getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not heads:
        raise KnockoutError("cannot read the number of attention heads from the config; pass --n-heads")
    sites = []
    for layer in range(len(found)):
        name, module = found[layer]
        width = _in_features(module)
        if width % heads:
            raise KnockoutError(f"{name} has {width} inputs, not a multiple of {heads} heads; pass --n-heads")
        sites.append(Site(layer=layer, name=name, module=module, n_heads=heads, d_head=width // heads))
    return sites
