"""Benchmark: throughput of a plain forward pass, of statistics collection and of ablated evaluation
(``knockout bench``; method and current figures in docs/benchmark.md).

All modes run on the same model and the same batch, interleaved round by round (so drift of the machine hits them
alike), and the median round is reported. Ratios are against the plain measurements of the same run:

- statistics / plain forward   (target >= 0.97): one more batch into running statistics, as every batch of a
  collection after its first; a collection's first batch also allocates the histograms (``statistics_first``, a
  new collection of this one batch, reported beside it). The statistics' own time inside such a pass (every
  ``LayerStats.add``, timed where the hooks call it; on a CPU only) is reported as a share of the forward pass
  (target <= 4%): unlike the ratio of two passes it is hardly touched by the machine's drift;
- folded ablation / plain eval (target >= 0.97): peak ablation of 50% of neurons folded into W_O, against the same
  evaluation (forward + top-1 + cross-entropy) without ablation;
- hooked ablation / plain eval, for comparison: the same ablation done with a pre-hook that rewrites the pre-out.

The sweep enters an ablation once per (method, fraction) and then evaluates every batch inside it, so the ablated
evaluations are timed inside their context, and the one-off cost of entering it (the weight edit) is reported
apart. The round-to-round spread is printed too: on a shared 2-core machine it is often larger than the effect, so
each ratio is also given from each mode's fastest round (the round least disturbed by other work, as ``timeit``
advises), and every round's time is in the JSON output (``seconds``).

It also reports the statistics' memory after one batch and after every batch of the run (``repeats + 2`` times the
tokens): it must not grow with the number of tokens; it grows only if later batches widen the histogram's range.

Two comparisons with other tools' ways of doing the same thing:

- ``eval_hooked_tl`` is the ablation as TransformerLens does it: a hook on ``hook_z`` (here a forward pre-hook on
  the out-projection, its equivalent) that overwrites the chosen neurons on every forward pass; knockout folds the
  same constants into W_O instead (``eval_folded``).
- ``authors_stats`` compares knockout's statistics update with the authors' method (``taker``) on the same
  activations of one layer, at ``compare_tokens`` tokens (100,000 by default): they kept every activation, then
  drew one 100-bin histogram per neuron over that neuron's own min..max with ``numpy.histogram`` in a Python loop;
  knockout adds the tokens batch by batch (batches of the benchmark's size). The activations are the first layer's
  pre-out on the benchmark batch, its rows drawn with replacement up to ``compare_tokens`` rows (seeded), so both
  methods see real activation values at that token count without that many forward passes. It reports the time
  per layer of each and the memory each holds (measured, not extrapolated): the authors' grows linearly with the
  number of tokens (every activation, float32), knockout's does not. Targets: at least 5x faster and 100x less
  memory at 100,000 tokens.
"""

from __future__ import annotations

import contextlib
import statistics as pystats
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from knockout.ablation.methods import MethodContext, get_method
from knockout.ablation.selection import NeuronSelection
from knockout.data.batch import IGNORE, Batch
from knockout.errors import KnockoutError
from knockout.evaluation.evaluate import evaluate
from knockout.hooks import capture, replace_with_constants
from knockout.loading import LoadedModel
from knockout.sites import find_sites, text_config
from knockout.stats.collect import collect_halves, collect_stats
from knockout.stats.running import LayerStats

#: Token count at which knockout's statistics are compared with the authors' method (see authors_stats).
COMPARE_AT_TOKENS = 100_000


