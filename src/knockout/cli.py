"""Command line: ``knockout sweep | demo | scan | stats | report | compare | export | sites | methods | presets |
bench``. Thin: parse, build the config, call, print."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from knockout.errors import KnockoutError

log = logging.getLogger("knockout")


def _parser(convert, expected: str):
    """An argparse type: ``convert(text)`` of ASCII ``text`` (``int`` and ``float`` also read other scripts' digits:
    ``int("٣")`` is 3), one line naming what was ``expected`` otherwise."""

    def parse(text: str):
        if not text.isascii():
            raise argparse.ArgumentTypeError(f"expected {expected} written with the digits 0-9, got {text!r}")
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text[:40]!r}") from None

    return parse


def _auto(convert):
    return lambda text: "auto" if text.strip() == "auto" else convert(text)


def _range(text: str) -> list[float]:
    """``0,0.5,1`` or ``start:stop:step`` (stop included)."""
    if ":" not in text:
        return [float(x) for x in text.split(",") if x.strip()]
    start, stop, step = (float(x) for x in text.split(":"))
    if step <= 0:
        raise argparse.ArgumentTypeError(f"the step of {text!r} must be positive (start:stop:step)")
    if stop < start:
        raise argparse.ArgumentTypeError(f"{text!r} counts down; give start:stop:step with start <= stop, e.g. 0:1:0.5")
    return [round(start + i * step, 10) for i in range(int(round((stop - start) / step)) + 1)]


_int = _parser(int, "an integer")
_float = _parser(float, "a number")
_floats = _parser(_range, "numbers like 0,0.5,1 or 0:1:0.1")
_ints = _parser(lambda text: [int(x) for x in text.split(",") if x.strip()], "integers like 0,1,2")
_seeds = _parser(_auto(lambda text: [int(x) for x in text.split(",") if x.strip()]), "integers like 0,1,2 or 'auto'")
_float_or_auto = _parser(_auto(float), "a number or 'auto'")


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _method_fractions(text: str) -> dict[str, list[float]]:
    """``'optimal=0.5,0.9;resample-text=0.5'`` -> ``{'optimal': [0.5, 0.9], 'resample-text': [0.5]}``."""
    result = {}
    for part in filter(str.strip, text.split(";")):
        name, sep, fractions = part.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected METHOD=FRACTIONS[;METHOD=FRACTIONS...], got {part!r}")
        if name.strip() in result:
            raise argparse.ArgumentTypeError(
                f"{name.strip()!r} is named twice in {text!r}; give each method once, with all its fractions"
            )
        result[name.strip()] = _floats(fractions)
    return result


_KINDS = {
    "str": str,
    "int": _int,
    "float": _float,
    "float_or_auto": _float_or_auto,
    "floats": _floats,
    "ints": _ints,
    "seeds": _seeds,
    "names": _names,
    "method_fractions": _method_fractions,
}
FLAG_SECTIONS = ("model", "data", "sweep")
OPTION_GROUPS = ("optimal", "resample", "image", "decide")


def _flag_fields(sections: tuple[str, ...], groups: tuple[str, ...] = ()) -> list[tuple[str | None, object]]:
    """``(group or None, field)`` for every :class:`SweepConfig` setting that is a flag in ``sections``, then every
    setting of the option groups ``groups`` (``optimal``, ``resample``, ``image``)."""
    from dataclasses import fields

    from knockout.config import SweepConfig

    out: list[tuple[str | None, object]] = [
        (None, f) for f in fields(SweepConfig) if f.metadata.get("kind") and f.metadata["group"] in sections
    ]
    for name in groups:
        out += [(name, f) for f in fields(SweepConfig.GROUPS[name]) if f.metadata.get("kind")]
    return out


def _dest(group: str | None, name: str) -> str:
    return name if group is None else f"{group}_{name}"


def _add_config_flags(
    p: argparse.ArgumentParser,
    sections: tuple[str, ...],
    groups: tuple[str, ...] = (),
    shown: dict | None = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """One flag per setting (see :func:`_flag_fields`), except those in ``exclude``; its help and the default it
    shows come from the setting (or from ``shown``, a preset's values). Flags left out of the command line stay
    ``None``, so only the given ones override the config's (or the preset's, or the config file's) values."""
    from knockout.config import SweepConfig
    from knockout.options import default_of

    headings: dict[str, argparse._ArgumentGroup] = {}
    for group, f in _flag_fields(sections, groups):
        if f.name in exclude:
            continue
        meta = f.metadata
        heading = meta["group"] if group is None else SweepConfig.GROUPS[group].title
        if heading not in headings:
            headings[heading] = p.add_argument_group(heading)
        if group is None:
            value = (shown or {}).get(f.name, default_of(SweepConfig, f.name))
        else:
            value = ((shown or {}).get(group) or {}).get(f.name, default_of(SweepConfig.GROUPS[group], f.name))
        if isinstance(value, dict):
            value = ";".join(f"{k}={','.join(map(str, v))}" for k, v in value.items()) or None
        value = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        help_text = meta["help"] + ("" if value is None else f" (default {value})")
        flag = meta.get("flag", "--" + _dest(group, f.name).replace("_", "-"))
        dest = _dest(group, f.name)
        if meta["kind"] == "bool":
            headings[heading].add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            headings[heading].add_argument(
                flag, dest=dest, type=_KINDS[meta["kind"]], choices=meta.get("choices"), help=help_text
            )


def _given(args, sections: tuple[str, ...] = FLAG_SECTIONS, groups: tuple[str, ...] = OPTION_GROUPS) -> dict:
    """The settings given on the command line, as config overrides (lists as tuples, option groups nested)."""
    given: dict = {}
    for group, f in _flag_fields(sections, groups):
        value = getattr(args, _dest(group, f.name), None)
        if value is None:
            continue
        value = tuple(value) if isinstance(value, list) else value
        if group is None:
            given[f.name] = value
        else:
            given.setdefault(group, {})[f.name] = value
    return given


def _add_config_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="read the settings from this file (.json, e.g. a run folder's config.json; .toml; .yaml); flags given "
        "on the command line override it",
    )


