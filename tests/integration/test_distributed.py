"""Data-parallel statistics and evaluation (knockout.distributed) equal a single-process run.

Two CPU processes with the gloo backend (started like torchrun: MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE on the
loopback interface) each run this file as a script on their share of the same batches; the test process computes
the single-process result itself and compares. The helpers are also checked without processes.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

if __name__ == "__main__":  # a worker rank: find the tiny-model helpers as conftest does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist

import knockout
import tiny
from knockout import KnockoutError, collect_stats, distributed, evaluate, find_sites
from knockout.data.batch import IGNORE, Batch
from knockout.data.text import causal_batches
from knockout.evaluation.metrics import Metrics
from knockout.stats import LayerStats, Statistics
from knockout.stats.running import merge_moments

EPS, LIMIT = 0.002, 0.25  # narrow window: some values are clipped, so under/over are exercised
WORLD = 2
TIMEOUT_S = 120


def _batches():
    """8 right-padded causal batches of deterministic random ids (the same in every process)."""
    rng = random.Random(7)
    seqs = [[rng.randrange(5, tiny.VOCAB) for _ in range(rng.randint(3, 20))] for _ in range(23)]
    return causal_batches(seqs, batch_size=3, pad=0)


def _unscored_second(batches):
    """The first two batches, the second with nothing scored: with two ranks, rank 1's share has no targets."""
    b = batches[1]
    return [batches[0], Batch(b.inputs, b.valid, torch.full_like(b.targets, IGNORE))]


@contextmanager
def _one_thread():
    """Same thread count as the workers, so that activations are computed the same way bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# -- worker (one rank) ----------------------------------------------------------------------------------------------
def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    assert distributed.init_from_env(timeout=datetime.timedelta(seconds=60))
    try:
        rank, size = distributed.world()
        assert (rank, size) == (int(os.environ["RANK"]), WORLD)
        assert distributed.is_main() == (rank == 0)
        model = tiny.causal_lm("llama")
        sites = find_sites(model)
        batches = _batches()
        mine = distributed.shard(batches)
        local = collect_stats(model, sites, mine, eps=EPS, limit=LIMIT, progress=False)
        stats = distributed.all_reduce_statistics(local)
        for s in stats.layers:  # ordinary tensors: further merges outside inference mode work
            assert not any(getattr(s, f).is_inference() for f in ("mean", "m2", "min", "max", "hist", "under", "over"))
            s.under += 0
        metrics = distributed.all_reduce_metrics(evaluate(model, mine))
        seen = []
        wrapped = distributed.evaluate_sharded(
            model, batches, on_batch=lambda i, b: seen.append([i, b.inputs["input_ids"].tolist()])
        )
        # one batch for two ranks: rank 1 has no tokens and no scored targets
        small = distributed.collect_stats_sharded(model, sites, batches[:1], eps=EPS, limit=LIMIT)
        small_metrics = distributed.evaluate_sharded(model, batches[:1])
        # per-document sums, gathered in batch order; also when a rank's share has documents but no targets
        parts = {"docs": batches, "docs_small": batches[:1], "docs_unscored": _unscored_second(batches)}
        for name, part in parts.items():
            m = distributed.evaluate_sharded(model, part, per_doc=True)
            np.savez(out / f"{name}{rank}.npz", total=[m.n, m.n_correct], **m.doc_sums())
        stats.save(out / f"stats{rank}.safetensors")
        local.save(out / f"local{rank}.safetensors")
        small.save(out / f"small{rank}.safetensors")
        sharded = distributed.collect_stats_sharded(model, sites, batches, eps=EPS, limit=LIMIT)
        sharded.save(out / f"sharded{rank}.safetensors")
        report = {
            "local_ranges": [[s.k_lo, s.n_bins] for s in local.layers],
            "metrics": [metrics.n, metrics.n_correct, metrics.ce_sum],
            "wrapped": [wrapped.n, wrapped.n_correct, wrapped.ce_sum],
            "small_metrics": [small_metrics.n, small_metrics.n_correct, small_metrics.ce_sum],
            "seen": seen,
        }
        (out / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        distributed.shutdown()


# -- helpers without processes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_covers_every_item_exactly_once(world_size):
    for n in range(10):
        items = [f"item{i}" for i in range(n)]
        shares = [distributed.shard(items, r, world_size) for r in range(world_size)]
        union = [x for share in shares for x in share]
        assert sorted(union) == sorted(items) and len(union) == n
        assert [distributed.shard_indices(n, r, world_size) for r in range(world_size)] == [
            list(range(r, n, world_size)) for r in range(world_size)
        ]
    with pytest.raises(ValueError):
        distributed.shard([1], 2, 2)


def test_single_process_is_a_no_op(monkeypatch):
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() is False
    assert not torch_dist.is_initialized()
    stats, metrics = Statistics([4]), Metrics(3, 1, 2.5)
    assert distributed.all_reduce_statistics(stats) is stats and distributed.all_reduce_metrics(metrics) is metrics


def test_init_from_env_needs_the_launcher_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(KnockoutError, match="MASTER_ADDR"):
        distributed.init_from_env()
    assert not torch_dist.is_initialized()


def _layer(lo: float, hi: float, n: int, seed: int) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    s = LayerStats(3, eps=0.01, limit=1.0)
    s.add(lo + (hi - lo) * torch.rand(n, 3, generator=g, dtype=torch.float64))
    return s


def test_the_shared_moment_update_is_layerstats_merge_and_exact_into_nothing():
    a, b = _layer(-0.3, 0.7, 37, 3), _layer(0.2, 0.9, 91, 4)
    n, mean, m2 = merge_moments(a.count, a.mean, a.m2, b.count, b.mean, b.m2)
    a.merge(b)
    assert n == a.count and torch.equal(mean, a.mean) and torch.equal(m2, a.m2)
    zero = torch.zeros(3, dtype=torch.float64)  # merging into nothing gives the other side exactly
    n, mean, m2 = merge_moments(0, zero, zero, b.count, b.mean, b.m2)
    assert n == b.count and torch.equal(mean, b.mean) and torch.equal(m2, b.m2)


# -- two gloo processes ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path) -> list[subprocess.Popen]:
    return _launch_script(Path(__file__), [str(out)])


def _launch_script(script: Path, args: list[str]) -> list[subprocess.Popen]:
    """Start ``WORLD`` processes of ``python script *args`` with torchrun's environment (one per rank)."""
    src = Path(knockout.__file__).resolve().parents[1]  # the knockout this test imported
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(WORLD),
        PYTHONPATH=os.pathsep.join([str(src), str(Path(tiny.__file__).resolve().parent)]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TQDM_DISABLE="1",
    )
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    return [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]


