"""Command line: ``knockout stats | sweep | demo | sites | methods | bench``. Thin: parse, build config, call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from knockout.errors import KnockoutError

log = logging.getLogger("knockout")

DEMO = {
    "model": "smollm2-135m",
    "data": "wiki",
    "eval_tokens": 512,
    "stats_tokens": 4096,
    "max_length": 128,
    "batch_size": 8,
    "out": "runs/demo",
}


def _floats(text: str) -> list[float]:
    """``0,0.5,1`` or ``start:stop:step`` (stop included)."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(round((stop - start) / step))
            return [round(start + i * step, 10) for i in range(n + 1)]
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,0.5,1 or 0:1:0.1, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_model_args(p: argparse.ArgumentParser, demo: bool = False, optional: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEMO["model"] if demo else None,
        required=not (demo or optional),
        help="hub name (facebook/opt-1.3b), local folder, .gguf file, or built-in name smollm2-135m",
    )
    g.add_argument("--gguf-file", help="GGUF file name inside the model folder")
    g.add_argument("--task", default="auto", choices=["auto", "causal", "masked", "image"])
    g.add_argument(
        "--site-module",
        help="out-projection path with {i} for the layer, for unknown architectures, "
        "e.g. 'model.layers.{i}.self_attn.o_proj'",
    )
    g.add_argument("--n-heads", type=int, help="override the number of attention heads")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")


def _add_data_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=DEMO["data"] if demo else "wiki",
        help="wiki (built-in Wikipedia paragraphs), a .txt/.jsonl/.json file, or a HF datasets name",
    )
    g.add_argument(
        "--stats-tokens",
        type=int,
        default=DEMO["stats_tokens"] if demo else 16384,
        help="tokens of the collection set for statistics",
    )
    g.add_argument(
        "--stats-skip-first",
        type=int,
        default=0,
        help="text: leave the first N positions of each collection sequence out of the statistics (default 0)",
    )
    g.add_argument("--max-length", type=int, default=DEMO["max_length"] if demo else 128, help="longest sequence")
    g.add_argument("--batch-size", type=int, default=DEMO["batch_size"] if demo else 8)
    g.add_argument("--eps", type=float, default=0.01, help="histogram bin width for the peak (default 0.01)")
    g.add_argument(
        "--hist-limit",
        type=float,
        default=20.0,
        help="histogram window [-limit, limit); values outside are left out of the peak (default 20)",
    )
    g.add_argument(
        "--image-size", type=int, help="image models without an image processor: resize to this (default: config)"
    )
    g.add_argument("--image-mean", type=_floats, help="image models without an image processor: 1 or 3 numbers (0.5)")
    g.add_argument("--image-std", type=_floats, help="image models without an image processor: 1 or 3 numbers (0.5)")


