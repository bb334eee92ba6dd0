"""Command line: ``knockout stats | sweep | demo | sites | methods | bench``. Thin: parse, build config, call."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import warnings
from pathlib import Path

from knockout.errors import KnockoutError

log = logging.getLogger("knockout")


def _floats(text: str) -> list[float]:
    """``0,0.5,1`` or ``start:stop:step`` (stop included)."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise argparse.ArgumentTypeError(f"the step of {text!r} must be positive (start:stop:step)")
            if stop < start:
                raise argparse.ArgumentTypeError(
                    f"{text!r} counts down; give start:stop:step with start <= stop, e.g. 0:1:0.5"
                )
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


def _method_fractions(text: str) -> dict[str, list[float]]:
    """``'optimal=0.5,0.9;resample-text=0.5'`` -> ``{'optimal': [0.5, 0.9], 'resample-text': [0.5]}``."""
    result = {}
    for part in filter(str.strip, text.split(";")):
        name, sep, fractions = part.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected METHOD=FRACTIONS[;METHOD=FRACTIONS...], got {part!r}")
        result[name.strip()] = _floats(fractions)
    return result


_KINDS = {
    "str": str,
    "int": int,
    "float": float,
    "floats": _floats,
    "ints": _ints,
    "names": _names,
    "method_fractions": _method_fractions,
}


def _config_fields(groups: tuple[str, ...]) -> list:
    """The :class:`SweepConfig` fields that are flags, in the given groups."""
    from dataclasses import fields

    from knockout.experiments.config import SweepConfig

    return [f for f in fields(SweepConfig) if "kind" in f.metadata and f.metadata["group"] in groups]


def _add_config_flags(
    p: argparse.ArgumentParser, groups: tuple[str, ...], shown: dict | None = None, exclude: tuple[str, ...] = ()
) -> None:
    """One flag per :class:`SweepConfig` field of ``groups`` (except those in ``exclude``); its help and the default
    it shows come from the field (or from ``shown``, a preset's values). Flags left out of the command line stay
    ``None``, so only the given ones override the config's (or the preset's) values."""
    from knockout.experiments.config import default

    arg_groups: dict[str, argparse._ArgumentGroup] = {}
    for f in _config_fields(groups):
        if f.name in exclude:
            continue
        meta = f.metadata
        if meta["group"] not in arg_groups:
            arg_groups[meta["group"]] = p.add_argument_group(meta["group"])
        value = (shown or {}).get(f.name, default(f.name))
        if isinstance(value, dict):
            value = ";".join(f"{k}={','.join(map(str, v))}" for k, v in value.items()) or None
        value = ",".join(map(str, value)) if isinstance(value, tuple) else value
        help_text = meta["help"] + ("" if value is None else f" (default {value})")
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        arg_groups[meta["group"]].add_argument(
            flag, dest=f.name, type=_KINDS[meta["kind"]], choices=meta.get("choices"), help=help_text
        )


def _given(args, groups: tuple[str, ...]) -> dict:
    """The config fields given on the command line (lists as tuples)."""
    given = {}
    for f in _config_fields(groups):
        value = getattr(args, f.name, None)
        if value is not None:
            given[f.name] = tuple(value) if isinstance(value, list) else value
    return given


def _add_option_flags(p: argparse.ArgumentParser, sweep: bool = True) -> None:
    """Flags that become :attr:`SweepConfig.options` entries (image preprocessing; resampling for sweeps)."""
    g = p.add_argument_group("images without an image processor")
    g.add_argument("--image-size", type=int, help="resize to this (default: the model config's image_size)")
    g.add_argument("--image-mean", type=_floats, help="1 or 3 numbers (default 0.5)")
    g.add_argument("--image-std", type=_floats, help="1 or 3 numbers (default 0.5)")
    p.add_argument(
        "--sort-by-length",
        action="store_true",
        help="text: batch sequences of similar length together (less padding, the same scored targets; "
        "resampling results change, as its random inputs are drawn per batch)",
    )
    if not sweep:
        return
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
    o = p.add_argument_group("optimal (learned constants; see knockout.ablation.optimal)")
    o.add_argument("--optimal-steps", type=int, help="Adam steps per neuron set (default 100)")
    o.add_argument("--optimal-lr", type=float, help="learning rate, in units of each neuron's std (default 0.02)")
    o.add_argument("--optimal-batch-size", type=int, help="collection rows per step (default: --batch-size)")
    o.add_argument("--optimal-tokens", type=int, help="scored collection targets used (default: all)")


