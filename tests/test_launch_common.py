"""Launcher pieces that need no cluster: the Slurm -> torchrun environment mapping, host lists,
the sbatch script, and the helpers the launcher tests share (tiny configs, process lookups)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longtrain.config import load_config
from longtrain.launch.env import expand_hostlist, normalize_env, slurm_master_port, tasks_per_node

ROOT = Path(__file__).resolve().parent.parent

TINY = ["model.arch=llama", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_dim=64", "data.seq_len=32", "data.batch_size=2", "schedule.warmup_steps=2",
        "logging.progress=false", "logging.tensorboard=false", "schedule.eval_every=0", "logging.log_every=1",
        "checkpoint.async_save=false"]


# The run every resume test repeats: long enough (~4 s of steps on 2 cores) that a kill lands mid-run.
STEPS, EVERY = 120, 30


def tiny_overrides(run_dir: Path, steps: int = STEPS, every: int = EVERY, *extra: str) -> list[str]:
    return [*TINY, f"schedule.steps={steps}", f"checkpoint.every_steps={every}", f"logging.run_dir={run_dir}",
            *extra]


def worker_env() -> dict:
    """The environment for launcher subprocesses: this checkout importable, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def train_worker(run_dir: Path, *args: str, nproc: int = 1) -> tuple[list[dict], str]:
    """Train with ``longtrain.launch.worker`` into ``run_dir``: one process, or ``nproc`` under
    torchrun sharing the data-parallel dimension (``parallel.dp_shard=-1``). Returns the metric
    rows that carry a loss, and the run's output."""
    import json

    args = [*args, f"logging.run_dir={run_dir}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "longtrain.launch.worker", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "longtrain.launch.worker", *args, "parallel.dp_shard=-1"]
    r = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"loss"' in line]
    return rows, r.stdout + r.stderr


def longtrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "longtrain.cli", *args]


