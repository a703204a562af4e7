"""A run's directory: where its resolved config, metrics and checkpoints go.

Owns: ``start_run``, which prints the fully resolved config at start (main rank) and saves it as
``config.yaml`` in the run directory, so every run can be reproduced from what it wrote.
"""

from __future__ import annotations

from pathlib import Path


def start_run(cfg, dims) -> Path:
    run_dir = cfg.run_dir
    if dims.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = cfg.to_yaml()
        (run_dir / "config.yaml").write_text(text)
        print("[longtrain] resolved config:\n" + "\n".join("  " + line for line in text.splitlines()))
        print(f"[longtrain] run directory: {run_dir.resolve()}")
    return run_dir
