"""``longtrain eval [--nproc N] RUN_DIR|CHECKPOINT [section.key=value ...]``: long-context evaluation.

Owns: the argparse wiring only; the evaluation is ``longtrain.trainer.evaluate``. The model is
built from the checkpoint's saved config (the overrides apply on top: a longer ``data.seq_len``,
another ``model.rope_scaling``, ``eval.*``, a layout such as ``parallel.sp=2``), the weights are
loaded without optimizer state, and the results go to ``<run_dir>/eval/step-N.json`` with PNG
plots and TensorBoard scalars. One process by default, or under ``torchrun`` as it sets the
environment; ``--nproc N`` starts N local workers through the same launcher as training.
"""

from __future__ import annotations

import argparse

from longtrain.config import load_config
from longtrain.errors import UserError, report_user_error
from longtrain.launch.local import launch_local
from longtrain.trainer.evaluate import eval_overrides, evaluate_worker


def _eval(ns: argparse.Namespace) -> int:
    try:
        config, overrides = eval_overrides(ns.target, ns.overrides)
        if ns.nproc > 1:
            overrides += [f"launch.nproc_per_node={ns.nproc}", "launch.backend=local", "launch.nodes=1",
                          "launch.max_restarts=0", "launch.entry=longtrain.trainer.evaluate:evaluate_worker"]
            return launch_local(load_config(config, overrides), config, overrides)
        evaluate_worker(load_config(config, overrides))
    except UserError as e:  # a checkpoint, config or data problem: one line, exit code 2
        return report_user_error(e, "longtrain eval")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval", help="long-context evaluation of a checkpoint: loss by position, passkey, loss by loop count",
        description="Long-context evaluation of a checkpoint: loss by position, passkey retrieval (length x "
                    "depth) and, for looped models, loss against loop count; JSON, TensorBoard scalars and PNG "
                    "plots under <run_dir>/eval. RUN_DIR|CHECKPOINT is a run directory (runs/<name>), its "
                    "checkpoint directory or a step directory; overrides are section.key=value (eval.*, "
                    "data.seq_len, parallel.*, model.rope_scaling.*).")
    p.add_argument("target", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--nproc", type=int, default=1, help="local worker processes (e.g. 2 with parallel.sp=2)")
    p.set_defaults(func=_eval)
    return p