def final_loss(run_dir: Path) -> tuple[int, float]:
    """(step, loss) of the last logged training step of a run (metrics.jsonl)."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return rows[-1]["step"], rows[-1]["loss"]


def latest_checkpoint_step(run_dir: Path) -> int:
    """The step of the newest committed checkpoint (0 when there is none yet)."""
    latest = run_dir / "checkpoints" / "latest"
    try:
        return int(latest.read_text().strip().rsplit("-", 1)[-1])
    except (OSError, ValueError):
        return 0


def run_launch(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    r = subprocess.run(longtrain_cmd("launch", *args), env=worker_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"longtrain launch failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


_REFERENCE: dict = {}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> tuple[int, float]:
    """(step, loss) at the end of the undisturbed 2-worker run (local backend) the resume tests match.

    Each test module imports this fixture, which pytest counts as one fixture per module; the
    cache makes it one run per session.
    """
    if "result" not in _REFERENCE:
        run_dir = tmp_path_factory.mktemp("reference")
        run_launch("launch.backend=local", "launch.nproc_per_node=2", *tiny_overrides(run_dir))
        _REFERENCE["result"] = final_loss(run_dir)
    return _REFERENCE["result"]


def metrics_steps(run_dir: Path) -> list[int]:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc; workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------ tests


def test_slurm_env_maps_to_torchrun_variables():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "1234", "SLURM_RESTART_COUNT": "2", "PATH": ""}  # no scontrol on PATH: the parser
    w = normalize_env(env)
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size) == (5, 8, 1, 4)
    assert w.master_addr == "gpu07" and w.source == "slurm" and w.restart_count == 2
    assert w.master_port == slurm_master_port(1234, 2) != slurm_master_port(1234, 1)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["MASTER_ADDR"] == "gpu07"


def test_the_batch_shell_is_not_taken_for_a_worker_and_launcher_variables_win():
    single = normalize_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"})  # sbatch, no srun
    assert (single.world_size, single.source) == (1, "single")
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "2950",
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "TORCHELASTIC_RESTART_COUNT": "1"}
    w = normalize_env(env)
    assert (w.rank, w.world_size, w.master_addr, w.master_port, w.source) == (1, 2, "10.0.0.1", 2950, "torchrun")
    assert w.restart_count == 1


def test_hostlists_and_tasks_per_node():
    assert expand_hostlist("gpu[01-03,07],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu1"]
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("a[9-11]") == ["a9", "a10", "a11"]
    assert tasks_per_node("4(x2),3") == [4, 4, 3]
    if shutil.which("scontrol"):  # agrees with Slurm's own expansion
        out = subprocess.run(["scontrol", "show", "hostnames", "gpu[01-03,07],cpu1"], capture_output=True, text=True)
        if out.returncode == 0:
            assert out.stdout.split() == expand_hostlist("gpu[01-03,07],cpu1")


def test_sbatch_script_has_the_job_shape_requeue_and_signal(tmp_path):
    from longtrain.launch.slurm import sbatch_script

    cfg = load_config(None, ["launch.backend=slurm", "launch.nodes=2", "launch.nproc_per_node=4",
                             "launch.slurm.gpus_per_node=4", "launch.slurm.partition=gpu", "launch.slurm.account=proj",
                             "launch.slurm.time=02:00:00", "launch.slurm.signal_seconds=300",
                             "launch.slurm.extra_sbatch=[--constraint=h100, --exclusive]", f"logging.run_dir={tmp_path}"])
    text = sbatch_script(cfg, "tiny", ["launch.backend=slurm", "optim.lr=1e-3"])
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=02:00:00",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --constraint=h100",
                 "#SBATCH --exclusive", "scontrol requeue", 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1'):
        assert line in text, line
    assert "-m longtrain.launch.worker tiny launch.backend=slurm optim.lr=1e-3" in text
    r = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_launch_cli_dry_run_prints_the_script(tmp_path):
    r = subprocess.run(longtrain_cmd("launch", "tiny", "launch.backend=slurm", f"logging.run_dir={tmp_path}",
                                     "--dry-run"), env=worker_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/bash") and "#SBATCH --requeue" in r.stdout
    bad = subprocess.run(longtrain_cmd("launch", "tiny", "launch.bakend=slurm"), env=worker_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Did you mean 'backend'" in bad.stderr


def _stop_as_if_preempted(cfg):
    from longtrain.trainer.signals import CheckpointedExit

    raise CheckpointedExit(step=7)


def test_worker_notes_a_planned_exit_85_where_the_launcher_asks_and_exits_0(tmp_path, monkeypatch):
    from longtrain.launch.worker import main

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    args = [*TINY, "launch.entry=test_launch_common:_stop_as_if_preempted"]
    with pytest.raises(SystemExit) as e:  # no notes directory: the exit code passes through
        main(args)
    assert e.value.code == 85
    monkeypatch.setitem(os.environ, "LONGTRAIN_EXIT_NOTES", str(tmp_path))
    assert main(args) == 0 and (tmp_path / "exit-85").is_file()
    assert main([*TINY, "launch.entry=no.such:entry"]) == 2 and (tmp_path / "exit-2").is_file()


def test_sbatch_script_quotes_paths_with_a_space(tmp_path):
    from longtrain.launch.slurm import sbatch_script

    run_dir = tmp_path / "my run"
    text = sbatch_script(load_config(None, ["launch.backend=slurm", f"logging.run_dir={run_dir}"]), None,
                         [f"logging.run_dir={run_dir}"])
    assert f'#SBATCH --output="{run_dir}/slurm-%j.out"' in text
    assert f"NOTES='{run_dir}/launch'/exit-notes-" in text and f"'logging.run_dir={run_dir}'" in text


def test_ray_ranks_are_numbered_node_by_node_and_every_worker_names_its_host():
    from longtrain.launch.ray_backend import rank_order

    # SPREAD deals bundles round-robin; the mesh wants each node's ranks contiguous (dp_shard inside)
    assert rank_order(["a", "b", "a", "b"]) == [0, 2, 1, 3]
    assert rank_order(["b", "a", "b", "a", "b", "a"]) == [0, 2, 4, 1, 3, 5]
    assert rank_order(["a", "a", "b", "b"]) == [0, 1, 2, 3]
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "2950"}
    w = normalize_env(env)
    import socket

    assert w.node_rank == 1 and f"on host {socket.gethostname()} (node 1)" in w.describe()
