"""The report says how well the centres are determined and which neurons were clipped; the answer notes when a
method's centres are noise-limited and, with both in a run, peak - peak-smooth."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny
from knockout.config import SweepConfig
from knockout.experiments.runner import run_sweep
from knockout.inference.paired import DocSums, paired_difference
from knockout.loading import LoadedModel
from knockout.reporting import centres as CR
from knockout.reporting.answer import run_answer
from knockout.reporting.doc import Doc
from knockout.reporting.report import write_report
from knockout.runfolder import RunFolder, row_key
from knockout.stats import Statistics


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("centres")
    corpus = tiny.write_corpus(root / "corpus.txt", n_docs=60)
    loaded = LoadedModel(tiny.causal_lm("llama"), tiny.tokenizer(), "causal", "tiny-llama", torch.device("cpu"))
    cfg = SweepConfig(
        model="tiny-llama", data=corpus, out=str(root / "run"), methods=("zero", "peak", "peak-smooth"),
        fractions=(0.5,), seeds=(0, 1, 2), eval_tokens=80, stats_tokens=300, max_length=20, batch_size=4,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = Path(run_sweep(cfg, progress=False, loaded=loaded))
    finally:
        torch.set_num_threads(threads)
    return cfg, out


def _independent_determination(path):
    """Per centre: (undetermined, neurons) and the median SE / |centre - mean|, recomputed from the file's tensors
    with numpy."""
    t = load_file(str(path))
    meta = json.loads(json.dumps(Statistics.load(path).half_tokens))
    n_a, n_b = meta
    layers = sorted({int(k.split(".")[0][5:]) for k in t})
    out = {}
    for name in ("peak", "peak-smooth", "median", "mode"):
        se, std, gap = [], [], []
        for i in layers:
            a, b = t[f"layer{i}.half_a.{name}"].numpy(), t[f"layer{i}.half_b.{name}"].numpy()
            count = int(t[f"layer{i}.count"][0])
            se.append(np.abs(a - b) * math.sqrt(n_a * n_b) / (n_a + n_b))
            std.append(np.sqrt(t[f"layer{i}.m2"].numpy() / count))
            gap.append(np.abs((n_a * a + n_b * b) / (n_a + n_b) - t[f"layer{i}.mean"].numpy()))
        se, std, gap = map(np.concatenate, (se, std, gap))
        ok = gap > 0
        out[name] = (int((se > 0.1 * std).sum()), se.size, float(np.median(se[ok] / gap[ok])))
    return out


def test_report_section_and_notes(run):
    cfg, out = run
    path = out / "stats.safetensors"
    section = CR.read_section(path)
    want = _independent_determination(path)
    for name, (undetermined, neurons, ratio) in want.items():
        d = section.determination[name]
        assert (d["undetermined"], d["neurons"]) == (undetermined, neurons)
        assert d["ratio"] == pytest.approx(ratio, rel=1e-9)
    assert section.tokens == Statistics.load(path).n_tokens == sum(section.half_tokens)
    write_report(out)
    text = (out / "report" / "report.md").read_text()
    assert "## How well the centres are determined" in text and "No neuron had a value outside the window" in text
    d = section.determination["peak"]
    assert f"{100 * d['share']:.1f}% ({d['undetermined']} of {d['neurons']})" in text
    # noise-limited: only where the ratio exceeds 0.5, with N (ratio / 0.5)^2 tokens
    notes = CR.noise_notes(path, ["zero", "peak", "peak-smooth"])
    limited = [m for m in ("peak", "peak-smooth") if want[m][2] > 0.5]
    assert limited, "300 tokens should leave some centres noise-limited; the note is not exercised"
    assert len(notes) == len(limited)
    for m, note in zip(limited, notes):
        assert note.startswith(f"{m}'s centres are noise-limited")
        assert f"{math.ceil(section.tokens * (want[m][2] / 0.5) ** 2):,} tokens" in note
    for note in notes:
        assert note in text


def test_answer_notes_peak_minus_peak_smooth(run):
    _, out = run
    answer = run_answer(out, (0.5,))
    note = [n for n in answer.fractions[0].notes if "peak - peak-smooth" in n]
    assert len(note) == 1
    rows = {(r["method"], int(r["seed"])): r for r in RunFolder(out).row_dicts()}
    # the estimate is the mean over seeds of the rows' CE difference (each row's CE is its ratio of sums)
    diff = np.mean([rows[("peak", s)]["ce"] - rows[("peak-smooth", s)]["ce"] for s in (0, 1, 2)])
    assert f"= {diff:+.4f} nats" in note[0]
    sums = RunFolder(out).stored_sums
    sets = {m: [DocSums(**sums[row_key(m, 0.5, s)]) for s in (0, 1, 2)] for m in ("peak", "peak-smooth")}
    d = paired_difference(sets["peak"], sets["peak-smooth"], "ce")
    assert f"[{d.low:+.4f}, {d.high:+.4f}]" in note[0]


def _markdown(section) -> str:
    doc = Doc()
    CR.add(doc, section)
    return "\n".join(doc.md)


def test_clipped_neurons_are_named_per_layer_with_the_worst(tmp_path):
    stats = Statistics([4, 4], eps=0.1, limit=2.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g) * 0.3
    x[:3, 1], x[:7, 2] = 5.0, -9.0  # layer 0: neurons 1 (1.5%) and 2 (3.5%, the worst)
    stats.add(0, x)
    stats.add(1, torch.randn(200, 4, generator=g) * 0.3)
    stats.save(tmp_path / "s.safetensors")
    section = CR.read_section(tmp_path / "s.safetensors")
    assert [(c.layer, c.neurons, c.worst) for c in section.clipped] == [(0, 2, 2)]
    assert section.clipped[0].worst_share == pytest.approx(7 / 200)
    lines = _markdown(section)
    assert "2 neurons in 1 layers had values outside the window" in lines and "| 0 | 2 | 2 | 3.50% |" in lines
    assert "median counts the clipped values" in lines
    assert "no halves' centres" in lines  # made by hand, not collected


def test_a_collection_of_one_batch_says_the_halves_cannot_tell(tmp_path):
    from knockout import collect_stats, find_sites
    from knockout.data.text import causal_batches

    model = tiny.causal_lm("llama")
    g = torch.Generator().manual_seed(0)
    batches = causal_batches([torch.randint(5, tiny.VOCAB, (16,), generator=g).tolist() for _ in range(3)], 4, pad=0)
    assert len(batches) == 1
    collect_stats(model, find_sites(model), batches, progress=False).save(tmp_path / "one.safetensors")
    section = CR.read_section(tmp_path / "one.safetensors")
    assert min(section.half_tokens) == 0 and section.determination == {}
    text = _markdown(section)
    assert "cannot be told" in text and "nan" not in text
