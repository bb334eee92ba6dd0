"""Tiny random models built from configs (2 layers, 4 heads, hidden 32), for every supported family.

Nothing is downloaded. Expectations in tests are always computed from these models' own weights.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97

_COMMON = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=VOCAB)


def _eager(config):
    config._attn_implementation = "eager"
    return config


def causal_lm(family: str) -> torch.nn.Module:
    """A tiny causal LM of ``family``: gpt2, opt, llama (GQA: 4 query heads, 2 kv heads), mistral, gemma3_text,
    gpt_neox, qwen2."""
    if family == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=32, n_head=4, n_layer=2, n_positions=64, vocab_size=VOCAB, bos_token_id=2, eos_token_id=3
        )
    elif family == "opt":
        cfg = tf.OPTConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            ffn_dim=64,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            pad_token_id=1,
        )
    elif family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        cfg = cls(**_COMMON, num_key_value_heads=2, max_position_embeddings=64)
    elif family == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**_COMMON, max_position_embeddings=64)
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(_eager(cfg)).eval()


def masked_lm(family: str = "roberta") -> torch.nn.Module:
    cls = {"roberta": tf.RobertaConfig, "bert": tf.BertConfig}[family]
    cfg = cls(**_COMMON, max_position_embeddings=80, pad_token_id=1 if family == "roberta" else 0)
    torch.manual_seed(0)
    return tf.AutoModelForMaskedLM.from_config(_eager(cfg)).eval()


def vit_classifier(num_labels: int = 5) -> torch.nn.Module:
    cfg = tf.ViTConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    return tf.ViTForImageClassification(_eager(cfg)).eval()


SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]


def tokenizer(kind: str = "causal") -> tf.PreTrainedTokenizerFast:
    """A character-level tokenizer over 92 printable characters + 5 specials = ``VOCAB`` ids.

    ``kind="masked"`` wraps every text in <s> ... </s> (as RoBERTa) and has a mask token.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    chars = [chr(c) for c in range(32, 32 + VOCAB - len(SPECIALS))]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if kind == "masked":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
        )
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        mask_token="<mask>" if kind == "masked" else None,
    )
    return fast


def save(model, kind: str, folder) -> str:
    """Save ``model`` with a matching tokenizer into ``folder`` (a local model folder the CLI can load)."""
    model.save_pretrained(folder)
    if kind in ("causal", "masked"):
        tokenizer(kind).save_pretrained(folder)
    return str(folder)


TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
)


def sweep_args(model, data, out, *extra: str) -> list[str]:
    """The CLI arguments of a small two-seed sweep (zero and peak at 0, 0.5, 1) of ``model`` on ``data`` into ``out``:
    the run the resume, kill and integrity tests start, interrupt and compare."""
    return [
        "-q", "sweep", "--model", str(model), "--data", str(data), "--methods", "zero,peak", "--fractions", "0,0.5,1",
        "--seeds", "0,1", "--eval-tokens", "60", "--stats-tokens", "200", "--max-length", "40", "--batch-size", "4",
        "--out", str(out), *extra,
    ]  # fmt: skip


def write_corpus(path, n_docs: int = 40) -> str:
    """A local .txt corpus of ``n_docs`` blank-line separated documents."""
    import random

    rng = random.Random(0)
    words = TEXT.split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return str(path)


def stats_cmd(model, corpus, n_tokens: int, out, *extra: str) -> list[str]:
    """Arguments of ``knockout -q stats`` on a tiny model and corpus (sequences of 40 tokens, within its positions)."""
    return ["-q", "stats", "--model", str(model), "--data", str(corpus), "--stats-tokens", str(n_tokens),
            "--max-length", "40", "--out", str(out), *extra]  # fmt: skip


