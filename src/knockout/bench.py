"""Benchmark: throughput of a plain forward pass, of statistics collection and of ablated evaluation.

All modes run on the same model and the same batch, interleaved round by round (so drift of the machine hits them
alike), and the median round is reported. Ratios are against the plain measurements of the same run:

- statistics / plain forward   (target >= 0.8)
- folded ablation / plain eval (target >= 0.97): peak ablation of 50% of neurons folded into W_O, against the same
  evaluation (forward + top-1 + cross-entropy) without ablation;
- hooked ablation / plain eval, for comparison: the same ablation done with a pre-hook that rewrites the pre-out.

The sweep enters an ablation once per (method, fraction) and then evaluates every batch inside it, so the ablated
evaluations are timed inside their context, and the one-off cost of entering it (the weight edit) is reported
apart. The round-to-round spread is printed too: on a shared 2-core machine it is often larger than the effect.

It also reports the statistics' memory after one batch and after four times as many tokens (it must not grow with
the number of tokens; it grows only if later batches widen the histogram's range).
"""

from __future__ import annotations

import contextlib
import statistics as pystats
import time

import torch
from tqdm.auto import tqdm

from knockout.ablation.methods import MethodContext, get_method
from knockout.ablation.selection import NeuronSelection
from knockout.data.batch import IGNORE, Batch
from knockout.errors import KnockoutError
from knockout.evaluation.evaluate import evaluate
from knockout.hooks import replace_with_constants
from knockout.loading import LoadedModel
from knockout.sites import find_sites, text_config
from knockout.stats.collect import collect_stats


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
) -> dict:
    """Measure the figures and return them as a dict (``knockout bench`` prints them)."""
    for name, value in (("batch size", batch_size), ("sequence length", seq_len), ("repeats", repeats)):
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
    stats = collect_stats(model, sites, [batch], progress=False)  # warm-up, and the statistics for peak
    mem_1 = _stats_bytes(stats)
    stats4 = collect_stats(model, sites, [batch] * 4, progress=False)
    mem_4 = _stats_bytes(stats4)
    neurons = NeuronSelection([s.width for s in sites], seed=0).at(0.5)
    peak = get_method("peak")(MethodContext(model, sites, stats))

    def sync():
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()

    def forward():
        with torch.inference_mode():
            model(**batch.inputs)

    def stats_pass():
        collect_stats(model, sites, [batch], progress=False)

    def plain_eval():
        evaluate(model, [batch])

    # The sweep applies an ablation once per (method, fraction) and then evaluates every batch, so the ablated
    # modes are timed inside their context; the one-off cost of entering and leaving it is measured apart.
    constants = peak.constants()
    contexts = {
        "eval_folded": lambda: peak.ablate(neurons),
        "eval_hooked": lambda: replace_with_constants(sites, neurons, constants),
    }
    modes = {
        "forward": forward,
        "statistics": stats_pass,
        "eval": plain_eval,
        "eval_folded": plain_eval,
        "eval_hooked": plain_eval,
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    enter_exit: list[float] = []
    for fn in modes.values():
        fn()  # warm-up
    for _ in tqdm(range(repeats), desc="benchmark", unit="round", disable=not progress):
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
    tps = {name: n_tokens / pystats.median(ts) for name, ts in times.items()}
    result = {
        "model": loaded.name,
        "device": str(loaded.device),
        "dtype": str(next(model.parameters()).dtype),
        "batch": [batch_size, seq_len] if loaded.task != "image" else [batch_size],
        "tokens_per_batch": n_tokens,
        "repeats": repeats,
        "tokens_per_second": {k: round(v, 1) for k, v in tps.items()},
        "ratios": {
            "statistics_vs_forward": round(tps["statistics"] / tps["forward"], 3),
            "folded_ablation_vs_eval": round(tps["eval_folded"] / tps["eval"], 3),
            "hooked_ablation_vs_eval": round(tps["eval_hooked"] / tps["eval"], 3),
        },
        "ablation_enter_seconds": round(pystats.median(enter_exit), 4),
        "spread": {k: round(max(v) / min(v), 3) for k, v in times.items()},
        "stats_memory_bytes": {str(n_tokens): mem_1, str(4 * n_tokens): mem_4},
    }
    return result
