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
  number of tokens (every activation, float32), knockout's does not. Targets: at least 10x faster and 100x less
  memory at 100,000 tokens.

It also isolates the histogram's width (:func:`width_cases`): a layer whose values span ±300 against one spanning
±5 at the same tokens (target: at most 1.5x the time per batch), and a 4,096-wide layer with four "massive"
neurons at ±2,000; and it names the machine's CPU (:func:`cpu_model`) beside its figures.
"""

from __future__ import annotations

import contextlib
import platform
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


def cpu_model() -> str:
    """The machine's CPU model (``model name`` of /proc/cpuinfo, else :func:`platform.processor` or the machine
    type) and how many CPUs torch may use: the figures of a benchmark depend on it."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name}, {torch.get_num_threads()} threads"


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


def _layer_bytes(layer: LayerStats) -> int:
    """Bytes one layer's statistics hold: the per-neuron tensors and the histogram as it is kept."""
    return sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in LayerStats.TENSORS) + (
        layer.hist_nbytes
    )


def _stats_bytes(stats) -> int:
    return sum(_layer_bytes(layer) for layer in stats.layers)


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
        "cpu": cpu_model(),
        "torch": torch.__version__,
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
    bar.set_postfix_str("the histogram's width")
    result["width_cases"] = width_cases(repeats, n_tokens, acts.shape[1], device=loaded.device)
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


#: Fewest alternating rounds of :func:`compare_with_authors`: knockout's side takes a tenth of a second or so, which
#: a busy machine moves by a fifth from round to round.
COMPARE_ROUNDS = 5


def compare_with_authors(
    acts: torch.Tensor, repeats: int = 3, tokens: int = COMPARE_AT_TOKENS, batch_tokens: int = 1024
) -> dict:
    """Time and memory of knockout's statistics update against the authors' method on ``tokens`` activations of
    one layer: the rows of ``acts: [n, width]`` drawn with replacement (seed 0) up to ``tokens`` rows. Median of
    ``repeats`` alternating rounds, at least :data:`COMPARE_ROUNDS`.

    knockout: :meth:`LayerStats.add` of the activations in batches of ``batch_tokens`` rows (moments, min/max,
    eps-histogram); memory = the state it holds, which does not grow with the number of tokens. Authors: keeping the
    activations (float32, as they stored them on the CPU) and :func:`authors_histograms`; memory = the kept
    activations plus the histograms.
    """
    g = torch.Generator().manual_seed(0)
    data = acts[torch.randint(0, acts.shape[0], (tokens,), generator=g)].float().contiguous()
    width = data.shape[1]
    store = data.numpy()
    ours_s, theirs_s = [], []
    state = None
    for _ in range(max(repeats, COMPARE_ROUNDS)):
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
    ours_bytes = _layer_bytes(state)
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


#: The window of the width cases (:func:`width_cases`): about SmolLM2-135M's auto window, wide enough for ±300.
WIDTH_CASE_LIMIT = 320.0


