"""The ``longtrain`` command: ``train``, ``launch``, ``data``, ``plan``, ``ckpt``, ``eval``.

Owns: argument parsing and dispatch only. Each subsystem registers its own subcommand through an
``add_cli(subparsers)`` function in its package, so this file does not grow with them.
``longtrain train`` with no arguments runs the embedded default: the tiny looped transformer on
byte-level Python standard-library source, on CPU, in a couple of minutes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from longtrain.config import ConfigError, load_config

_SUBSYSTEM_CLIS = (
    "longtrain.launch.cli",
    "longtrain.data.cli",
    "longtrain.memory.cli",
    "longtrain.trainer.ckpt_cli",
    "longtrain.trainer.eval_cli",
)


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [section.key=value ...]``: the first argument without '=' is the config."""
    config, overrides = None, []
    for a in args:
        if "=" not in a and config is None and not overrides:
            config = a
        else:
            overrides.append(a)
    return config, overrides


def _train(ns: argparse.Namespace) -> int:
    config, overrides = split_config_args(ns.args)
    cfg = load_config(config, overrides)
    from longtrain.trainer.train import train

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
    t.add_argument("args", nargs="*", metavar="[CONFIG] [section.key=value ...]")
    t.add_argument("--no-print-result", dest="print_result", action="store_false")
    t.set_defaults(func=_train)
    for mod in _SUBSYSTEM_CLIS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("longtrain"):
                continue  # that subsystem is not built yet
            raise
        m.add_cli(sub)
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
    except ConfigError as e:
        print(f"longtrain: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