def build_parser() -> argparse.ArgumentParser:
    from knockout.experiments.presets import resolve_preset
    from knockout.version import __version__

    parser = argparse.ArgumentParser(prog="knockout", description="Neuron-ablation experiments on attention pre-out.")
    parser.add_argument("--version", action="version", version=f"knockout {__version__}")
    # -q / -v before or after the command: the subcommands' copies leave the value alone unless given
    common = argparse.ArgumentParser(add_help=False)
    for p in (parser, common):
        default = False if p is parser else argparse.SUPPRESS
        p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars")
        p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    command = lambda name, help: sub.add_parser(name, help=help, parents=[common])  # noqa: E731
    groups = OPTION_GROUPS

    p = command("sweep", "ablate neurons at many fractions with several methods and seeds")
    p.add_argument(
        "--preset",
        help="one of the paper's settings (see `knockout presets`): its values are the defaults, and every flag "
        "given overrides them",
    )
    _add_config_file(p)
    _add_config_flags(p, FLAG_SECTIONS, groups)
    p.add_argument(
        "--restart",
        action="store_true",
        help="move an existing --out folder aside (to OUT.old-TIMESTAMP) and start afresh, instead of resuming",
    )
    _add_tracking_flags(p)
    _add_models_flag(p)

    _add_scan_parser(command)

    p = command("demo", "the default sweep: SmolLM2-135M on built-in Wikipedia text, offline")
    _add_config_flags(p, FLAG_SECTIONS, groups, shown=resolve_preset("demo").to_dict())
    _add_tracking_flags(p)
    _add_models_flag(p)

    p = command("stats", "collect per-neuron statistics into a safetensors file")
    _add_config_file(p)
    _add_config_flags(p, ("model", "data"), ("image",))
    p.add_argument("--out", dest="stats_out", required=True, help="statistics file to write (.safetensors)")

    p = command("sites", "show the sites of a model: attention pre-out (heads x d_head) and MLP, per layer")
    _add_config_flags(p, ("model",))

    command("methods", "list the ablation methods")

    p = command("presets", "print the paper's preset sweeps (use with `knockout sweep --preset NAME`)")
    p.add_argument("names", nargs="*", help="only these presets")

    p = command("bench", "throughput of plain forward, statistics collection and ablated evaluation")
    _add_config_flags(p, ("model",), exclude=("site",))
    p.add_argument("--batch-size", type=_int, help="sequences per batch (default 8)")
    p.add_argument("--seq-len", type=_int, help="tokens per sequence (default 128)")
    p.add_argument("--repeats", type=_int, help="interleaved rounds; the median is reported (default 3)")
    p.add_argument(
        "--compare-tokens", type=_int, help="tokens of the comparison with the authors' statistics (default 100000)"
    )
    p.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    _add_report_parsers(command)
    _add_export_parser(command)
    return parser