def _options(args) -> dict:
    """Image and resampling flags as :attr:`SweepConfig.options` entries (only those given)."""
    keys = ("image_size", "image_mean", "image_std", "resample_model", "resample_prompt")
    keys += ("optimal_steps", "optimal_lr", "optimal_batch_size", "optimal_tokens")
    options = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "resample_fixed", False):
        options["resample_fixed"] = True
    if getattr(args, "sort_by_length", False):
        options["sort_by_length"] = True
    if getattr(args, "resample_no_cache", False):
        options["resample_cache"] = False
    return options


def build_parser() -> argparse.ArgumentParser:
    from knockout.experiments.presets import resolve_preset

    parser = argparse.ArgumentParser(prog="knockout", description="Neuron-ablation experiments on attention pre-out.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    everything = ("model", "data", "sweep")

    p = sub.add_parser("sweep", help="ablate neurons at many fractions with several methods and seeds")
    p.add_argument(
        "--preset",
        help="one of the paper's settings (see `knockout presets`): its values are the defaults, and every flag "
        "given overrides them",
    )
    _add_config_flags(p, everything)
    _add_option_flags(p)
    p.add_argument(
        "--restart",
        action="store_true",
        help="move an existing --out folder aside (to OUT.old-TIMESTAMP) and start afresh, instead of resuming",
    )

    p = sub.add_parser("demo", help="the default sweep: SmolLM2-135M on built-in Wikipedia text, offline")
    _add_config_flags(p, everything, shown=resolve_preset("demo").to_dict())
    _add_option_flags(p)

    p = sub.add_parser("stats", help="collect per-neuron statistics into a safetensors file")
    _add_config_flags(p, ("model", "data"))
    _add_option_flags(p, sweep=False)
    p.add_argument("--out", required=True, help="statistics file to write (.safetensors)")

    p = sub.add_parser("sites", help="show the sites of a model: attention pre-out (heads x d_head) and MLP, per layer")
    _add_config_flags(p, ("model",))

    sub.add_parser("methods", help="list the ablation methods")

    p = sub.add_parser("presets", help="print the paper's preset sweeps (use with `knockout sweep --preset NAME`)")
    p.add_argument("names", nargs="*", help="only these presets")

    p = sub.add_parser("bench", help="throughput of plain forward, statistics collection and ablated evaluation")
    _add_config_flags(p, ("model",), exclude=("site",))
    p.add_argument("--batch-size", type=int, help="sequences per batch (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 128)")
    p.add_argument("--repeats", type=int, help="interleaved rounds; the median is reported (default 3)")
    p.add_argument(
        "--compare-tokens", type=int, help="tokens of the comparison with the authors' statistics (default 100000)"
    )
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


def _load(args, default_model: str | None = None):
    from knockout.experiments.config import default
    from knockout.loading import load_model

    model = args.model or default_model
    if model is None:
        raise KnockoutError("give a model with --model (a hub name, local folder, .gguf file or built-in name)")
    value = lambda name: getattr(args, name) if getattr(args, name) is not None else default(name)  # noqa: E731
    return load_model(
        model, value("gguf_file"), value("task"), value("dtype"), value("device"), getattr(args, "device_map", None)
    )


def _sweep_config(args):
    """The sweep's config: a preset's (``--preset``, or the demo's) with the given flags as overrides, or one built
    from the given flags alone."""
    from knockout.experiments.config import SweepConfig
    from knockout.experiments.presets import resolve_preset

    given = _given(args, ("model", "data", "sweep"))
    preset = "demo" if args.command == "demo" else args.preset
    if preset is None:
        return SweepConfig(**given, options=_options(args))
    base = resolve_preset(preset)
    return resolve_preset(preset, **given, options={**base.options, **_options(args)})


def _sweep(args) -> int:
    from knockout import distributed
    from knockout.experiments.runner import preflight, run_sweep
    from knockout.loading import load_model
    from knockout.reporting import format_table, summarize, write_report
    from knockout.runfolder import read_rows

    cfg = _sweep_config(args)
    # Everything checkable without the model. Under torchrun (no process group yet: the launcher's environment
    # says) only rank 0 checks here, as only it may move an old folder aside (--restart); run_sweep then repeats the
    # checks in order: rank 0, a barrier, the other ranks (who see the folder as rank 0 left it).
    restart = getattr(args, "restart", False)
    rank, size = distributed.launch_world()
    data_id = preflight(cfg, restart=restart) if rank == 0 else None
    if size > 1:
        data_id = None
    try:
        loaded = load_model(cfg.model, cfg.gguf_file, cfg.task, cfg.dtype, cfg.device, cfg.device_map)
    except KnockoutError as e:
        if args.command == "demo" or args.preset is None:
            raise
        detail = " ".join(str(e).split())  # one line
        raise KnockoutError(
            f"preset {args.preset!r} needs the model {cfg.model!r} from the Hugging Face Hub or its local cache "
            f"(and streams {cfg.data!r}): {detail}"
        ) from e
    with distributed.process_group(loaded.device):  # torchrun: every rank runs its share, rank 0 writes
        out = run_sweep(cfg, progress=not args.quiet, loaded=loaded, data_identity=data_id)
        if not distributed.is_main():
            return 0
    print(format_table(summarize(read_rows(out))))
    print(f"\nresults: {out}/results.csv  config: {out}/config.json")
    with _quiet_numpy():
        print(f"report: {write_report(out)}")
    return 0


def _stats(args) -> int:
    from knockout import distributed
    from knockout.data.text import check_source, data_identity
    from knockout.experiments.config import data_spec, default
    from knockout.experiments.runner import check_max_length, collect_run_stats, model_inputs
    from knockout.loading import model_identity
    from knockout.runfolder import check_out
    from knockout.sites import find_sites
    from knockout.stats import centres
    from knockout.stats.running import check_hist_memory, check_hist_params

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise KnockoutError(f"--out {args.out!r} should end in .safetensors")
    given = _given(args, ("model", "data"))
    spec = data_spec({**given, "options": _options(args)})
    value = lambda name: given.get(name, default(name))  # noqa: E731
    check_hist_params(value("eps"), value("hist_limit"))
    if out.is_dir():
        raise KnockoutError(f"--out {args.out!r} is a folder; give a .safetensors file name")
    check_out(out.parent)
    data_identity(spec.source)  # the data exists
    check_source(spec.source)
    loaded = _load(args)
    check_max_length(spec.max_length, loaded.model, loaded.task)
    sites = find_sites(loaded.model, value("site_module"), value("n_heads"), value("site"))
    check_hist_memory([s.width for s in sites], value("eps"), value("hist_limit"))
    inputs = model_inputs(loaded, sites, spec)
    identity = model_identity(args.model, loaded.model, sites)
    with distributed.process_group(loaded.device):  # torchrun: every rank collects its share, rank 0 writes
        stats = collect_run_stats(
            loaded, sites, spec, inputs, value("eps"), value("hist_limit"), identity, progress=not args.quiet
        )
        if not distributed.is_main():
            return 0
    stats.check_finite("the collected statistics")
    stats.save(out)
    gap = max(float((s.peak() - s.mean).abs().max()) for s in stats.layers)
    clipped = max(s.clipped_fraction for s in stats.layers)
    n_pm = sum(int(centres.point_mass(s).sum()) for s in stats.layers)
    print(
        f"wrote {out}: {len(stats)} layers x {stats.widths[0]} neurons, {stats.n_tokens} tokens, "
        f"largest |peak - mean| {gap:.4f}, clipped {100 * clipped:.3f}%, "
        f"point-mass peaks {n_pm} ({100 * n_pm / max(sum(stats.widths), 1):.2f}% of neurons)"
    )
    return 0


def _sites(args) -> int:
    from knockout.sites import find_sites

    loaded = _load(args)
    # Both sites, unless --site names one; --site-module and --n-heads apply to the named (default: attention) site.
    named = args.site or "attention"
    found = {named: find_sites(loaded.model, args.site_module, args.n_heads, named)}
    if args.site is None:
        try:
            found["mlp"] = find_sites(loaded.model, kind="mlp")
        except KnockoutError as e:
            found["mlp"] = []
            print(f"no MLP site: {e}", file=sys.stderr)
    n_layers = max(len(s) for s in found.values())
    print(f"{args.model}: {getattr(loaded.model.config, 'model_type', '?')}, task {loaded.task}, {n_layers} layers")
    for layer in range(n_layers):
        for kind in ("attention", "mlp"):
            for s in found.get(kind, [])[layer : layer + 1]:
                shape = f"{s.n_heads} heads x {s.d_head} = " if kind == "attention" else ""
                print(f"  layer {s.layer:>3}  {kind:<9}  {s.name}  {shape}{s.width} neurons")
    return 0


def _methods(args) -> int:
    from knockout.ablation.methods import METHODS, PARAMETRISED

    for name, cls in METHODS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        stats = " (needs statistics)" if cls.needs_stats else ""
        print(f"{name:<18}{', '.join(cls.tasks):<24}{doc}{stats}")
    for base, factory in PARAMETRISED.items():
        print(f"{base + '@...':<18}{'':<24}{(factory.__doc__ or '').strip().splitlines()[0]}")
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
    from knockout.bench import format_benchmark, run_benchmark
    from knockout.experiments.presets import DEMO

    names = ("batch_size", "seq_len", "repeats", "compare_tokens")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    result = run_benchmark(_load(args, DEMO.model), site_module=args.site_module, progress=not args.quiet, **given)
    print(format_benchmark(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _report(args) -> int:
    from knockout.reporting import write_report

    with _quiet_numpy():
        path = write_report(args.run_dir, args.out, tuple(args.fractions), args.layers, args.top_k)
    print(f"report: {path}\n        {path.with_name('report.md')}")
    return 0


def _compare(args) -> int:
    from knockout.reporting import compare_runs

    with _quiet_numpy():
        path = compare_runs(args.run_dirs, args.out, tuple(args.fractions), args.labels)
    print(f"comparison: {path}")
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


class _quiet_numpy:
    """Reports never show numpy's floating-point warnings (overflow, invalid values): what they compute from stored
    numbers is checked where it matters, and a warning line in the middle of the output only confuses."""

    def __enter__(self):
        import numpy as np

        self._err = np.seterr(all="ignore")
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        import numpy as np

        self._warn.__exit__(*exc)
        np.seterr(**self._err)
        return False


_NEGATIVE = re.compile(r"^-\.?\d")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--fractions -0.1,0.5`` as ``--fractions=-0.1,0.5``: argparse takes a value that starts with ``-`` and is not a
    plain number for a flag. No flag of knockout starts with a digit, so such a value always belongs to the flag
    before it (which then reports a clear error, e.g. fractions outside [0, 1])."""
    out: list[str] = []
    for arg in argv:
        if out and _NEGATIVE.match(arg) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _progress_note(args) -> str:
    """``N of M rows done`` for an interrupted sweep, from what its run folder holds; empty if unknown."""
    try:
        from knockout.reporting.run import RunData
        from knockout.runfolder import RESULTS_FILE, read_config, read_rows

        out = Path(_sweep_config(args).out)
        done = len(read_rows(out)) if (out / RESULTS_FILE).is_file() else 0
        total = RunData(out, read_config(out) or {}, []).n_expected
        return f" ({done} rows done)" if total is None else f" ({done} of {total} rows done)"
    except Exception:  # only a courtesy: never let it hide the interruption
        return ""


def main(argv: list[str] | None = None) -> int:
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.quiet:  # Hugging Face's own progress bars too, through its API (the environment is left alone)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except KnockoutError as e:
        print(f"knockout: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        note = _progress_note(args) if args.command in ("sweep", "demo") else ""
        resume = "; re-run the same command to resume" if args.command in ("sweep", "demo") else ""
        print(f"\nknockout: interrupted{resume}{note}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