def _wait(procs: list[subprocess.Popen]) -> list[str]:
    deadline, logs = time.monotonic() + TIMEOUT_S, []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log}"
    return logs


def _assert_same_statistics(got: Statistics, want: Statistics, exact_moments: bool = False) -> None:
    assert got.widths == want.widths and (got.eps, got.limit) == (want.eps, want.limit)
    for g, w in zip(got.layers, want.layers):
        assert (g.count, g.k_lo, g.n_bins) == (w.count, w.k_lo, w.n_bins)
        for name in ("hist", "under", "over", "min", "max"):
            assert torch.equal(getattr(g, name), getattr(w, name)), name
        if exact_moments:
            assert torch.equal(g.mean, w.mean) and torch.equal(g.m2, w.m2)
        else:
            torch.testing.assert_close(g.mean, w.mean, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(g.var, w.var, rtol=1e-12, atol=1e-15)


@pytest.mark.skipif(
    not (torch_dist.is_available() and torch_dist.is_gloo_available()), reason="torch built without gloo"
)
def test_two_gloo_ranks_equal_one_process(tmp_path):
    procs = _launch(tmp_path)
    try:  # the single-process reference, computed while the workers run
        model = tiny.causal_lm("llama")
        sites = find_sites(model)
        batches = _batches()
        with _one_thread():
            ref = collect_stats(model, sites, batches, eps=EPS, limit=LIMIT, progress=False)
            ref_metrics = evaluate(model, batches)
            ref_small = collect_stats(model, sites, batches[:1], eps=EPS, limit=LIMIT, progress=False)
            ref_small_metrics = evaluate(model, batches[:1])
            ref_docs = {
                "docs": evaluate(model, batches, per_doc=True),
                "docs_small": evaluate(model, batches[:1], per_doc=True),
                "docs_unscored": evaluate(model, _unscored_second(batches), per_doc=True),
            }
    finally:
        _wait(procs)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    # the data exercise clipping and ranks whose histograms cover different bins
    assert all(int((s.under + s.over).sum()) > 0 for s in ref.layers)
    assert reports[0]["local_ranges"] != reports[1]["local_ranges"]

    for r in range(WORLD):
        stats = Statistics.load(tmp_path / f"stats{r}.safetensors")
        _assert_same_statistics(stats, ref)
        _assert_same_statistics(Statistics.load(tmp_path / f"small{r}.safetensors"), ref_small, exact_moments=True)
        # the halves are the even- and odd-numbered batches of the whole collection, as in one process
        sharded = Statistics.load(tmp_path / f"sharded{r}.safetensors")
        _assert_same_statistics(sharded, ref)
        assert sharded.half_tokens == ref.half_tokens
        for got, want in zip(sharded.half_centres, ref.half_centres):
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, equal_nan=True)
        for key, want in (("metrics", ref_metrics), ("wrapped", ref_metrics), ("small_metrics", ref_small_metrics)):
            n, n_correct, ce_sum = reports[r][key]
            assert (n, n_correct) == (want.n, want.n_correct)
            assert ce_sum == pytest.approx(want.ce_sum, rel=1e-9)
    # per-document sums: every rank holds those of one process over all batches, bit for bit, in batch order
    assert ref_docs["docs_unscored"].doc_sums()["n"][-1] == 0
    for name, want in ref_docs.items():
        for r in range(WORLD):
            got = np.load(tmp_path / f"{name}{r}.npz")
            assert got["total"].tolist() == [want.n, want.n_correct], name
            for field, w in want.doc_sums().items():
                assert got[field].dtype == w.dtype and np.array_equal(got[field], w), (name, field)
    # every rank holds the same bits: those of the ranks' own statistics merged in rank order in one process
    in_order = Statistics(ref.widths, eps=EPS, limit=LIMIT)
    for r in range(WORLD):
        in_order.merge(Statistics.load(tmp_path / f"local{r}.safetensors"))
    for r in range(WORLD):
        _assert_same_statistics(Statistics.load(tmp_path / f"stats{r}.safetensors"), in_order, exact_moments=True)
    _assert_same_statistics(
        Statistics.load(tmp_path / "stats1.safetensors"),
        Statistics.load(tmp_path / "stats0.safetensors"),
        exact_moments=True,
    )
    assert reports[0]["metrics"] == reports[1]["metrics"]
    # evaluate_sharded passes global batch indices to on_batch, each batch exactly once over the ranks
    seen = sorted((i, ids) for rep in reports for i, ids in rep["seen"])
    assert seen == [(i, b.inputs["input_ids"].tolist()) for i, b in enumerate(batches)]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