def _add_models_flag(p: argparse.ArgumentParser) -> None:
    """``--models A,B``: the same sweep on several models, then their comparison (experiments.runner.run_models)."""
    p.add_argument(
        "--models",
        type=_names,
        help="run the same sweep on each of these models (comma-separated; give --eval-docs), each into OUT/<model>, "
        "and compare them in OUT/compare: the answer per model side by side",
    )


def _add_tracking_flags(p: argparse.ArgumentParser) -> None:
    """``--mlflow`` and ``--wandb`` (knockout.tracking; docs/tracking.md)."""
    from knockout.tracking import WANDB_MODES

    g = p.add_argument_group("experiment tracking (pip install 'knockout[tracking]'; docs/tracking.md)")
    g.add_argument("--mlflow", metavar="URI", help="log the sweep to MLflow at this tracking URI (file:./mlruns works "
                   "offline)")  # fmt: skip
    g.add_argument("--wandb", metavar="PROJECT", help="log the sweep to this Weights & Biases project")
    g.add_argument("--wandb-mode", choices=WANDB_MODES, default="offline",
                   help="offline (default: no network; upload later with `wandb sync`), online, disabled")  # fmt: skip


def _add_export_parser(command) -> None:
    from knockout.export import FORMATS

    p = command("export", "a run's ablation constants for TransformerLens, nnsight or safetensors (docs/export.md)")
    p.add_argument("run_dir", help="run folder (with config.json and stats.safetensors)")
    p.add_argument("--format", required=True, choices=FORMATS, help="how the constants are keyed")
    p.add_argument("--method", default="peak", help="a constant method (mean, peak, median, mode, peak-nopm, "
                   "peak@EPS, zero) or optimal (default peak)")  # fmt: skip
    p.add_argument("--out", help="file to write (.safetensors; default RUN/export/METHOD.FORMAT.safetensors)")


def _add_scan_parser(command) -> None:
    from knockout.experiments.scan import SCAN_DEFAULTS, SCAN_EVAL_PROMPTS, SCAN_EVAL_TOKENS, SCAN_TEXT_MAX_LENGTH

    p = command("scan", "ablate each head (layer, group of neurons) alone with each method, and compare the rankings")
    _add_config_file(p)
    exclude = ("fractions", "method_fractions", "ablate", "keep", "keep_top", "keep_ranking", "selection")
    shown = {
        **SCAN_DEFAULTS,
        "eval_tokens": f"{SCAN_EVAL_PROMPTS} prompts of task data, {SCAN_EVAL_TOKENS} tokens of text",
        "max_length": f"{SCAN_TEXT_MAX_LENGTH} for text with the default --eval-tokens, else 128",
    }
    _add_config_flags(p, FLAG_SECTIONS, (*OPTION_GROUPS, "scan"), shown=shown, exclude=exclude)
    p.add_argument("--restart", action="store_true", help="move an existing --out folder aside and start afresh")


