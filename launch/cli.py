"""``longtrain launch CONFIG [section.key=value ...] [--dry-run]``: start a job on a backend.

Owns: the ``launch`` subcommand and dispatch to ``launch.backend`` (local, ray, slurm). The
config and overrides are passed to every worker unchanged, so the workers load exactly the
config the launcher checked.
"""

from __future__ import annotations

import argparse

from longtrain.cli_common import add_config_args, split_config_args
from longtrain.config import load_config
from longtrain.launch.local import launch_local
from longtrain.launch.ray_backend import launch_ray
from longtrain.launch.slurm import launch_slurm


def _launch(ns: argparse.Namespace) -> int:
    config, overrides = split_config_args(ns.args)
    cfg = load_config(config, overrides)  # fail here, once, not in every worker
    backend = cfg.launch.backend
    if ns.dry_run and backend != "slurm":
        print(f"longtrain launch: --dry-run prints the sbatch script; it needs launch.backend=slurm "
              f"(got launch.backend={backend}).")
        return 2
    if backend == "local":
        return launch_local(cfg, config, overrides)
    if backend == "ray":
        return launch_ray(cfg, config, overrides)
    return launch_slurm(cfg, config, overrides, dry_run=ns.dry_run, wait=ns.wait)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", help="start a training job: local processes, a Ray cluster or a Slurm job",
        description="Start launch.nodes x launch.nproc_per_node workers on launch.backend "
                    "(local | ray | slurm); each runs `python -m longtrain.launch.worker CONFIG overrides`.")
    add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="slurm: print the sbatch script instead of submitting it")
    p.add_argument("--wait", action="store_true", help="slurm: wait for the job (and its requeues) to finish")
    p.set_defaults(func=_launch)