def _batch(loaded: LoadedModel, batch_size: int, seq_len: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    config = loaded.model.config
    if loaded.task == "image":
        size = getattr(config, "image_size", 224)
        pixels = torch.randn(batch_size, getattr(config, "num_channels", 3), size, size, generator=g)
        n_pos = (size // config.patch_size) ** 2 + 1
        labels = torch.randint(0, config.num_labels, (batch_size,), generator=g)
        return Batch({"pixel_values": pixels}, torch.ones(batch_size, n_pos, dtype=torch.bool), labels)
    vocab = text_config(config).vocab_size
    ids = torch.randint(10, vocab, (batch_size, seq_len), generator=g)
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    mask = torch.ones_like(ids)
    return Batch({"input_ids": ids, "attention_mask": mask}, mask.bool(), targets)


def _stats_bytes(stats) -> int:
    return sum(t.numel() * t.element_size() for layer in stats.layers for t in layer.state_dict().values())


def run_benchmark(
    loaded: LoadedModel,
    batch_size: int = 8,
    seq_len: int = 128,
    repeats: int = 3,
    site_module: str | None = None,
    progress: bool = True,
    compare_tokens: int = COMPARE_AT_TOKENS,
) -> dict:
    """Measure the figures and return them as a dict (``knockout bench`` prints them)."""
    sizes = {"batch size": batch_size, "sequence length": seq_len, "repeats": repeats, "compare tokens": compare_tokens}
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise KnockoutError(f"the benchmark's {name} must be a positive integer, got {value!r}")
    model = loaded.model
    config = text_config(model.config) if loaded.task != "image" else model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if loaded.task != "image" and limit and seq_len > limit:
        raise KnockoutError(f"--seq-len {seq_len} exceeds the model's {limit} positions")
    sites = find_sites(model, site_module)
    batch = _batch(loaded, batch_size, seq_len).to(loaded.device)
    n_tokens = int(batch.valid.sum())
    # one bar over every stage: 1 forward pass of set-up, 6 of warm-up, 6 per round, then the authors' comparison
    bar = tqdm(total=7 + 6 * repeats + 1, desc="benchmark", unit="pass", disable=not progress)
    bar.set_postfix_str("set-up")
    stats = collect_stats(model, sites, [batch], progress=False)  # the statistics for peak; grown by every pass
    mem_1 = _stats_bytes(stats)
    bar.update(1)
    neurons = NeuronSelection([s.width for s in sites], seed=0).at(0.5)
    peak = get_method("peak")(MethodContext(model, sites, stats))

    def sync():
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()

    def forward():
        with torch.inference_mode():
            model(**batch.inputs)

    # The statistics' own time inside a pass (every LayerStats.add the hooks call, timed in place): a measure of
    # their cost that the machine's drift hardly touches, unlike the difference of two forward passes.
    inside: list[float] = []
    add = stats.add

    # Not on a GPU, where timing each call would need the synchronisations the statistics avoid.
    time_inside = loaded.device.type == "cpu"

    def timed_add(layer: int, x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        add(layer, x)
        inside[-1] += time.perf_counter() - t0

    def stats_pass():
        inside.append(0.0)
        if time_inside:
            stats.add = timed_add
        try:
            collect_stats(model, sites, [batch], progress=False, into=stats)
        finally:
            vars(stats).pop("add", None)

    def stats_first():  # the collection itself, without the halves' centres computed at its end
        collect_halves(model, sites, [batch], progress=False)

    def plain_eval():
        evaluate(model, [batch])

    # The sweep applies an ablation once per (method, fraction) and then evaluates every batch, so the ablated
    # modes are timed inside their context; the one-off cost of entering and leaving it is measured apart.
    constants = peak.constants()
    contexts = {
        "eval_folded": lambda: peak.ablate(neurons),
        "eval_hooked_tl": lambda: replace_with_constants(sites, neurons, constants),
    }
    modes = {
        "forward": forward,
        "statistics": stats_pass,
        "statistics_first": stats_first,
        "eval": plain_eval,
        "eval_folded": plain_eval,
        "eval_hooked_tl": plain_eval,
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    enter_exit: list[float] = []
    bar.set_postfix_str("warm-up")
    for fn in modes.values():
        fn()  # warm-up
        bar.update(1)
    for r in range(repeats):
        bar.set_postfix_str(f"round {r + 1} of {repeats}")
        for name, fn in modes.items():
            with contextlib.ExitStack() as stack:
                if name in contexts:
                    t0 = time.perf_counter()
                    stack.enter_context(contexts[name]())
                    enter_exit.append(time.perf_counter() - t0)
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
            bar.update(1)
    tps = {name: n_tokens / pystats.median(ts) for name, ts in times.items()}

    def ratios(t: dict[str, float]) -> dict[str, float]:
        """Each measured mode's throughput over its plain counterpart's, from one time per mode."""
        pairs = {
            "statistics_vs_forward": ("statistics", "forward"),
            "statistics_first_batch_vs_forward": ("statistics_first", "forward"),
            "folded_ablation_vs_eval": ("eval_folded", "eval"),
            "hooked_ablation_tl_vs_eval": ("eval_hooked_tl", "eval"),
        }
        return {key: round(t[plain] / t[mode], 3) for key, (mode, plain) in pairs.items()}

    result = {
        "model": loaded.name,
        "device": str(loaded.device),
        "dtype": str(next(model.parameters()).dtype),
        "batch": [batch_size, seq_len] if loaded.task != "image" else [batch_size],
        "tokens_per_batch": n_tokens,
        "repeats": repeats,
        "tokens_per_second": {k: round(v, 1) for k, v in tps.items()},
        "ratios": ratios({name: pystats.median(ts) for name, ts in times.items()}),
        # the same from each mode's fastest round: the least disturbed by other work on a shared machine
        "ratios_fastest": ratios({name: min(ts) for name, ts in times.items()}),
        "seconds": {k: [round(t, 6) for t in v] for k, v in times.items()},
        # statistics' own time per batch (LayerStats.add of every layer) over the plain forward pass's
        "statistics_update_share": (
            round(pystats.median(inside[1:]) / pystats.median(times["forward"]), 4) if time_inside else None
        ),
        "ablation_enter_seconds": round(pystats.median(enter_exit), 4),
        "spread": {k: round(max(v) / min(v), 3) for k, v in times.items()},
        "stats_memory_bytes": {str(n_tokens): mem_1, str(stats.n_tokens): _stats_bytes(stats)},
    }
    bar.set_postfix_str(f"statistics vs the authors' method at {compare_tokens:,} tokens")
    acts = layer_activations(model, sites[0], batch)
    result["authors_stats"] = compare_with_authors(acts, repeats, compare_tokens, batch_tokens=n_tokens)
    bar.update(1)
    bar.close()
    return result


def layer_activations(model: torch.nn.Module, site, batch: Batch) -> torch.Tensor:
    """``[n_tokens, width]`` float32 pre-out of ``site`` on ``batch``'s non-padding positions."""
    kept: list[torch.Tensor] = []
    with torch.inference_mode(), capture([site], lambda s, z: kept.append(z[batch.valid].float().cpu())):
        model(**batch.inputs)
    return kept[0].clone()


def authors_histograms(acts: np.ndarray, bins: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The authors' peak statistics of one layer from ``acts: [n_tokens, width]`` (every activation kept): one
    ``bins``-bin histogram per neuron over that neuron's own min..max, in a Python loop. Returns the counts
    ``[width, bins]`` and the edges ``[width, bins + 1]``."""
    counts = np.empty((acts.shape[1], bins), dtype=np.int64)
    edges = np.empty((acts.shape[1], bins + 1), dtype=np.float64)
    for j in range(acts.shape[1]):
        column = acts[:, j]
        counts[j], edges[j] = np.histogram(column, bins=bins, range=(float(column.min()), float(column.max())))
    return counts, edges


def compare_with_authors(
    acts: torch.Tensor, repeats: int = 3, tokens: int = COMPARE_AT_TOKENS, batch_tokens: int = 1024
) -> dict:
    """Time and memory of knockout's statistics update against the authors' method on ``tokens`` activations of
    one layer: the rows of ``acts: [n, width]`` drawn with replacement (seed 0) up to ``tokens`` rows. Median of
    ``repeats`` alternating rounds.

    knockout: :meth:`LayerStats.add` of the activations in batches of ``batch_tokens`` rows (moments, min/max,
    eps-histogram); memory = the state it keeps, which does not grow with the number of tokens. Authors: keeping the
    activations (float32, as they stored them on the CPU) and :func:`authors_histograms`; memory = the kept
    activations plus the histograms.
    """
    g = torch.Generator().manual_seed(0)
    data = acts[torch.randint(0, acts.shape[0], (tokens,), generator=g)].float().contiguous()
    width = data.shape[1]
    store = data.numpy()
    ours_s, theirs_s = [], []
    state = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = LayerStats(width)
        for chunk in data.split(batch_tokens):
            state.add(chunk)
        ours_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        kept = store.copy()  # the authors kept every activation
        counts, edges = authors_histograms(kept)
        theirs_s.append(time.perf_counter() - t0)
        del kept
    ours_bytes = sum(t.numel() * t.element_size() for t in state.state_dict().values())
    theirs_bytes = store.nbytes + counts.nbytes + edges.nbytes
    ours_t, theirs_t = pystats.median(ours_s), pystats.median(theirs_s)
    return {
        "tokens": tokens,
        "width": width,
        "drawn_from_tokens": acts.shape[0],
        "knockout_seconds_per_layer": round(ours_t, 5),
        "authors_seconds_per_layer": round(theirs_t, 5),
        "speedup": round(theirs_t / ours_t, 2),
        "knockout_bytes": ours_bytes,
        "authors_bytes": theirs_bytes,
        "memory_ratio": round(theirs_bytes / ours_bytes, 1),
    }


def format_benchmark(result: dict) -> str:
    """The benchmark's figures (:func:`run_benchmark`) as text (``knockout bench`` prints it)."""
    r, mem, best = result["ratios"], result["stats_memory_bytes"], result["ratios_fastest"]
    lines = [
        f"benchmark: {result['model']} on {result['device']} ({result['dtype']}), {result['tokens_per_batch']} tokens "
        f"per batch, median of {result['repeats']} rounds (in brackets: from each mode's fastest round)"
    ]
    lines += [f"  {name:<17} {v:>10.1f} tokens/s" for name, v in result["tokens_per_second"].items()]
    pair = lambda key: f"{r[key]:.3f} [{best[key]:.3f}]"  # noqa: E731
    lines += [
        f"  statistics / forward      {pair('statistics_vs_forward')}   "
        "(target >= 0.97; one more batch into running statistics)",
        "    their own time (every LayerStats.add, timed in place): "
        + (
            "not timed on a GPU"
            if result["statistics_update_share"] is None
            else f"{100 * result['statistics_update_share']:.1f}% of a forward pass   (target <= 4%)"
        ),
        f"  first batch / forward     {pair('statistics_first_batch_vs_forward')}   "
        "(a new collection's first batch: allocating its statistics)",
        f"  folded ablation / eval    {pair('folded_ablation_vs_eval')}   (target >= 0.97)",
        f"  hooked ablation / eval    {pair('hooked_ablation_tl_vs_eval')}   "
        "(the same ablation as TransformerLens does it: a hook rewriting hook_z every pass)",
        f"  entering an ablation (once per method and fraction): {1000 * result['ablation_enter_seconds']:.1f} ms",
        f"  round-to-round spread (max/min time): up to {max(result['spread'].values()):.2f}x",
        "  statistics memory: " + ", ".join(f"{b / 2**20:.2f} MiB after {int(n):,} tokens" for n, b in mem.items()),
    ]
    a = result.get("authors_stats")
    if a:
        lines += [
            f"  statistics vs the authors' method (keep every activation, then one 100-bin np.histogram per neuron"
            f" in a Python loop), one layer of {a['width']} neurons, {a['tokens']:,} tokens (rows drawn from the"
            f" {a['drawn_from_tokens']:,} of the batch):",
            f"    time per layer: knockout {1000 * a['knockout_seconds_per_layer']:.1f} ms, authors "
            f"{1000 * a['authors_seconds_per_layer']:.1f} ms: {a['speedup']:.1f}x faster   (target >= 5x)",
            f"    memory: knockout {a['knockout_bytes'] / 2**20:.2f} MiB, "
            f"authors {a['authors_bytes'] / 2**20:.1f} MiB: "
            f"{a['memory_ratio']:.0f}x less   (target >= 100x)",
        ]
    return "\n".join(lines)