def _add_report_parsers(command) -> None:
    p = command("report", "rebuild a run folder's report (tables, figures, HTML) from its stored files")
    p.add_argument("run_dir", help="run folder (with config.json and results.jsonl)")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    p.add_argument("--fractions", type=_floats, default=[0.5, 0.9], help="fractions in the table (default 0.5,0.9)")
    p.add_argument("--layers", type=_ints, help="layers of the histogram figure (default four spread over depth)")
    p.add_argument("--top-k", type=_int, default=8, help="atypical neurons drawn (default 8)")

    p = command("compare", "the table and curves of several runs side by side")
    p.add_argument("run_dirs", nargs="+", help="run folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fractions", type=_floats, default=[0.5, 0.9], help="fractions in the table (default 0.5,0.9)")
    p.add_argument("--labels", type=_names, help="comma-separated run names (default: the model names)")


def _config(args, sections: tuple[str, ...] = FLAG_SECTIONS, **extra):
    """The config of a command: a preset's (``--preset``, or the demo's) or a config file's (``--config``) with the
    given flags as overrides, or one made of the given flags alone."""
    from knockout.config import SweepConfig, merge_settings
    from knockout.experiments.presets import get_preset

    base = _settings_file(args)
    given = _given(args, sections)
    values = merge_settings({k: v for k, v in base.items() if k != "resolved"}, {**given, **extra})
    preset = "demo" if args.command == "demo" else getattr(args, "preset", None)
    cfg = get_preset(preset).config(**values) if preset is not None else SweepConfig.from_dict(values)
    if "fractions" in given and (cfg.ablate is not None or cfg.keeps):
        flag = "--ablate" if cfg.ablate is not None else "--keep"
        raise KnockoutError(
            f"--fractions chooses random fractions of neurons, which {flag} runs do not use (each named set is "
            "ablated whole); leave --fractions out"
        )
    return cfg


def _settings_file(args) -> dict:
    """The settings of ``--config FILE`` (none without it). Remote code is never turned on by the file: its
    ``trust_remote_code`` is refused unless ``--trust-remote-code`` is given too."""
    from knockout.config import read_settings_file

    if not getattr(args, "config", None):
        return {}
    return read_settings_file(args.config, trust_remote_code=getattr(args, "trust_remote_code", None) is True)


def _sweep(args) -> int:
    from knockout.experiments.runner import run_sweep
    from knockout.reporting import format_table
    from knockout.reporting.answer import sentence
    from knockout.runfolder import REPORT_DIR
    from knockout.tracking import trackers

    if args.models and args.model:
        raise KnockoutError("give --model or --models, not both")
    cfg = _config(args, **({"model": args.models[0]} if args.models else {}))
    callbacks = trackers(args.mlflow, args.wandb, args.wandb_mode)
    restart = getattr(args, "restart", False)
    if args.models:
        return _models(args, cfg, callbacks, restart)
    results = run_sweep(cfg, progress=not args.quiet, restart=restart, callbacks=callbacks, report=True)
    if not _main_process():
        return 0
    out = results.dir
    print(format_table(results.summary.to_dict("records")))
    print()
    for fa in results.answer.fractions:
        print(sentence(fa).replace("**", ""))
    print(f"\nresults: {out}/results.csv  config: {out}/config.json")
    print(f"report: {out / REPORT_DIR / 'report.html'}")
    if results.faithfulness is not None and len(results.faithfulness):
        print(f"faithfulness: {out / REPORT_DIR / 'faithfulness.csv'} (curves: faithfulness.json)")
    return 0


