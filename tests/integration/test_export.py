"""``knockout export``: a run's constants keyed for TransformerLens, nnsight (HF module paths) and plain safetensors.

The exported constants, applied by another tool's own mechanism (a plain PyTorch forward pre-hook on the HF module;
TransformerLens's ``hook_z`` / ``hook_post`` on a ``TransformerBridge``), reproduce knockout's rows (CE to 1e-5),
whose ablation is a weight edit: the two mechanisms are independent. The tiny GPT-2 gets random biases, so the value
bias b_V (TransformerLens's ``fold_value_biases``) matters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file

import tiny
from knockout.cli import main
from knockout.config import SweepConfig
from knockout.data.batch import IGNORE
from knockout.data.tasks import ModelInputs, eval_batches
from knockout.errors import KnockoutError
from knockout.experiments.runner import run_sweep
from knockout.export import export_constants, write_export
from knockout.runfolder import RunFolder
from knockout.stats import Statistics, centres

FRACTION = 0.5
SEEDS = (0, 1)


def _gpt2_with_biases(folder) -> str:
    model = tiny.causal_lm("gpt2")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # HF initialises biases to 0; random ones make b_V (and LN's bias) matter
                p.normal_(0, 0.5)
    return tiny.save(model, "causal", folder)


def _config(model: str, corpus: str, out, **kw) -> SweepConfig:
    values = dict(
        model=model, data=corpus, methods=("mean", "peak", "optimal"), fractions=(0.0, FRACTION), seeds=SEEDS,
        eval_tokens=160, stats_tokens=320, max_length=40, batch_size=4, device="cpu", out=str(out),
        optimal={"steps": 3, "lr": 0.5, "held_out_tokens": 40},
    )  # fmt: skip
    values.update(kw)
    return SweepConfig(**values)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny GPT-2 sweep (mean, peak, optimal at 0.5; two seeds): its config and folder."""
    root = tmp_path_factory.mktemp("export")
    model = _gpt2_with_biases(root / "model")
    corpus = tiny.write_corpus(root / "corpus.txt", n_docs=40)
    cfg = _config(model, corpus, root / "run")
    return cfg, Path(run_sweep(cfg, progress=False))


def _rows(out) -> dict:
    return {(r["method"], r["fraction"], r["seed"]): r for r in RunFolder(out).row_dicts()}


def _ablated(out, seed: int, widths: list[int]) -> list[torch.Tensor]:
    """Per layer, the neurons the sweep ablated at FRACTION for ``seed``: the first round(f * width) of the stored
    random order (read from selection.safetensors, not recomputed by knockout)."""
    orders = load_file(str(out / "selection.safetensors"))
    return [orders[f"seed{seed}.layer{i}"][: int(FRACTION * w + 0.5)] for i, w in enumerate(widths)]


def _hf(cfg: SweepConfig):
    model = tf.AutoModelForCausalLM.from_pretrained(cfg.model).eval()
    tok = tf.AutoTokenizer.from_pretrained(cfg.model)
    return model, tok


def _ce(forward, batches) -> tuple[float, float]:
    """CE and top-1 over the scored targets of ``batches``, computed by hand from ``forward(batch)``'s logits."""
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            logits = forward(b)
            scored = b.targets != IGNORE
            lg, tg = logits[scored].double(), b.targets[scored]
            total += float(F.cross_entropy(lg, tg, reduction="sum"))
            correct += int((lg.argmax(-1) == tg).sum())
            n += int(scored.sum())
    return total / n, correct / n


def _pre_hook_ce(model, batches, constants: dict, ablated: dict) -> tuple[float, float]:
    """Apply ``constants`` (module path -> ``[width]``) to the neurons ``ablated`` (module path -> indices) with
    plain ``register_forward_pre_hook`` on each module: the way a user of nnsight or plain PyTorch would."""
    handles = []
    for path, values in constants.items():

        def hook(module, args, values=values, idx=ablated[path]):
            z = args[0].clone()
            z[..., idx] = values[idx].to(z.dtype)
            return (z, *args[1:])

        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    try:
        return _ce(lambda b: model(**b.inputs).logits, batches)
    finally:
        for h in handles:
            h.remove()


def _batches(cfg: SweepConfig, model, tok, seed: int = 0):
    return eval_batches(cfg.data_spec(), ModelInputs("causal", tok, model.config), seed)


@pytest.mark.parametrize("method", ["mean", "peak"])
def test_a_plain_pre_hook_with_exported_constants_gives_the_rows(run, method):
    cfg, out = run
    model, tok = _hf(cfg)
    constants = export_constants(out, method, "nnsight")
    paths = [name for name, _ in model.named_modules() if name.endswith("attn.c_proj")]
    assert list(constants) == paths  # keyed by the HF module path of each out-projection, in layer order
    rows = _rows(out)
    for seed in SEEDS:
        batches = _batches(cfg, model, tok, seed)
        ablated = dict(zip(paths, _ablated(out, seed, [v.numel() for v in constants.values()])))
        ce, top1 = _pre_hook_ce(model, batches, constants, ablated)
        assert ce == pytest.approx(rows[(method, FRACTION, seed)]["ce"], abs=1e-5)
        assert top1 == pytest.approx(rows[(method, FRACTION, seed)]["top1"], abs=1e-9)


