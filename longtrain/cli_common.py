"""What every ``longtrain`` command line shares: ``[CONFIG] [section.key=value ...]``.

Owns: the convention the commands that take a config (``train``, ``launch``, ``plan``, and the
worker every launcher starts) use for their positional arguments -- an optional config (a YAML
path or a shipped config name) followed by overrides -- so they all read them the same way. The
top-level ``longtrain.cli`` and the subsystems' CLIs import it; it imports nothing of theirs.
"""

from __future__ import annotations

import argparse

CONFIG_ARGS_METAVAR = "[CONFIG] [section.key=value ...]"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The positional ``args`` that ``split_config_args`` splits."""
    parser.add_argument("args", nargs="*", metavar=CONFIG_ARGS_METAVAR)


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [section.key=value ...]``: the first argument without '=' is the config."""
    config, overrides = None, []
    for a in args:
        if "=" not in a and config is None and not overrides:
            config = a
        else:
            overrides.append(a)
    return config, overrides
