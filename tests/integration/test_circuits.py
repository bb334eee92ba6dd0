"""``--keep`` and ``--keep-top`` runs on a tiny Llama, end to end: kept rows equal ``--ablate`` of the complement bit
for bit, keeping everything gives faithfulness 1 and nothing 0 exactly, ``patch`` rows through the row engine equal a
hand-written interchange hook, the report's files and ``load_run(...).faithfulness``, and what is refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from knockout import KnockoutError, component_sets, find_sites
from knockout.cli import main
from knockout.components import complement
from knockout.config import SweepConfig
from knockout.data.tasks import counterfactual_eval_batches, eval_batches
from knockout.evaluation import Metrics
from knockout.experiments.prepare import model_inputs
from knockout.experiments.runner import run_sweep
from knockout.loading import LoadedModel
from knockout.reporting import load_run
from knockout.runfolder import ALL_DOC_FIELDS, RunFolder, row_key

NAMES = [("Ann", "Bob", "Cid"), ("Dan", "Eve", "Fay"), ("Gus", "Hal", "Ivy"), ("Jon", "Kat", "Lou")]
NAMES += [("Max", "Ned", "Ora")]
COMMON = dict(eval_tokens=8, stats_tokens=300, max_length=40, batch_size=4)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("circuits")
    lines = []
    for i in range(4):
        for a, b, _ in NAMES:
            x, y, z = NAMES[(i + 1) % len(NAMES)]  # counterfactual names of the same length (one token per char)
            lines.append({"prompt": f"{a} and {b} met. {b} gave it to", "correct": f" {a}", "incorrect": f" {b}",
                          "counterfactual": f"{x} and {y} met. {z} gave it to"})  # fmt: skip
    (root / "task.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    heads = [f"L{layer}.H{h}" for layer in (1, 0) for h in (2, 0, 3, 1)]  # a ranking of all 8 heads
    (root / "ranking.txt").write_text("# most important first\n" + "\n".join(heads[:4]) + "\n" + ",".join(heads[4:]))
    return root


def _loaded():
    torch.manual_seed(0)
    return LoadedModel(tiny.causal_lm("llama"), tiny.tokenizer(), "causal", "tiny-llama", torch.device("cpu"))


def _cfg(root, out, **kw) -> SweepConfig:
    return SweepConfig(model="tiny-llama", data=str(root / "task.jsonl"), out=str(root / out), **{**COMMON, **kw})


def _row(rows, method, target):
    (row,) = [r for r in rows if r["method"] == method and r["target"] == target]
    return row


def test_keep_rows_equal_ablate_of_the_complement_bit_for_bit(root):
    loaded = _loaded()
    keep = Path(run_sweep(_cfg(root, "keep", keep="c=L1.H1,L0.H3", methods=("zero", "mean")), False, loaded))
    sites = find_sites(loaded.model)
    (c,) = component_sets("L1.H1,L0.H3", sites)
    rest = complement(c.neurons, sites)
    spec = ",".join(f"L{layer}:{int(i)}" for layer, t in enumerate(rest) for i in t)  # every neuron outside c
    stats = str(keep / "stats.safetensors")
    ablate = Path(run_sweep(_cfg(root, "ablate", ablate=f"rest={spec}", methods=("zero", "mean"), stats_path=stats),
                            False, loaded))  # fmt: skip
    krows, arows = RunFolder(keep).row_dicts(), RunFolder(ablate).row_dicts()
    ksums, asums = RunFolder(keep).stored_sums, RunFolder(ablate).stored_sums
    targets = RunFolder(keep).resolved.targets
    assert targets["keep:c"]["kept"] == {"set": "c"} and targets["keep:none"]["kept"] == {}
    assert targets["keep:c"]["n_ablated"] == sum(int(t.numel()) for t in rest)
    for m in ("zero", "mean"):
        k, a = _row(krows, m, "keep:c"), _row(arows, m, "rest")
        for field in ("top1", "ce", "logit_diff", "n_ablated", "fraction"):
            assert k[field] == a[field], (m, field)
        ks, as_ = ksums[row_key(m, k["fraction"], 0, "keep:c")], asums[row_key(m, a["fraction"], 0, "rest")]
        for field in ALL_DOC_FIELDS:
            assert np.array_equal(ks[field], as_[field]), (m, field)
        assert _row(krows, m, "c")["n_ablated"] == c.n_ablated  # necessity: the set itself ablated
        assert _row(krows, m, "keep:none")["n_ablated"] == 64


def test_keeping_everything_gives_one_and_nothing_zero_exactly(root):
    cfg = _cfg(root, "curve", keep="all=L0,L1", keep_top=(0, 1, 3, 8), keep_ranking=str(root / "ranking.txt"),
               methods=("zero", "mean", "peak"))  # fmt: skip
    out = Path(run_sweep(cfg, False, _loaded(), report=True))
    targets = RunFolder(out).resolved.targets
    assert targets["keep:top3"]["components"] == "L1.H2,L1.H0,L1.H3"
    assert targets["keep:top3"]["kept"] == {"k": 3, "of": 8}
    table = load_run(out).faithfulness
    assert list(table.columns[:6]) == ["method", "set", "k", "metric", "faithfulness", "low"]
    for metric in ("ld", "ce"):
        at = table[table.metric == metric]
        everything = at[at.set == "all"]
        assert len(everything) == 3 and (everything.faithfulness == 1.0).all()
        assert (everything.low == 1.0).all() and (everything.high == 1.0).all()
        assert (at[at.k == 0].faithfulness == 0.0).all() and (at[at.k == 8].faithfulness == 1.0).all()
        assert len(at[at.k.notna()]) == 3 * 4
    report = out / "report"
    for name in ("faithfulness.csv", "faithfulness.json", "faithfulness.png", "faithfulness.svg"):
        assert (report / name).is_file(), name
    data = json.loads((report / "faithfulness.json").read_text())
    assert data["curve"]["sizes"] == [0, 1, 3, 8] and data["curve"]["total"] == 8
    assert {a["method"] for a in data["curve"]["areas"]} == {"zero", "mean", "peak"}
    assert len(data["curve"]["pairs"]) == 2 * 3  # two metrics x three pairs of methods
    assert "task's collection prompts" in data["statistics"] and "every position" in data["positions"]
    text = (report / "report.md").read_text()
    assert "## Circuits: faithfulness" in text and "CPR" in text and "collection prompts" in text


def test_patch_rows_equal_a_hand_written_interchange_hook(root):
    loaded = _loaded()
    cfg = _cfg(root, "patch", keep="c=L1.H1", methods=("patch",))
    out = Path(run_sweep(cfg, False, loaded))
    sites = find_sites(loaded.model)
    (c,) = component_sets("L1.H1", sites)
    spec = cfg.data_spec()
    inputs = model_inputs(loaded, sites, spec)
    batches, cfs = eval_batches(spec, inputs, 0), counterfactual_eval_batches(spec, inputs)
    rows, sums = RunFolder(out).row_dicts(), RunFolder(out).stored_sums
    for target, neurons in (("keep:c", complement(c.neurons, sites)), ("c", list(c.neurons))):
        want = Metrics(per_doc=True)
        for b, cf in zip(batches, cfs):
            logits = tiny.hand_patched_logits(loaded.model, "llama", b.inputs, cf.inputs, neurons)
            want.add(logits, b.targets, b.contrast)
        got = sums[row_key("patch", _row(rows, "patch", target)["fraction"], 0, target)]
        for k, v in want.doc_sums().items():
            torch.testing.assert_close(torch.as_tensor(got[k]), torch.as_tensor(v), rtol=1e-5, atol=1e-5)
    assert RunFolder(out).resolved.data_identity.get("counterfactuals") is None  # a task file: in its sha256


def test_keep_is_refused_with_ablate_fractions_or_patch_without_counterfactuals(root, tmp_path, capsys):
    with pytest.raises(KnockoutError, match="give one"):
        SweepConfig(model="m", keep="L0", ablate="L1")
    with pytest.raises(KnockoutError, match="go together"):
        SweepConfig(model="m", keep_top=(0, 1))
    with pytest.raises(KnockoutError, match="increasing"):
        SweepConfig(model="m", keep_top=(2, 1), keep_ranking="x.txt")
    corpus = tiny.write_corpus(tmp_path / "corpus.txt", 10)
    model = tiny.save(tiny.causal_lm("llama"), "causal", tmp_path / "model")
    base = ["sweep", "--model", model, "--out", str(tmp_path / "run"), "--eval-tokens", "8", "-q"]
    assert main([*base, "--data", str(root / "task.jsonl"), "--keep", "L0", "--fractions", "0.5"]) == 2
    assert "--keep runs do not use" in capsys.readouterr().err
    assert main([*base, "--data", corpus, "--keep", "L0", "--methods", "patch"]) == 2
    assert "needs task prompts with counterfactuals" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the model loaded
    ranking = str(root / "ranking.txt")
    assert main([*base, "--data", corpus, "--keep-top", "0,9", "--keep-ranking", ranking]) == 2
    assert "exceeds the 8 units" in capsys.readouterr().err


def test_the_ioi_counterfactual_generator_is_in_the_data_identity_of_patch_runs_only(tmp_path):
    from knockout.data.prompts import _IOI_ABC
    from knockout.experiments.prepare import check
    from knockout.runfolder import unlock_run

    plain, _ = check(SweepConfig(model="m", data="ioi", out=str(tmp_path / "a"), methods=("zero",), keep="L0"))
    patched, _ = check(SweepConfig(model="m", data="ioi", out=str(tmp_path / "b"), methods=("zero", "patch")))
    assert "counterfactuals" not in plain  # runs without patch keep their identity (and stay resumable)
    assert patched == {**plain, "counterfactuals": _IOI_ABC}
    for name in ("a", "b"):
        unlock_run(tmp_path / name)


def test_an_ioi_run_without_patch_may_add_it(tmp_path):
    from knockout.data.text import data_identity
    from knockout.runfolder import RunFolder, check_data, lock_run, unlock_run, write_config

    recorded = data_identity("ioi")
    lock_run(tmp_path)
    try:
        write_config(tmp_path, {"model": "m", "data": "ioi", "resolved": {"data_identity": recorded}})
    finally:
        unlock_run(tmp_path)
    folder = RunFolder(tmp_path)
    check_data(folder, {**recorded, "counterfactuals": "ioi-abc-v1"})  # added by patch: allowed
    folder.resolved.data_identity["counterfactuals"] = "ioi-abc-v1"  # a patch run ...
    check_data(folder, {k: v for k, v in recorded.items() if k != "counterfactuals"})  # ... resumed without patch
    with pytest.raises(KnockoutError, match="counterfactuals"):  # another generator: patch's rows would differ
        check_data(folder, {**recorded, "counterfactuals": "ioi-abc-v2"})
    with pytest.raises(KnockoutError, match="data differs"):
        check_data(folder, {**recorded, "sha256": "0" * 64})


def test_a_scan_ranks_the_units_of_a_curve(root):
    from knockout.experiments.circuits import read_ranking
    from knockout.experiments.scan import run_scan, scan_config
    from knockout.reporting.scan import load_scan, top_k

    loaded = _loaded()
    scan = run_scan(scan_config(model="tiny-llama", data=str(root / "task.jsonl"), out=str(root / "scan"),
                                methods=("zero", "mean"), **COMMON), progress=False, loaded=loaded)  # fmt: skip
    data = load_scan(scan)
    order, where = read_ranking(f"{scan}:mean")
    assert order == top_k(data.units, data.effects["mean"], 8) and "mean" in where
    assert read_ranking(str(scan))[0] == top_k(data.units, data.effects["zero"], 8)  # the scan's first method
    with pytest.raises(KnockoutError, match="has no method 'peak'"):
        read_ranking(f"{scan}:peak")
    cfg = _cfg(root, "curve-scan", keep_top=(0, 2, 8), keep_ranking=f"{scan}:mean", methods=("zero",))
    out = Path(run_sweep(cfg, False, loaded))
    assert RunFolder(out).resolved.targets["keep:top2"]["components"] == ",".join(order[:2])