def _add_sweep_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    g = p.add_argument_group("sweep")
    g.add_argument(
        "--preset",
        help="one of the paper's settings (see `knockout presets`): its values are the defaults, and every flag "
        "given with a non-default value overrides them",
    )
    g.add_argument(
        "--methods",
        type=_names,
        default=["all"],
        help="comma-separated ablation methods, or 'all' (default) for every one that applies",
    )
    g.add_argument("--fractions", type=_floats, default=None, help="default 0:1:0.1 (0, 0.1, ..., 1)")
    g.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="default 0,1,2")
    g.add_argument(
        "--eval-tokens",
        type=int,
        default=DEMO["eval_tokens"] if demo else 4096,
        help="exact number of scored evaluation targets",
    )
    g.add_argument("--selection", default="per-layer", choices=["per-layer", "global"])
    g.add_argument("--stats", dest="stats_path", help="reuse this statistics file instead of collecting")
    g.add_argument("--out", default=DEMO["out"] if demo else "runs/sweep", help="run folder")
    r = p.add_argument_group("resampling")
    r.add_argument(
        "--resample-model",
        help="causal LM that writes resample-text's text (default: the model itself; required for masked LMs)",
    )
    r.add_argument("--resample-prompt", help="prompt of resample-text's generation (default 'The')")
    r.add_argument(
        "--resample-fixed",
        action="store_true",
        help="the paper's protocol: one fixed random input per seed for every evaluation input",
    )
    r.add_argument(
        "--resample-no-cache",
        action="store_true",
        help="recompute random-input activations for every fraction instead of caching them",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knockout", description="Neuron-ablation experiments on attention pre-out.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", help="ablate neurons at many fractions with several methods and seeds")
    _add_model_args(p, optional=True)  # --model or --preset
    _add_data_args(p)
    _add_sweep_args(p)

    p = sub.add_parser("demo", help="the default sweep: SmolLM2-135M on built-in Wikipedia text, offline")
    _add_model_args(p, demo=True)
    _add_data_args(p, demo=True)
    _add_sweep_args(p, demo=True)

    p = sub.add_parser("stats", help="collect per-neuron statistics into a safetensors file")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--out", required=True, help="statistics file to write (.safetensors)")

    p = sub.add_parser("sites", help="show the pre-out sites (layers, heads, d_head) of a model")
    _add_model_args(p)

    sub.add_parser("methods", help="list the ablation methods")

    p = sub.add_parser("presets", help="print the paper's preset sweeps (use with `knockout sweep --preset NAME`)")
    p.add_argument("names", nargs="*", help="only these presets")

    p = sub.add_parser("bench", help="throughput of plain forward, statistics collection and ablated evaluation")
    _add_model_args(p, demo=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    _add_report_parsers(sub)
    return parser


def _add_report_parsers(sub) -> None:
    p = sub.add_parser("report", help="rebuild a run folder's report (tables, figures, HTML) from its stored files")
    p.add_argument("run_dir", help="run folder (with config.json and results.jsonl)")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    p.add_argument("--fractions", type=_floats, default=[0.5, 0.9], help="fractions in the table (default 0.5,0.9)")
    p.add_argument("--layers", type=_ints, help="layers of the histogram figure (default four spread over depth)")
    p.add_argument("--top-k", type=int, default=8, help="atypical neurons drawn (default 8)")

    p = sub.add_parser("compare", help="the table and curves of several runs side by side")
    p.add_argument("run_dirs", nargs="+", help="run folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fractions", type=_floats, default=[0.5, 0.9], help="fractions in the table (default 0.5,0.9)")
    p.add_argument("--labels", type=_names, help="comma-separated run names (default: the model names)")


def _load(args):
    from knockout.loading import load_model

    return load_model(args.model, args.gguf_file, args.task, args.dtype, args.device)


def _image_options(args) -> dict:
    """``--image-size/--image-mean/--image-std`` as :attr:`SweepConfig.options` entries (only those given)."""
    keys = ("image_size", "image_mean", "image_std")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _sweep_options(args) -> dict:
    """Image and resampling flags as :attr:`SweepConfig.options` entries (only those given)."""
    options = _image_options(args)
    for key in ("resample_model", "resample_prompt"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    if getattr(args, "resample_fixed", False):
        options["resample_fixed"] = True
    if getattr(args, "resample_no_cache", False):
        options["resample_cache"] = False
    return options


# Flags whose values map one to one onto SweepConfig fields of the same name.
_CONFIG_FLAGS = (
    "model", "out", "data", "methods", "fractions", "seeds", "eval_tokens", "stats_tokens", "stats_skip_first",
    "max_length", "batch_size", "eps", "hist_limit", "selection", "task", "gguf_file", "site_module", "n_heads",
    "stats_path", "device", "dtype",
)  # fmt: skip


def _config_kwargs(args) -> dict:
    """The :class:`SweepConfig` fields given on the command line (lists as tuples; unset fractions left out)."""
    kwargs = {k: getattr(args, k) for k in _CONFIG_FLAGS if hasattr(args, k)}
    if kwargs.get("fractions") is None:
        kwargs.pop("fractions", None)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _preset_config(args):
    """The preset's config with every flag that differs from its parser default as an override."""
    from knockout.experiments.presets import resolve_preset

    defaults = vars(build_parser().parse_args([args.command]))
    given = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) != defaults.get(k)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    preset = resolve_preset(args.preset)
    return resolve_preset(args.preset, **given, options={**preset.options, **_sweep_options(args)})


def _sweep(args) -> int:
    from knockout.ablation.methods import methods_for
    from knockout.experiments.config import SweepConfig
    from knockout.experiments.runner import run_sweep
    from knockout.experiments.store import read_rows
    from knockout.loading import load_model
    from knockout.reporting import format_table, summarize

    if getattr(args, "preset", None):
        cfg = _preset_config(args)
        try:
            loaded = load_model(cfg.model, cfg.gguf_file, cfg.task, cfg.dtype, cfg.device)
        except KnockoutError as e:
            detail = " ".join(str(e).split())  # one line
            raise KnockoutError(
                f"preset {args.preset!r} needs the model {cfg.model!r} from the Hugging Face Hub or its local cache "
                f"(and streams {cfg.data!r}): {detail}"
            ) from e
    else:
        if args.model is None:
            raise KnockoutError("give --model, or --preset NAME for one of the paper's settings (`knockout presets`)")
        loaded = _load(args)
        options = _sweep_options(args)
        methods = args.methods
        if methods == ["all"]:
            methods = methods_for(loaded.task, options)
            skipped = [m for m in methods_for(loaded.task, {"resample_model": "any"}) if m not in methods]
            if skipped:
                log.warning("leaving out %s: a %s model needs --resample-model", ", ".join(skipped), loaded.task)
        cfg = SweepConfig(
            **{**_config_kwargs(args), "methods": tuple(methods), "task": loaded.task},
            options=options,
        )
    out = run_sweep(cfg, progress=not args.quiet, loaded=loaded)
    print(format_table(summarize(read_rows(out))))
    print(f"\nresults: {out}/results.csv  config: {out}/config.json")
    from knockout.reporting import write_report

    print(f"report: {write_report(out)}")
    return 0


def _stats(args) -> int:
    from knockout.data.tasks import stats_batches
    from knockout.experiments.config import SweepConfig
    from knockout.experiments.runner import stats_meta
    from knockout.loading import model_identity
    from knockout.sites import find_sites
    from knockout.stats import collect_stats

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise KnockoutError(f"--out {args.out!r} should end in .safetensors")
    loaded = _load(args)
    sites = find_sites(loaded.model, args.site_module, args.n_heads)
    kwargs = {k: v for k, v in _config_kwargs(args).items() if k != "out"}  # --out is the statistics file here
    cfg = SweepConfig(**{**kwargs, "task": loaded.task}, options=_image_options(args))
    meta = stats_meta(cfg, model_identity(args.model, loaded.model, sites))
    stats = collect_stats(
        loaded.model, sites, stats_batches(cfg, loaded), args.eps, args.hist_limit, meta, progress=not args.quiet
    )
    stats.save(out)
    gap = max(float((s.peak() - s.mean).abs().max()) for s in stats.layers)
    clipped = max(s.clipped_fraction for s in stats.layers)
    print(
        f"wrote {out}: {len(stats)} layers x {stats.widths[0]} neurons, {stats.n_tokens} tokens, "
        f"largest |peak - mean| {gap:.4f}, clipped {100 * clipped:.3f}%"
    )
    return 0


def _sites(args) -> int:
    from knockout.sites import find_sites

    loaded = _load(args)
    sites = find_sites(loaded.model, args.site_module, args.n_heads)
    print(f"{args.model}: {getattr(loaded.model.config, 'model_type', '?')}, task {loaded.task}, {len(sites)} layers")
    for s in sites:
        print(f"  layer {s.layer:>3}  {s.name}  {s.n_heads} heads x {s.d_head} = {s.width} neurons")
    return 0


def _methods(args) -> int:
    from knockout.ablation.methods import METHODS

    for name, cls in METHODS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        stats = " (needs statistics)" if cls.needs_stats else ""
        print(f"{name:<18}{', '.join(cls.tasks):<24}{doc}{stats}")
    return 0


def _presets(args) -> int:
    from knockout.experiments.presets import PRESETS, resolve_preset

    names = args.names or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise KnockoutError(f"unknown preset(s) {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    configs = {n: {"description": PRESETS[n].description, **resolve_preset(n).to_dict()} for n in names}
    print(json.dumps(configs, indent=2))
    return 0


def _bench(args) -> int:
    from knockout.bench import run_benchmark

    run_benchmark(_load(args), args.batch_size, args.seq_len, args.repeats, args.json_out, args.site_module)
    return 0


def _report(args) -> int:
    from knockout.reporting import write_report

    path = write_report(args.run_dir, args.out, tuple(args.fractions), args.layers, args.top_k)
    print(f"report: {path}\n        {path.with_name('report.md')}")
    return 0


def _compare(args) -> int:
    from knockout.reporting import compare_runs

    print(f"comparison: {compare_runs(args.run_dirs, args.out, tuple(args.fractions), args.labels)}")
    return 0


COMMANDS = {
    "sweep": _sweep,
    "demo": _sweep,
    "stats": _stats,
    "sites": _sites,
    "methods": _methods,
    "presets": _presets,
    "bench": _bench,
}
COMMANDS.update(report=_report, compare=_compare)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.quiet:
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        return COMMANDS[args.command](args)
    except KnockoutError as e:
        print(f"knockout: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
