"""A worker's start prints the config sections that matter to its run; config.yaml keeps all."""

from longtrain.config import load_config
from longtrain.parallel.mesh import ParallelDims
from longtrain.trainer.run import start_run


def test_local_run_prints_no_slurm_or_ray_section_but_saves_them(tmp_path, capsys):
    cfg = load_config("tiny", [f"logging.run_dir={tmp_path}/run"])
    start_run(cfg, ParallelDims.from_config(cfg, world_size=1))
    printed = capsys.readouterr().out
    assert "resolved config (unused here: launch.slurm, launch.ray, eval;" in printed
    assert "slurm:" not in printed and "ray:" not in printed and "partition:" not in printed
    assert "backend: local" in printed and "seq_len: 256" in printed
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.to_dict() == cfg.to_dict()  # everything, Slurm and Ray included


def test_slurm_run_prints_its_slurm_section(tmp_path, capsys):
    cfg = load_config("tiny", [f"logging.run_dir={tmp_path}/run", "launch.backend=slurm",
                               "launch.slurm.partition=gpu"])
    start_run(cfg, ParallelDims.from_config(cfg, world_size=1))
    printed = capsys.readouterr().out
    assert "partition: gpu" in printed and "ray:" not in printed