def test_exported_optimal_constants_with_their_masks_give_the_optimal_rows(run):
    cfg, out = run
    model, tok = _hf(cfg)
    exported = export_constants(out, "optimal", "nnsight")
    paths = [name for name, _ in model.named_modules() if name.endswith("attn.c_proj")]
    rows = _rows(out)
    for seed in SEEDS:
        prefix = f"seed{seed}/fraction{FRACTION:g}/"
        constants = {p: exported[prefix + p] for p in paths}
        masks = {p: exported[prefix + p + "/ablated"] for p in paths}
        expected = _ablated(out, seed, [v.numel() for v in constants.values()])
        for p, idx in zip(paths, expected):  # the mask is the neuron set the sweep ablated
            assert torch.equal(masks[p].nonzero().flatten(), idx.sort().values)
        ablated = {p: masks[p].nonzero().flatten() for p in paths}
        ce, _ = _pre_hook_ce(model, _batches(cfg, model, tok, seed), constants, ablated)
        assert ce == pytest.approx(rows[("optimal", FRACTION, seed)]["ce"], abs=1e-5)
    assert not any(k.startswith(f"seed{SEEDS[0]}/fraction0/") for k in exported)  # nothing is ablated at 0


def test_layouts_and_metadata(run, tmp_path):
    cfg, out = run
    stats = Statistics.load(out / "stats.safetensors")
    tl = export_constants(out, "peak", "transformerlens")
    flat = export_constants(out, "peak", "safetensors")
    assert list(tl) == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert list(flat) == ["layer0", "layer1"]
    for layer, peaks in enumerate(stats.peaks()):
        assert tl[f"blocks.{layer}.attn.hook_z"].shape == (4, 8)  # [n_heads, d_head]
        # neuron head * d_head + j of the flat pre-out is [head, j] of hook_z
        assert torch.equal(tl[f"blocks.{layer}.attn.hook_z"][2, 5], peaks[2 * 8 + 5])
        assert torch.equal(flat[f"layer{layer}"], peaks)
    median = export_constants(out, "median", "safetensors")  # any constant method of the registry
    for layer, s in enumerate(stats.layers):
        assert torch.equal(median[f"layer{layer}"], centres.median(s).float())
    path = write_export(out, "peak", "transformerlens", tmp_path / "peak.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert {k: f.get_tensor(k) for k in f.keys()}.keys() == tl.keys()
    settings = json.loads(meta["statistics"])
    assert (settings["eps"], settings["limit"]) == (stats.eps, stats.limit)  # the window used (auto: a number)
    assert (settings["stats_tokens"], settings["data"], settings["max_length"]) == (320, cfg.data, 40)
    assert meta["model"] == cfg.model and json.loads(meta["model_identity"])["widths"] == [32, 32]
    assert (meta["tool"], meta["method"], meta["site"]) == ("transformerlens", "peak", "attention")


def test_cli_export(run, tmp_path, capsys):
    _, out = run
    assert main(["export", str(out), "--format", "nnsight", "--method", "mean"]) == 0
    written = load_file(str(out / "export" / "mean.nnsight.safetensors"))
    want = export_constants(out, "mean", "nnsight")
    assert written.keys() == want.keys() and all(torch.equal(written[k], want[k]) for k in want)
    assert "transformer.h.0.attn.c_proj" in capsys.readouterr().out
    assert main(["export", str(out), "--format", "safetensors", "--method", "resample-tokens"]) == 2
    assert "does not ablate to constants" in capsys.readouterr().err
    with pytest.raises(KnockoutError, match="unknown export format"):
        export_constants(out, "peak", "pyvene")
    with pytest.raises(KnockoutError, match="no config.json"):
        export_constants(tmp_path, "peak", "nnsight")


# -- TransformerLens ------------------------------------------------------------------------------------------------
def _bridge(cfg: SweepConfig, compat: dict | None = None):
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    model, tok = _hf(cfg)
    bridge = bridge_mod.TransformerBridge.boot_transformers(cfg.model, hf_model=model, tokenizer=tok, device="cpu")
    if compat is not None:
        bridge.enable_compatibility_mode(disable_warnings=True, **compat)
    return bridge, model, tok


def _tl_ce(bridge, batches, constants: dict, masks: dict) -> float:
    hooks = [
        (name, lambda x, hook, c=c, m=masks[name]: torch.where(m, c.to(x.dtype), x)) for name, c in constants.items()
    ]

    def forward(b):
        return bridge.run_with_hooks(b.inputs["input_ids"], attention_mask=b.inputs["attention_mask"], fwd_hooks=hooks)

    return _ce(forward, batches)[0]


def _hook_z_masks(out, seed: int) -> dict:
    masks = {}
    for layer, idx in enumerate(_ablated(out, seed, [32, 32])):
        m = torch.zeros(32, dtype=torch.bool)
        m[idx] = True
        masks[f"blocks.{layer}.attn.hook_z"] = m.view(4, 8)  # neuron head * d_head + j -> [head, j]
    return masks


@pytest.mark.parametrize("method", ["mean", "peak"])
def test_transformerlens_hook_z_with_exported_constants_gives_the_rows(run, method):
    cfg, out = run
    bridge, model, tok = _bridge(cfg)
    constants = export_constants(out, method, "transformerlens")
    rows = _rows(out)
    for seed in SEEDS:
        ce = _tl_ce(bridge, _batches(cfg, model, tok, seed), constants, _hook_z_masks(out, seed))
        assert ce == pytest.approx(rows[(method, FRACTION, seed)]["ce"], abs=1e-5)


def test_transformerlens_compatibility_mode_needs_the_folded_value_bias(run):
    """With HookedTransformer processing (``enable_compatibility_mode()``, ``fold_value_biases=True``), hook_z lacks
    the value bias (and LayerNorm's bias through W_V): knockout's constants minus that folded b_V give the row; the
    constants as they are do not. With ``fold_value_biases=False`` they apply unchanged."""
    cfg, out = run
    constants = export_constants(out, "peak", "transformerlens")
    want = _rows(out)[("peak", FRACTION, 0)]["ce"]

    bridge, model, tok = _bridge(cfg, {"fold_value_biases": False})
    assert _tl_ce(bridge, _batches(cfg, model, tok), constants, _hook_z_masks(out, 0)) == pytest.approx(want, abs=1e-5)

    hf, _ = _hf(cfg)  # the folded value bias, from the unprocessed HF weights (GPT-2: c_attn = [W_Q | W_K | W_V])
    folded = {}
    for layer, block in enumerate(hf.transformer.h):
        w_v, b_v = block.attn.c_attn.weight[:, 64:96], block.attn.c_attn.bias[64:96]
        folded[f"blocks.{layer}.attn.hook_z"] = (b_v + block.ln_1.bias @ w_v).detach().view(4, 8)
    bridge, model, tok = _bridge(cfg, {})
    batches = _batches(cfg, model, tok)
    shifted = {k: c - folded[k] for k, c in constants.items()}
    assert _tl_ce(bridge, batches, shifted, _hook_z_masks(out, 0)) == pytest.approx(want, abs=1e-5)
    assert abs(_tl_ce(bridge, batches, constants, _hook_z_masks(out, 0)) - want) > 1e-4


def test_mlp_site_exports_hook_post_for_transformerlens(tmp_path):
    """``--site mlp``: ``blocks.{L}.mlp.hook_post``, flat; TransformerLens's hook on it reproduces the row."""
    model = _gpt2_with_biases(tmp_path / "model")
    corpus = tiny.write_corpus(tmp_path / "corpus.txt", n_docs=40)
    cfg = _config(model, corpus, tmp_path / "run", methods=("peak",), seeds=(0,), site="mlp")
    out = Path(run_sweep(cfg, progress=False))
    constants = export_constants(out, "peak", "transformerlens")
    assert list(constants) == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert constants["blocks.0.mlp.hook_post"].shape == (128,)  # GPT-2's MLP: 4 * 32
    bridge, hf, tok = _bridge(cfg)
    masks = {}
    for layer, idx in enumerate(_ablated(out, 0, [128, 128])):
        masks[f"blocks.{layer}.mlp.hook_post"] = torch.zeros(128, dtype=torch.bool).index_fill_(0, idx, True)
    ce = _tl_ce(bridge, _batches(cfg, hf, tok), constants, masks)
    assert ce == pytest.approx(_rows(out)[("peak", FRACTION, 0)]["ce"], abs=1e-5)


def test_the_examples_of_docs_export_md_run_and_agree_with_knockout(run):
    """The plain pre-hook and the TransformerLens examples of docs/export.md, run on this run folder, give the same
    logits, and those of knockout's own (weight-edit) ablation of the same neurons with the same constants."""
    import re

    pytest.importorskip("transformer_lens")
    from knockout import MethodContext, NeuronSelection, find_sites, get_method, load_model

    cfg, out = run
    doc = (Path(__file__).parents[2] / "docs" / "export.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "lm_eval" not in b]
    assert len(blocks) == 2 and all('run = "runs/demo"' in b for b in blocks)
    logits = []
    for block in blocks:
        namespace: dict = {}
        exec(compile(block.replace('run = "runs/demo"', f"run = {str(out)!r}"), "docs/export.md", "exec"), namespace)
        logits.append(namespace["ablated_logits"])
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)

    loaded = load_model(cfg.model, device="cpu")
    sites = find_sites(loaded.model)
    peak = get_method("peak")(MethodContext(loaded.model, sites, Statistics.load(out / "stats.safetensors")))
    inputs = loaded.processor("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad(), peak.ablate(NeuronSelection.for_sites(sites, seed=0).at(FRACTION)):
        torch.testing.assert_close(loaded.model(**inputs).logits, logits[0], rtol=1e-5, atol=1e-5)