def _scan(args) -> int:
    from knockout.config import merge_settings
    from knockout.experiments.scan import run_scan, scan_config
    from knockout.reporting.scan import format_scan, load_scan, write_scan_report

    scan_sections = (FLAG_SECTIONS, (*OPTION_GROUPS, "scan"))
    base = _settings_file(args)
    values = merge_settings({k: v for k, v in base.items() if k != "resolved"}, _given(args, *scan_sections))
    out = run_scan(scan_config(**values), progress=not args.quiet, restart=args.restart)
    if not _main_process():
        return 0
    with _quiet_numpy():
        data = load_scan(out)  # read once for the report and the terminal
        report = write_scan_report(out, data=data)
        print(format_scan(out, data))
    print(f"\nresults: {out}/results.csv  report: {report}\n        {report.with_name('report.md')}")
    return 0


def _models(args, cfg, callbacks, restart) -> int:
    """``--models A,B``: the sweep on each model, then their comparison."""
    from knockout.experiments.runner import run_models
    from knockout.reporting.answer import sentence

    results, page = run_models(cfg, args.models, progress=not args.quiet, restart=restart, callbacks=callbacks)
    if not _main_process():
        return 0
    for model, r in zip(args.models, results):
        print(f"{model}:")
        for fa in r.answer.fractions:
            print("  " + sentence(fa).replace("**", ""))
    print(f"\ncomparison: {page}")
    return 0


def _main_process() -> bool:
    from knockout.distributed import launch_world

    return launch_world().is_main


def _stats(args) -> int:
    from knockout.experiments.runner import describe_stats, run_stats

    stats = run_stats(_config(args, ("model", "data")), args.stats_out, progress=not args.quiet)
    if _main_process():
        print(f"wrote {args.stats_out}: {describe_stats(stats)}")
    return 0


def _sites(args) -> int:
    from knockout.experiments.prepare import find_all_sites

    cfg = _config(args, ("model",))
    loaded, found = find_all_sites(cfg, kinds=None if args.site is None else (cfg.site,))
    for kind, problem in found.items():
        if isinstance(problem, str):
            print(f"no {kind.upper() if kind == 'mlp' else kind} site: {problem}", file=sys.stderr)
    sites = {kind: s for kind, s in found.items() if not isinstance(s, str)}
    n_layers = max((len(s) for s in sites.values()), default=0)
    print(f"{cfg.model}: {getattr(loaded.model.config, 'model_type', '?')}, task {loaded.task}, {n_layers} layers")
    for layer in range(n_layers):
        for kind in ("attention", "mlp"):
            for s in sites.get(kind, [])[layer : layer + 1]:
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
    from knockout.experiments.prepare import load
    from knockout.experiments.presets import DEMO

    names = ("batch_size", "seq_len", "repeats", "compare_tokens")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    cfg = _config(args, ("model",), model=args.model or DEMO.overrides["model"])
    result = run_benchmark(load(cfg), site_module=cfg.site_module, progress=not args.quiet, **given)
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
    "scan": _scan,
    "demo": _sweep,
    "stats": _stats,
    "sites": _sites,
    "methods": _methods,
    "presets": _presets,
    "bench": _bench,
}


def _export(args) -> int:
    from safetensors import safe_open

    from knockout.export import write_export

    path = write_export(args.run_dir, args.method, args.format, args.out)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    print(f"wrote {path}: {len(keys)} tensors ({keys[0]} ... {keys[-1]})")
    return 0


COMMANDS.update(report=_report, compare=_compare, export=_export)


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
        from knockout.runfolder import RunFolder

        run = RunFolder(_config(args).out)
        done, total = run.n_present, run.n_expected
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
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {e.filename!r}" if e.filename else ""
        print(f"knockout: error: no space left on the device{where}: free some space and re-run", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        note = _progress_note(args) if args.command in ("sweep", "demo") else ""
        resume = "; re-run the same command to resume" if args.command in ("sweep", "demo", "scan") else ""
        print(f"\nknockout: interrupted{resume}{note}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`knockout presets | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
