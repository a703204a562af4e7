"""A run's directory: where its resolved config, metrics and checkpoints go.

Owns: ``make_run_dir`` (creating it, or one line saying why it cannot be) and ``start_run``, which saves the fully resolved config as ``config.yaml`` in the run directory
(so every run can be reproduced from what it wrote) and prints, on the main rank, the sections
that matter to this run (``run_config_view``): the Slurm section of a local run, say, is noise in
every worker's log.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from longtrain.config import ConfigError


def run_config_view(cfg) -> tuple[dict, list[str]]:
    """The resolved config without the sections this run does not use, and their names."""
    d = cfg.to_dict()
    omitted = []
    for backend in ("slurm", "ray"):
        if cfg.launch.backend != backend:
            del d["launch"][backend]
            omitted.append(f"launch.{backend}")
    if not cfg.eval.every_eval:
        del d["eval"]
        omitted.append("eval")
    return d, omitted


def make_run_dir(path: Path) -> Path:
    """Create ``path`` (a run directory or a folder in one); a ConfigError naming the obstacle if it cannot."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in [path, *path.parents] if p.exists()), None)
        why = (f"{blocker} is a file, not a directory" if blocker is not None and not blocker.is_dir()
               else f"{e.strerror}")
        raise ConfigError(f"logging.run_dir: cannot create {path}: {why}; point logging.run_dir (and "
                          f"logging.name) at a directory you can write.") from None
    return path


def start_run(cfg, dims) -> Path:
    run_dir = cfg.run_dir
    if dims.is_main:
        make_run_dir(run_dir)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        view, omitted = run_config_view(cfg)
        text = yaml.safe_dump(view, sort_keys=False)
        print(f"[longtrain] resolved config (unused here: {', '.join(omitted) or 'none'}; all of it in "
              f"{run_dir / 'config.yaml'}):\n" + "\n".join("  " + line for line in text.splitlines()))
        print(f"[longtrain] run directory: {run_dir.resolve()}")
    return run_dir
