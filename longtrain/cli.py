"""The ``longtrain`` command: ``train``, ``launch``, ``data``, ``plan``, ``ckpt``, ``eval``, ``sweep``.

Owns: argument parsing and dispatch only. Each subsystem registers its own subcommand through an
``add_cli(subparsers)`` function in its package, so this file does not grow with them; what the
commands share is ``longtrain.cli_common``.
``longtrain train`` with no arguments runs the embedded default: the tiny looped transformer on
byte-level Python standard-library source, on CPU, in a couple of minutes.
"""

from __future__ import annotations

import argparse
import sys

from longtrain.cli_common import add_config_args, split_config_args
from longtrain.config import load_config
from longtrain.data import cli as data_cli
from longtrain.errors import UserError, report_user_error
from longtrain.launch import cli as launch_cli
from longtrain.memory import cli as memory_cli
from longtrain.trainer import ckpt_cli, eval_cli, sweep
from longtrain.trainer.train import train

_SUBSYSTEM_CLIS = (launch_cli, data_cli, memory_cli, ckpt_cli, eval_cli, sweep)


def _train(ns: argparse.Namespace) -> int:
    config, overrides = split_config_args(ns.args)
    cfg = load_config(config, overrides)
    result = train(cfg)
    if result.get("loss") is not None and ns.print_result:
        print(f"[longtrain] done: step={result['step']} loss={result['loss']:.4f} run_dir={result['run_dir']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtrain", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", help="train in this process (or as one worker of a launched job)",
                       description="Train. CONFIG is a YAML path or a shipped config name "
                                   "(tiny, tiny-llama, llama3.2-1b, llama3-8b, looped-1b); "
                                   "overrides are section.key=value.")
    add_config_args(t)
    t.add_argument("--no-print-result", dest="print_result", action="store_false")
    t.set_defaults(func=_train)
    for mod in _SUBSYSTEM_CLIS:
        mod.add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]  # the embedded default job
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    try:
        return int(ns.func(ns) or 0)
    except UserError as e:  # a setting, a file, a checkpoint: one line, exit code 2
        return report_user_error(e)


if __name__ == "__main__":
    sys.exit(main())
