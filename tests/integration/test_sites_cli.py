"""The MLP site and head selection through the CLI, end to end on a tiny Llama saved to a local folder."""

import json

import pytest
from safetensors import safe_open

import knockout.reporting
import tiny
from knockout.cli import main
from knockout.reporting.report import identity
from knockout.runfolder import RunFolder
from knockout.stats import Statistics


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("sites")
    return root, tiny_llama[0], tiny.write_corpus(root / "corpus.txt", n_docs=40)


@pytest.fixture(autouse=True)
def no_figures(monkeypatch):
    """The report's figures are slow on a shared CPU (tested in test_cli): skip drawing them in the sweeps here;
    the one site-dependent part, the histograms' axis label, is drawn and checked by test_sweep_on_the_mlp_site."""
    monkeypatch.setattr(knockout.reporting, "write_report", lambda run_dir, *a, **k: f"{run_dir}/report")


def _sweep(model, corpus, out, *extra):
    return [
        "-q", "sweep", "--model", model, "--data", corpus, "--methods", "zero,mean,peak", "--fractions", "0,0.5,1",
        "--seeds", "0", "--eval-tokens", "60", "--stats-tokens", "200", "--max-length", "30", "--batch-size", "4",
        "--out", str(out), *extra,
    ]  # fmt: skip


def test_sites_lists_both_sites(setup, capsys):
    _, model, _ = setup
    assert main(["sites", "--model", model]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.o_proj  4 heads x 8 = 32 neurons" in out
    assert "model.layers.1.mlp.down_proj  64 neurons" in out
    assert main(["sites", "--model", model, "--site", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "mlp.down_proj" in out and "o_proj" not in out


def test_sweep_on_the_mlp_site(setup, capsys):
    root, model, corpus = setup
    out = root / "mlp"
    assert main(_sweep(model, corpus, out, "--site", "mlp")) == 0
    rows = RunFolder(out).row_dicts()
    assert len(rows) == 1 + 3 * 3
    for r in rows:
        assert r["n_neurons"] == 128 and r["n_ablated"] == {0.0: 0, 0.5: 64, 1.0: 128}[r["fraction"]]
    assert len({round(r["ce"], 6) for r in rows if r["fraction"] == 1.0}) == 3  # the methods differ
    config = json.loads((out / "config.json").read_text())
    assert config["site"] == "mlp" and config["resolved"]["model_identity"]["site"] == "mlp"
    from knockout.reporting.report import write_report  # the real one (the module's is patched out above)

    write_report(out, top_k=1)
    svg = (out / "report" / "atypical.svg").read_text() + (out / "report" / "hist_layers.svg").read_text()
    assert "MLP neuron activation" in svg and "pre-out activation" not in svg  # the histograms' axis names the site
    stats = Statistics.load(out / "stats.safetensors")
    assert stats.widths == [64, 64] and json.loads(stats.meta["model"])["site"] == "mlp"
    shown = identity(RunFolder.with_results(out))
    assert shown["site"] == "mlp" and shown["layers x neurons"] == "2 x 64"
    # statistics of the attention site are refused for the MLP site, and a run folder keeps its site
    path = root / "attention.safetensors"
    assert main(tiny.stats_cmd(model, corpus, 100, path)) == 0
    capsys.readouterr()
    assert main(_sweep(model, corpus, root / "wrong", "--site", "mlp", "--stats", str(path))) == 2
    assert "site: file has 'attention', model has 'mlp'" in capsys.readouterr().err
    assert main(_sweep(model, corpus, out)) == 2
    assert "different settings" in capsys.readouterr().err


def test_sweep_with_head_selection(setup, capsys):
    root, model, corpus = setup
    out = root / "heads"
    assert main(_sweep(model, corpus, out, "--selection", "heads-per-layer", "--methods", "zero")) == 0
    rows = RunFolder(out).row_dicts()
    assert {r["fraction"]: r["n_ablated"] for r in rows if r["method"] == "zero"} == {0.0: 0, 0.5: 32, 1.0: 64}
    with safe_open(str(out / "selection.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"seed0.heads.layer0", "seed0.heads.layer1"}
        assert f.metadata()["mode"] == "heads-per-layer"
    assert main(_sweep(model, corpus, root / "bad", "--site", "mlp", "--selection", "heads-global")) == 2
    assert "has no heads" in capsys.readouterr().err
