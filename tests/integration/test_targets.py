"""``--ablate`` sweeps and scans on tiny models, end to end: rows per named set and unit, equal to a direct
evaluation; resume after a kill to the same values; task prompts with a logit difference; the reports; the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import tiny
from knockout import KnockoutError, MethodContext, component_sets, find_sites, get_method
from knockout.cli import main
from knockout.config import SweepConfig
from knockout.data.tasks import eval_batches
from knockout.evaluation import evaluate
from knockout.experiments import engine as targets_module
from knockout.experiments.prepare import model_inputs
from knockout.experiments.runner import run_sweep
from knockout.experiments.scan import run_scan, scan_config
from knockout.loading import LoadedModel
from knockout.reporting.report import write_report
from knockout.reporting.scan import agreement, load_scan, spearman
from knockout.reporting.targets import target_answers
from knockout.runfolder import RunFolder, row_key
from knockout.stats import Statistics


def _llama(positions: int = 64):
    cfg = tf.LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, intermediate_size=64,
        vocab_size=tiny.VOCAB, max_position_embeddings=positions,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    tiny.write_corpus(root / "corpus.txt", n_docs=60)
    lines = [{"prompt": f"{a} and {b} met. {b} gave it to", "correct": f" {a}", "incorrect": f" {b}"}
             for a, b in [("Ann", "Bob"), ("Cy", "Di"), ("Ed", "Flo"), ("Gus", "Hal"), ("Ivy", "Jo")] * 4]  # fmt: skip
    (root / "task.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def _loaded(model=None):
    return LoadedModel(model or _llama(), tiny.tokenizer(), "causal", "tiny-llama", torch.device("cpu"))


COMMON = dict(eval_tokens=80, stats_tokens=300, max_length=24, batch_size=4)


def test_ablate_rows_equal_a_direct_evaluation_of_each_set(root):
    loaded = _loaded()
    spec = "induction=L2.H3,L1.H1;L2:0-5;L0"
    cfg = SweepConfig(
        model="tiny-llama", data=str(root / "corpus.txt"), out=str(root / "ablate"), methods=("zero", "mean", "peak"),
        ablate=spec, **COMMON,
    )  # fmt: skip
    assert cfg.seeds == (0,)  # one seed by default: the sets do not depend on it
    out = Path(run_sweep(cfg, progress=False, loaded=loaded))
    rows = RunFolder(out).row_dicts()
    sites = find_sites(loaded.model)
    sets = component_sets(spec, sites)
    assert len(rows) == 1 + 3 * len(sets)
    stats = Statistics.load(out / "stats.safetensors")
    batches = eval_batches(cfg.data_spec(), model_inputs(loaded, sites, cfg.data_spec()), 0)
    sums = RunFolder(out).stored_sums
    resolved = RunFolder(out).resolved.targets
    for s in sets:
        assert resolved[s.name] == s.record()
        for method in cfg.methods:
            (row,) = [r for r in rows if r["method"] == method and r["target"] == s.name]
            assert row["fraction"] == s.n_ablated / 96 and row["n_ablated"] == s.n_ablated
            ablation = get_method(method)(MethodContext(loaded.model, sites, stats))
            with ablation.ablate(list(s.neurons)):  # a full forward pass, no layers skipped
                m = evaluate(loaded.model, batches, per_doc=True)
            assert (row["ce"], row["top1"], row["n_eval"]) == (m.ce, m.top1, m.n)  # bit for bit
            assert np.array_equal(sums[row_key(method, row["fraction"], 0, s.name)]["ce_sum"], m.doc_sums()["ce_sum"])
    report = write_report(out)
    md = report.with_name("report.md").read_text()
    assert "## The answer, per named set" in md and "Set **induction** (16 neurons" in md
    assert (report.parent / "targets.csv").read_text().count("\n") == 1 + 3 * len(sets)


def test_a_set_renamed_to_other_neurons_is_refused_on_resume(root):
    cfg = SweepConfig(
        model="tiny-llama", data=str(root / "corpus.txt"), out=str(root / "ablate"), methods=("zero", "mean", "peak"),
        ablate="induction=L2.H2", **COMMON,
    )  # fmt: skip
    with pytest.raises(KnockoutError, match="ablated another set under the name 'induction'"):
        run_sweep(cfg, progress=False, loaded=_loaded())


def test_ablate_out_of_range_is_an_error_before_anything_is_written(root):
    cfg = SweepConfig(
        model="tiny-llama", data=str(root / "corpus.txt"), out=str(root / "bad"), ablate="L3.H0", **COMMON
    )
    with pytest.raises(KnockoutError, match="layer 3 is out of range; valid layers 0..2"):
        run_sweep(cfg, progress=False, loaded=_loaded())
    assert not (root / "bad").exists()


def _scan_cfg(root, out, **extra):
    values = dict(model="tiny-llama", data=str(root / "task.jsonl"), out=str(root / out), max_length=40,
                  stats_data=str(root / "corpus.txt"), stats_tokens=300, batch_size=4)  # fmt: skip
    return scan_config(**{**values, **extra})


def test_scan_of_a_task_resumes_after_a_kill_to_the_same_values(root, monkeypatch):
    cfg = _scan_cfg(root, "scan-full", scan={"unit": "head", "attribution": True, "top_k": 3})
    assert cfg.eval_tokens == 8 and cfg.methods == ("zero", "mean", "peak") and cfg.seeds == (0,)
    full = run_scan(cfg, progress=False, loaded=_loaded())
    rows = RunFolder(full).row_dicts()
    assert len(rows) == 1 + 3 * 12 and all(r.get("logit_diff") is not None for r in rows)
    base = next(r for r in rows if r["method"] == "baseline")
    assert base["n_eval"] == 4  # the evaluation part: a fifth of the 20 prompts
    assert not (full / ".knockout.lock").exists()  # the scan released the run folder's lock
    folder = RunFolder(full)
    assert folder.resolved.statistics is not None  # mean and peak used statistics: their provenance is recorded
    assert folder.config.stats_data == str(root / "corpus.txt")
    assert folder.resolved.data_identity["stats"]["source"] == str(root / "corpus.txt")

    # the same scan, killed after 10 rows, then resumed
    killed = _scan_cfg(root, "scan-killed", scan={"unit": "head"})
    add, calls = targets_module.ResultStore.add, []

    def dying(self, row):
        calls.append(1)
        if len(calls) > 10:
            raise KeyboardInterrupt
        add(self, row)

    monkeypatch.setattr(targets_module.ResultStore, "add", dying)
    with pytest.raises(KeyboardInterrupt):
        run_scan(killed, progress=False, loaded=_loaded())
    assert len(RunFolder(root / "scan-killed").row_dicts()) == 10
    monkeypatch.setattr(targets_module.ResultStore, "add", add)
    resumed = run_scan(killed, progress=False, loaded=_loaded())
    key = lambda r: (r["method"], r["target"])  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert sorted(map(strip, RunFolder(resumed).row_dicts()), key=key) == sorted(map(strip, rows), key=key)


def test_scan_report_and_attribution(root):
    out = root / "scan-full"
    data = load_scan(out)
    assert data.metric == "logit_diff" and len(data.units) == 12 and data.k == 3
    pairs = agreement(data)
    assert [(p["method_a"], p["method_b"]) for p in pairs] == [("zero", "mean"), ("zero", "peak"), ("mean", "peak")]
    rows = RunFolder(out).row_dicts()
    eff = {m: {r["target"]: r["delta_logit_diff"] for r in rows if r["method"] == m} for m in ("zero", "mean")}
    units = list(eff["zero"])
    by_hand = [sorted(units, key=lambda u, m=m: -abs(eff[m][u]))[:3] for m in ("zero", "mean")]
    zero_mean = pairs[0]  # recomputed by hand from the rows
    x, y = np.array([eff["zero"][u] for u in units]), np.array([eff["mean"][u] for u in units])
    assert zero_mean["spearman"] == pytest.approx(spearman(x, y))
    assert zero_mean["top_k_overlap"] == len(set(by_hand[0]) & set(by_hand[1]))
    attribution = RunFolder(out).attribution()
    assert attribution["metric"] == "logit_diff" and set(attribution["estimates"]) == {"zero", "mean", "peak"}
    report = write_report(out)  # `knockout report` on a scan folder writes the scan report
    md = report.with_name("report.md").read_text()
    assert "## Does the choice of constant change which components matter most?" in md
    assert md.split("**")[1].split(":")[0] in ("Yes", "No", "Partly")
    assert "ESTIMATE" in md and "Attribution patching" in md
    for name in ("scan.csv", "agreement.csv", "attribution.csv", "heatmap_zero.png", "scatter.png"):
        assert (report.parent / name).is_file()


def test_spearman_matches_a_hand_computation():
    x = np.array([0.1, 0.5, 0.5, -2.0, 3.0])
    y = np.array([1.0, 2.0, 0.0, -1.0, 5.0])
    rx, ry = np.array([2, 3.5, 3.5, 1, 5]), np.array([3, 4, 2, 1, 5])  # average ranks for the tie
    expected = np.corrcoef(rx, ry)[0, 1]
    assert spearman(x, y) == pytest.approx(expected)


def test_cli_sweep_ablate_and_scan(root, tmp_path, capsys):
    model = tiny.save(_llama(positions=128), "causal", tmp_path / "model")
    task, corpus = str(root / "task.jsonl"), str(root / "corpus.txt")
    args = ["-q", "sweep", "--model", model, "--data", task, "--stats-data", corpus, "--methods", "zero,mean",
            "--eval-tokens", "4", "--stats-tokens", "200", "--max-length", "40", "--out", str(tmp_path / "sweep"),
            "--ablate", "pair=L0.H1,L2.H0;L1"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pair" in printed and "logit diff" in printed
    rows = RunFolder(tmp_path / "sweep").row_dicts()
    assert {r["target"] for r in rows} == {"", "pair", "L1"} and all("logit_diff" in r for r in rows)
    csv_header = (tmp_path / "sweep" / "results.csv").read_text().splitlines()[0]
    assert csv_header.endswith("target,logit_diff,delta_logit_diff")
    for ta in target_answers(tmp_path / "sweep"):  # the paired comparison by the logit difference, per set
        row = {m: next(r for r in rows if r["method"] == m and r["target"] == ta.target) for m in ("zero", "mean")}
        (v,) = ta.verdicts.ld
        assert (v.a, v.b) == ("zero", "mean")
        assert v.estimate == pytest.approx(row["zero"]["logit_diff"] - row["mean"]["logit_diff"])
        assert ta.verdicts.leader("ld") == max(("zero", "mean"), key=lambda m: ta.logit_diff[m])
    assert "By the logit difference (baseline " in (tmp_path / "sweep" / "report" / "report.md").read_text()
    args = ["-q", "scan", "--model", model, "--data", corpus, "--unit", "layer", "--eval-tokens", "60",
            "--stats-tokens", "200", "--max-length", "30", "--out", str(tmp_path / "scan")]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "zero" in printed
    rows = RunFolder(tmp_path / "scan").row_dicts()
    assert {r["target"] for r in rows} == {"", "L0", "L1", "L2"} and not any("logit_diff" in r for r in rows)
    assert main(["-q", "scan", "--model", model, "--data", corpus, "--unit", "heads",
                 "--out", str(tmp_path / "scan2")]) == 2  # fmt: skip
    assert "unknown scan unit 'heads'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["ablate", "scan"])
def test_target_rows_whose_sums_do_not_add_up_are_named_then_rerun(root, kind):
    """One policy for every row: stored sums that do not add up to their row (a valid checksum, other values) make
    the row unusable: a report names it and leaves it out, and resuming evaluates it again, to the same sums."""
    from knockout.reporting.targets import target_answers
    from knockout.runfolder import RunFolder, save_doc_sums

    if kind == "ablate":
        cfg = SweepConfig(
            model="tiny-llama", data=str(root / "corpus.txt"), out=str(root / "tamper-ablate"),
            methods=("zero", "mean"), ablate="a=L2.H3;b=L1:0-3", **COMMON,
        )  # fmt: skip

        def run():
            return Path(run_sweep(cfg, progress=False, loaded=_loaded()))
    else:
        cfg = _scan_cfg(root, "tamper-scan", methods=("zero", "mean"), scan={"unit": "layer"})

        def run():
            return Path(run_scan(cfg, progress=False, loaded=_loaded()))

    out = run()
    row = next(r for r in RunFolder(out).row_dicts() if r["target"] and r["method"] == "mean")
    key = row_key("mean", row["fraction"], 0, row["target"])
    good = RunFolder(out).stored_sums[key]
    save_doc_sums(out, "mean", row["fraction"], 0, {**good, "ce_sum": good["ce_sum"] * 1.5}, row["target"])
    folder = RunFolder(out)
    assert key in folder.unusable and key not in folder.doc_sums
    if kind == "ablate":
        (ta,) = [t for t in target_answers(folder, n_boot=50) if t.target == row["target"]]
        assert not ta.verdicts.ce and any("mean (seed 0): their CE is" in n for n in ta.notes)
    else:
        data = load_scan(out)
        assert row["target"] not in data.docs.get("mean", {})
        assert any("do not belong to them" in n and row["target"] in n for n in data.notes)
    rows_before = {(r["method"], r["target"]): r for r in RunFolder(out).row_dicts()}
    run()  # resumed: the row is evaluated again and its sums rewritten
    assert RunFolder(out).unusable == {}
    assert np.array_equal(RunFolder(out).stored_sums[key]["ce_sum"], good["ce_sum"])
    after = {(r["method"], r["target"]): r for r in RunFolder(out).row_dicts()}
    assert {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in after.items()} == {
        k: {f: v for f, v in r.items() if f != "seconds"} for k, r in rows_before.items()
    }