# -- every family of the site tables -------------------------------------------------------------------------------
_SIZES = dict(_COMMON, max_position_embeddings=64)
_GQA = dict(num_key_value_heads=2)
#: model_type -> config arguments beyond :data:`_SIZES` (``None``: a builder of its own below).
FAMILY_CONFIGS: dict[str, dict | None] = {
    "gpt2": dict(n_embd=32, n_head=4, n_layer=2, n_positions=64, bos_token_id=2, eos_token_id=3),
    "gpt_bigcode": dict(n_embd=32, n_head=4, n_layer=2, n_positions=64, n_inner=64),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32, pad_token_id=1),
    "llama": _GQA,
    "mistral": _GQA,
    "mixtral": dict(_GQA, num_local_experts=2, num_experts_per_tok=1),
    "qwen2": _GQA,
    "qwen3": dict(_GQA, head_dim=8),
    "gemma": dict(_GQA, head_dim=8),
    "gemma2": dict(_GQA, head_dim=8),
    "gemma3_text": dict(_GQA, head_dim=8),
    "gemma3": None,
    "phi3": dict(_GQA, pad_token_id=0),
    "olmo": {},
    "olmo2": {},
    "stablelm": _GQA,
    "starcoder2": {},
    "phi": {},
    "gpt_neox": {},
    "gptj": dict(n_embd=32, n_head=4, n_layer=2, n_positions=64, rotary_dim=4, n_inner=64),
    "codegen": dict(n_embd=32, n_head=4, n_layer=2, n_positions=64, n_ctx=64, rotary_dim=4, n_inner=64),
    "bloom": dict(n_head=4, n_layer=2),
    "falcon": dict(new_decoder_architecture=False, multi_query=False),
    "mpt": dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64),
    "bert": {},
    "roberta": dict(pad_token_id=1),
    "xlm-roberta": dict(pad_token_id=1),
    "camembert": dict(pad_token_id=1),
    "electra": {},
    "deberta-v2": dict(relative_attention=False, position_biased_input=True),
    "distilbert": dict(dim=32, n_heads=4, n_layers=2, hidden_dim=64),
    "vit": None,
    "deit": None,
    "beit": None,
    "dinov2": None,
}
MASKED_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta-v2", "distilbert")
IMAGE_FAMILIES = ("vit", "deit", "beit", "dinov2")


def family(model_type: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny model of any ``model_type`` of the site tables (2 layers, hidden 32) and inputs for it: token ids
    ``[3, 9]``, or images ``[2, 3, 32, 32]``."""
    torch.manual_seed(0)
    if model_type in IMAGE_FAMILIES:
        sizes = dict(_COMMON, image_size=32, patch_size=8, num_labels=5)
        sizes.pop("vocab_size")
        cfg = _eager(tf.AutoConfig.for_model(model_type, **sizes))
        cls = {"deit": tf.DeiTForImageClassification}.get(model_type, tf.AutoModelForImageClassification)
        model = cls(cfg) if model_type == "deit" else cls.from_config(cfg)
        return model.eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}
    ids = {"input_ids": torch.randint(5, VOCAB, (3, 9))}
    if model_type == "gemma3":  # the multimodal Gemma 3: its text model is nested (language_model)
        text = dict(_SIZES, vocab_size=300, num_key_value_heads=2, head_dim=8)
        vision = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, image_size=32,
                      patch_size=8)  # fmt: skip
        cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                              boi_token_index=297, eoi_token_index=298)  # fmt: skip
        return tf.Gemma3ForConditionalGeneration(_eager(cfg)).eval(), ids
    cfg = _eager(tf.AutoConfig.for_model(model_type, **dict(_SIZES, **FAMILY_CONFIGS[model_type])))
    auto = tf.AutoModelForMaskedLM if model_type in MASKED_FAMILIES else tf.AutoModelForCausalLM
    return auto.from_config(cfg).eval(), ids


# -- a hand-written interchange intervention (patch), shared by test_patch and test_circuits --------------------------
def out_projections(model, family: str) -> list[torch.nn.Module]:
    """The attention out-projections, found by hand (not through knockout's site table)."""
    if family == "gpt2":
        return [block.attn.c_proj for block in model.transformer.h]
    return [layer.self_attn.o_proj for layer in model.model.layers]


@torch.no_grad()
def hand_patched_logits(model, family, inputs, cf_inputs, neurons) -> torch.Tensor:
    """Interchange intervention by hand: record each out-projection's input on ``cf_inputs``, then run ``inputs`` with
    ``z[..., i] := z_cf[..., i]`` for ``i in neurons[l]``, both with plain ``register_forward_pre_hook``."""
    modules = out_projections(model, family)
    recorded: list[torch.Tensor | None] = [None] * len(modules)

    def record(layer):
        def hook(module, args):
            recorded[layer] = args[0].clone()

        return hook

    def patch(layer):
        def hook(module, args):
            z = args[0].clone()
            z[..., neurons[layer]] = recorded[layer][..., neurons[layer]]
            return (z, *args[1:])

        return hook

    for make, run in ((record, cf_inputs), (patch, inputs)):
        handles = [m.register_forward_pre_hook(make(layer)) for layer, m in enumerate(modules)]
        try:
            logits = model(**run).logits
        finally:
            for h in handles:
                h.remove()
    return logits
