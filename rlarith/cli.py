"""``rlarith``: the command line. Each subcommand is a thin layer over one module.

A ``ConfigError`` (or any other user mistake we can name) is printed as one paragraph and exits with
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlarith.config import ConfigError, load_config, to_yaml
from rlarith.durable import EXIT_STORAGE, StorageError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML run config (default: the embedded defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.seed=1")


def cmd_data_check(args: argparse.Namespace) -> int:
    from rlarith import data

    cfg = load_config(args.config, args.overrides)
    exclude: set[str] = set()
    if args.exclude_traces:  # a run's traced problems (rlarith.contamination's refusal names this fix)
        from rlarith.checkpoints import run_config
        from rlarith.contamination import trained_keys

        run = Path(args.exclude_traces)
        run_cfg = cfg
        if (run / "config.yaml").exists():
            run_cfg, note = run_config(run)
            if note:
                print(f"note: {note}", file=sys.stderr)
        exclude = trained_keys(run, run_cfg)
    report = data.check(cfg, Path(args.out) if args.out else None, exclude_keys=exclude)
    print(
        f"task: {cfg.task.digits_a}-digit {cfg.task.op} {cfg.task.digits_b}-digit, {report.space:,} problems"
    )
    print(f"train: {cfg.data.strategy}, {report.train_distinct:,} distinct problems available")
    print(f"val: {report.val:,}  test: {report.test:,}")
    print(
        f"overlap val/train: {report.overlap_val_train}  test/train: {report.overlap_test_train}  "
        f"val/test: {report.overlap_val_test}"
    )
    if exclude:
        print(
            f"excluded {len(exclude):,} problems {args.exclude_traces} can have trained on (config and traces)"
        )
    for split, path in report.files.items():
        print(f"wrote {split}: {path}")
    if not report.files:
        print(
            f"not written (pass --out DIR to write them, e.g. --out {cfg.run_dir / 'data'}, where eval reads them)"
        )
    overlaps = report.overlap_val_train + report.overlap_test_train + report.overlap_val_test
    return 1 if overlaps else 0


def cmd_init_model(args: argparse.Namespace) -> int:
    from rlarith.tinymodel import init_model

    out = init_model(args.out, hidden=args.hidden, layers=args.layers, seed=args.seed)
    print(f"wrote a tiny Llama and its tokenizer to {out}")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    from rlarith.config import schema_id
    from rlarith.container import version

    print(f"rlarith {version()} (config schema {schema_id()})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    # The stop handler first, before the heavy imports: a SIGTERM during start-up must mean "stop", not death.
    from rlarith.preemption import EXIT_ABORTED, StopRequest

    stop = StopRequest().install()
    try:
        from rlarith.training.run import train

        return train(load_config(args.config, args.overrides), force=args.force, stop=stop)
    except KeyboardInterrupt:
        print("rlarith: aborted by a second Ctrl-C; nothing saved since the last checkpoint", file=sys.stderr)
        return EXIT_ABORTED
    finally:
        stop.uninstall()


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from rlarith.bootstrap import bootstrap

    result = bootstrap(load_config(args.config, args.overrides), steps=args.steps, out=args.out)
    print(f"bootstrapped model: {result.path} (held-out greedy accuracy {result.accuracy:.1%})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rlarith.demo import demo

    return demo(load_config(args.config or "configs/default.yaml", args.overrides))


def cmd_config(args: argparse.Namespace) -> int:
    if args.run is None:
        cfg = load_config(args.config, args.overrides)
    elif args.config is not None or args.overrides:
        raise ConfigError("--run prints a run's own config: drop --config and the key=value overrides.")
    else:  # config.yaml, or the copy sealed into its latest checkpoint when config.yaml is damaged
        from rlarith.checkpoints import run_config

        cfg, note = run_config(Path(args.run))
        if note:
            print(f"rlarith: note: {note}", file=sys.stderr)
    print(to_yaml(cfg), end="")
    return 0


# ---- submit / status (rlarith.launch, rlarith.status) -------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    from rlarith import launch

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(launch.dry_run(cfg), end="")
        return 0
    return launch.submit(cfg, wait=args.wait)


def cmd_status(args: argparse.Namespace) -> int:
    from rlarith.status import report

    try:
        print(report(Path(args.run)), end="")
    except FileNotFoundError as err:
        print(f"rlarith: {err}", file=sys.stderr)
        return 2
    return 0


def _add_submit_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="run training as a submitit job: SLURM (requeued on preemption) or local"
    )
    _config_args(p)
    p.add_argument("--wait", action="store_true", help="follow the job; exit 0 only when training finished")
    p.add_argument(
        "--dry-run", action="store_true", help="print the resources and batch script; submit nothing"
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="a run's attempts, latest checkpoint and last metrics")
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.set_defaults(func=cmd_status)


# ---- doctor (rlarith.doctor) --------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from rlarith.doctor import doctor

    # No config at all: check the machine only (the image's %test); with one, the run too.
    given = args.config is not None or bool(args.overrides)
    return doctor(load_config(args.config, args.overrides), config_given=given)


def _add_doctor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="can this machine or image run this config? one OK/WARN/FAIL line per check"
    )
    _config_args(p)
    p.set_defaults(func=cmd_doctor)


# ---- eval / compare (rlarith.evaluate) ----------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from rlarith import evaluate as ev

    target = ev.resolve_target(args.target, args.config)
    settings = ev.EvalSettings(
        split=args.split,
        n=args.n,
        samples=args.samples,
        temperature=args.temperature,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    try:
        results = ev.run_eval(target, settings, force=args.force, all_checkpoints=args.all_checkpoints)
    except ev.Contaminated as err:  # a refusal to score, not a mistake in the config
        print(f"rlarith: contamination refusal: {err}", file=sys.stderr)
        return 2
    except ev.TracesUnreadable as err:
        print(f"rlarith: unreadable traces: {err}", file=sys.stderr)
        return 2
    print(ev.markdown_table(results), end="")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rlarith import evaluate as ev

    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else runs[0].parent / "compare.png"
    print(ev.compare(runs, out, split=args.split), end="")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def _add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a run's latest checkpoint (or every one) on held-out problems")
    p.add_argument("target", help="a run directory, one of its checkpoints, or a model directory + --config")
    p.add_argument("--config", "-c", default=None, help="run config for a bare model directory")
    p.add_argument("--split", choices=("val", "test"), default=None, help="default: eval.split")
    p.add_argument("--n", type=int, default=None, help="score the first N held-out problems (eval.n)")
    p.add_argument("--samples", type=int, default=None, help="completions per problem (eval.samples)")
    p.add_argument("--temperature", type=float, default=None, help="0: greedy (eval.temperature)")
    p.add_argument("--batch-size", type=int, default=None, help="problems per batch (eval.batch_size)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="(eval.max_new_tokens)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--force", action="store_true", help="score even if held-out problems overlap training")
    p.add_argument("--all-checkpoints", action="store_true", help="score the base model and every checkpoint")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="held-out accuracy and training reward over steps across runs")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--out", default=None, help="plot path (default: <runs dir>/compare.png; table beside it)")
    p.set_defaults(func=cmd_compare)


# ---- end eval / compare -------------------------------------------------------------------------------


# ---- traces (rlarith.traces) --------------------------------------------------------------------------


def cmd_traces(args: argparse.Namespace) -> int:
    import warnings

    from rlarith import traces
    from rlarith.traces.report import default_output

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damaged files: reported below, once each, as tr.skipped
            tr = traces.open(args.run)
            if args.traces_command == "summary":
                print(traces.format_summary(tr.summary(), rows=args.rows))
                out = None
            elif args.traces_command == "export":
                out = Path(args.out) if args.out else default_output(tr, f"traces.{args.format}")
                traces.export(tr, out, args.format, all_attempts=args.all_attempts)
            else:
                out = traces.plot(tr, Path(args.out) if args.out else default_output(tr, "traces.png"))
    except traces.TraceError as err:
        print(f"rlarith: {err}", file=sys.stderr)
        return 2
    if out is not None:
        print(f"wrote {out}")
    for path, reason in tr.skipped:
        print(f"rlarith: warning: skipped damaged trace file {path}: {reason}", file=sys.stderr)
    if tr.skipped:
        print(
            f"rlarith: {len(tr.skipped)} trace file(s) skipped: the numbers above leave out their steps "
            "(exit status 1).",
            file=sys.stderr,
        )
    missing = tr.missing()  # steps metrics.jsonl has and the traces lack: said, never silent
    if missing:
        print(
            f"rlarith: warning: {traces.missing_text(missing, tr.directory, tr.run_dir)} (exit status 1).",
            file=sys.stderr,
        )
    return 1 if tr.skipped or missing else 0


def _add_traces_parsers(sub: argparse._SubParsersAction) -> None:
    tsub = sub.add_parser("traces", help="per-step traces (docs/traces.md)").add_subparsers(
        dest="traces_command", required=True
    )
    run_help = "a run directory or a trace directory"

    p = tsub.add_parser("summary", help="steps, samples, bytes, resumes, damaged files, reward by step")
    p.add_argument("run", metavar="RUN", help=run_help)
    p.add_argument("--rows", type=int, default=40, help="steps shown in the per-step table (0: all)")

    p = tsub.add_parser("export", help="the default view (each step once) as Parquet or JSONL")
    p.add_argument("run", metavar="RUN", help=run_help)
    p.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    p.add_argument("--out", default=None, help="output file (default: <run>/exports/traces.<format>)")
    p.add_argument("--all-attempts", action="store_true", help="every attempt's copy of re-run steps")

    p = tsub.add_parser("plot", help="PNG: rewards, accuracy, extraction failures, completion length")
    p.add_argument("run", metavar="RUN", help=run_help)
    p.add_argument("--out", default=None, help="PNG path (default: <run>/exports/traces.png)")
    for p in tsub.choices.values():
        p.set_defaults(func=cmd_traces)


# ---- end traces ---------------------------------------------------------------------------------------


# ---- checkpoints (rlarith.checkpoints) ----------------------------------------------------------------


def cmd_checkpoints_verify(args: argparse.Namespace) -> int:
    from rlarith.checkpoints import verify_report

    text, ok = verify_report(Path(args.run))
    print(text)
    return 0 if ok else 1


def _add_checkpoints_parsers(sub: argparse._SubParsersAction) -> None:
    csub = sub.add_parser("checkpoints", help="a run's checkpoints").add_subparsers(
        dest="checkpoints_command", required=True
    )
    p = csub.add_parser("verify", help="check every checkpoint's files against the checksums sealed with it")
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.set_defaults(func=cmd_checkpoints_verify)


# ---- end checkpoints ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlarith", description="GRPO positive control: arithmetic, no chain of thought."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config")
    _config_args(p)
    p.add_argument(
        "--run",
        default=None,
        metavar="RUN",
        help="print the config of the run directory RUN (its checkpoint's copy if config.yaml is damaged)",
    )
    p.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="problem sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="build held-out sets, verify they never overlap training, write them")
    _config_args(p)
    p.add_argument(
        "--out", default=None, help="write val/test JSONL here (e.g. <run dir>/data; default: none)"
    )
    p.add_argument(
        "--exclude-traces",
        default=None,
        metavar="RUN",
        help="leave out every problem RUN can have trained on (its config's stream and its traces)",
    )
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("train", help="GRPO training; resumes from the run's latest valid checkpoint")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="resume a run directory made by a different config")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the CPU positive control: bootstrap, measure, GRPO, measure again")
    _config_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bootstrap", help="warm-start the tiny model with SFT so GRPO has signal")
    _config_args(p)
    p.add_argument("--steps", type=int, default=None, help="fixed SFT steps (default: until 50%% accuracy)")
    p.add_argument("--out", default=None, help="where to save the model (default: model.path)")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("init-model", help="build a tiny local Llama + tokenizer (no download)")
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("version", help="rlarith's version and config schema (images are checked against it)")
    p.set_defaults(func=cmd_version)
    _add_submit_parsers(sub)  # submit / status
    _add_doctor_parser(sub)  # doctor
    _add_eval_parsers(sub)  # eval / compare
    _add_traces_parsers(sub)  # traces summary / export / plot
    _add_checkpoints_parsers(sub)  # checkpoints verify
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"rlarith: config error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:  # a full, read-only or failing disk: one paragraph, and no requeue
        print(f"rlarith: storage error: {err}", file=sys.stderr)
        return EXIT_STORAGE
    except PermissionError as err:  # most often a folder bound into a container, owned by another uid
        print(f"rlarith: {permission_hint(err)}", file=sys.stderr)
        return 2


def permission_hint(err: PermissionError) -> str:
    """One paragraph for a file this process may not write or read: who we are, who owns it, the fix."""
    import os

    path = Path(err.filename or ".")
    owner = next((p for p in (path, *path.parents) if p.exists()), path)
    try:
        st = owner.stat()
        whose = f"{owner} belongs to uid {st.st_uid}, gid {st.st_gid}, mode {st.st_mode & 0o7777:o}"
    except OSError:
        whose = f"{owner} cannot be inspected"
    return (
        f"permission denied: {err.filename} ({err.strerror}). This process runs as uid {os.getuid()}, gid "
        f"{os.getgid()}; {whose}. In a container, run as the folder's owner: podman run "
        "--userns=keep-id:uid=1000,gid=1000 (rootless) or --user $(id -u):$(id -g), or chown the folder "
        "to the image's user (uid 1000); apptainer and ch-run run as you already (README: On a cluster)."
    )


if __name__ == "__main__":
    sys.exit(main())
