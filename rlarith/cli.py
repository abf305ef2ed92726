"""``rlarith``: the command line. Each subcommand is a thin layer over one module.

A ``ConfigError`` (or any other user mistake we can name) is printed as one paragraph and exits with
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlarith.config import ConfigError, load_config, to_yaml


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML run config (default: the embedded defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.seed=1")


def cmd_data_check(args: argparse.Namespace) -> int:
    from rlarith import data

    cfg = load_config(args.config, args.overrides)
    report = data.check(cfg, Path(args.out) if args.out else None)
    print(
        f"task: {cfg.task.digits_a}-digit {cfg.task.op} {cfg.task.digits_b}-digit, {report.space:,} problems"
    )
    print(f"train: {cfg.data.strategy}, {report.train_distinct:,} distinct problems available")
    print(f"val: {report.val:,}  test: {report.test:,}")
    print(
        f"overlap val/train: {report.overlap_val_train}  test/train: {report.overlap_test_train}  "
        f"val/test: {report.overlap_val_test}"
    )
    for split, path in report.files.items():
        print(f"wrote {split}: {path}")
    overlaps = report.overlap_val_train + report.overlap_test_train + report.overlap_val_test
    return 1 if overlaps else 0


def cmd_init_model(args: argparse.Namespace) -> int:
    from rlarith.tinymodel import init_model

    out = init_model(args.out, hidden=args.hidden, layers=args.layers, seed=args.seed)
    print(f"wrote a tiny Llama and its tokenizer to {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(to_yaml(cfg), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlarith", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="problem sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="build held-out sets, verify they never overlap training, write them")
    _config_args(p)
    p.add_argument("--out", default=None, help="where to write val/test JSONL (default: <run dir>/data)")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("init-model", help="build a tiny local Llama + tokenizer (no download)")
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"rlarith: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