def _synthetic_batches(tokens: int, width: int, n_batches: int, span: float, share: float, seed: int = 0):
    """``n_batches`` float32 ``[tokens, width]`` batches of standard normal values (a neuron's own range about
    ±5 at these sizes) in which a ``share`` of the values, at random places, is replaced by one drawn uniformly
    from ``±span``; ``share = 0``: none."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(tokens, width, generator=g)
        if share > 0:
            wide = torch.rand(tokens, width, generator=g) < share
            x = torch.where(wide, (torch.rand(tokens, width, generator=g) * 2 - 1) * span, x)
        out.append(x)
    return out


#: Fewest rounds over its batches that each width case is timed in (more with ``--repeats``): each batch takes a few
#: milliseconds, so a few rounds would leave the ratio of two cases to the machine's drift.
WIDTH_CASE_ROUNDS = 10


def time_updates(
    cases: dict[str, list[torch.Tensor]], repeats: int, limits: dict[str, float | str] | None = None, device=None
) -> dict[str, dict]:
    """``LayerStats.add`` on each case's batches (moved to ``device``; each case with its window, ``limits[name]``,
    ``auto`` where not given): per case, the median time per batch over ``repeats`` rounds of adding every batch to
    statistics that have seen them all once (so the stored ranges no longer grow: the cost of every batch of a long
    collection), the first round's time per batch (growing as a collection's first batches do), and the histogram's
    memory after them. The cases are timed interleaved, batch by batch, so that the machine's drift during the
    measurement hits all of them alike."""
    device = torch.device("cpu") if device is None else torch.device(device)
    cases = {name: [b.to(device) for b in batches] for name, batches in cases.items()}
    limits = limits or {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    states, first = {}, {}
    for name, batches in cases.items():
        states[name] = LayerStats(batches[0].shape[1], limit=limits.get(name, "auto"))
        sync()
        t0 = time.perf_counter()
        for b in batches:
            states[name].add(b)
        states[name].finish()
        sync()
        first[name] = (time.perf_counter() - t0) / len(batches)
    per_batch: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for i in range(max(len(b) for b in cases.values())):
            for name, batches in cases.items():
                if i < len(batches):
                    sync()
                    t0 = time.perf_counter()
                    states[name].add(batches[i])
                    sync()
                    per_batch[name].append(time.perf_counter() - t0)
    out = {}
    for name, state in states.items():
        state.finish()
        out[name] = {
            "seconds_per_batch": round(pystats.median(per_batch[name]), 6),
            "first_round_seconds_per_batch": round(first[name], 6),
            "hist_bytes": state.hist_nbytes,
            "window": state.limit,
        }
    return out


def width_cases(repeats: int = 3, tokens: int = 1024, width: int = 576, n_batches: int = 4, device=None) -> dict:
    """Two cases that isolate the histogram's width, at the same tokens (``n_batches`` batches of ``tokens`` x
    ``width`` float32 values), timed together by :func:`time_updates` over at least :data:`WIDTH_CASE_ROUNDS`
    rounds:

    - ``narrow``: standard normal values, each neuron spanning about ±5;
    - ``wide``: the same, with one value in 1,000 drawn uniformly from ±300 instead, so that every neuron spans
      nearly ±300 (60,000 bins at eps 0.01) while its bulk is unchanged;

    both in the window ±:data:`WIDTH_CASE_LIMIT` at the default eps;

    and, on paper and measured, a ``massive`` case: a 4,096-wide layer of standard normal values whose first
    four neurons (the "massive activations" reported for Llama-2-7B) take values of ±2,000 (uniform in ±2,000), at
    ``--hist-limit 2048`` (eps 0.01: 409,600 bins per neuron), the window that keeps them."""
    narrow = _synthetic_batches(tokens, width, n_batches, 0.0, 0.0, seed=1)
    wide = _synthetic_batches(tokens, width, n_batches, 300.0, 1e-3, seed=1)
    both = time_updates(
        {"narrow": narrow, "wide": wide}, max(repeats, WIDTH_CASE_ROUNDS),
        {"narrow": WIDTH_CASE_LIMIT, "wide": WIDTH_CASE_LIMIT}, device,
    )  # fmt: skip
    out = {"tokens": tokens, "width": width, **both}
    out["wide_vs_narrow"] = round(out["wide"]["seconds_per_batch"] / out["narrow"]["seconds_per_batch"], 3)
    massive = _synthetic_batches(tokens, 4096, n_batches, 0.0, 0.0, seed=2)
    g = torch.Generator().manual_seed(3)
    for b in massive:
        b[:, :4] = (torch.rand(tokens, 4, generator=g) * 2 - 1) * 2000.0
    out["massive"] = {
        "width": 4096,
        "massive_neurons": 4,
        **time_updates({"massive": massive}, repeats, {"massive": 2048.0}, device)["massive"],
    }
    n_window = LayerStats(4096, limit=2048.0).grid.n_window
    out["massive"]["table_bytes"] = 8 * 4096 * n_window  # the same layer stored as one table over its range
    return out


def format_benchmark(result: dict) -> str:
    """The benchmark's figures (:func:`run_benchmark`) as text (``knockout bench`` prints it)."""
    r, mem, best = result["ratios"], result["stats_memory_bytes"], result["ratios_fastest"]
    lines = [
        f"benchmark: {result['model']} on {result['device']} ({result['dtype']}), {result['tokens_per_batch']} tokens "
        f"per batch, median of {result['repeats']} rounds (in brackets: from each mode's fastest round)",
        f"  CPU: {result['cpu']}; torch {result['torch']}",
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
            f"{1000 * a['authors_seconds_per_layer']:.1f} ms: {a['speedup']:.1f}x faster   (target >= 10x)",
            f"    memory: knockout {a['knockout_bytes'] / 2**20:.2f} MiB, "
            f"authors {a['authors_bytes'] / 2**20:.1f} MiB: "
            f"{a['memory_ratio']:.0f}x less   (target >= 100x)",
        ]
    w = result.get("width_cases")
    if w:
        ms = lambda case: 1000 * case["seconds_per_batch"]  # noqa: E731
        mib = lambda case: case["hist_bytes"] / 2**20  # noqa: E731
        m = w["massive"]
        lines += [
            f"  the histogram's width: one layer of {w['width']} neurons, {w['tokens']:,} tokens per batch, "
            "statistics update per batch:",
            f"    values within ±5: {ms(w['narrow']):.2f} ms ({mib(w['narrow']):.2f} MiB of histogram); "
            f"within ±300 (1 in 1,000): {ms(w['wide']):.2f} ms ({mib(w['wide']):.2f} MiB): "
            f"{w['wide_vs_narrow']:.2f}x   (target <= 1.5x)",
            f"    {m['width']:,} neurons, {m['massive_neurons']} of them massive (±2,000; --hist-limit 2048): "
            f"{ms(m):.1f} ms per {w['tokens']:,} tokens, histogram {mib(m):.1f} MiB "
            f"(one table over the layer's range: {m['table_bytes'] / 2**30:.1f} GiB)",
        ]
    return "\n".join(lines)
