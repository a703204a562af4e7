"""Two real hosts on one machine (``launch/netns_hosts.sh``: network namespaces on a bridge, each with
its own address and hostname), and a job across both through each multi-node backend:

- Slurm: slurmctld on host 1, a slurmd per host; ``longtrain launch ... launch.backend=slurm
  launch.nodes=2 launch.nproc_per_node=2`` submits a real ``--nodes=2`` job; USR1 mid-run makes it
  checkpoint and requeue, and the requeued run resumes on both hosts;
- Ray: ``ray start --head`` on host 1, ``ray start --address`` on host 2; ``launch.ray.strategy=SPREAD``
  puts two workers on each; a worker killed on host 2 restarts the group from the newest checkpoint.

Both train HSDP (``parallel.dp_replicate=2`` across the hosts, ``dp_shard=2`` inside each) and must
give the one-process losses at every step (relative 1e-5; seen ~1e-7, only the summation order
differs), and every rank's start line names its host. Each test brings its hosts up and takes them
down again (namespaces, daemons, every process left in them) even when it fails. Skipped only where
this machine refuses namespaces (not root, or the kernel says no), with the reason.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_launch_common import ROOT, TINY, latest_checkpoint_step, longtrain_cmd, train_worker, wait_for, worker_env

SCRIPT = ROOT / "launch" / "netns_hosts.sh"
STEPS, EVERY = 80, 10  # a kill or signal after the first checkpoint lands mid-run
HSDP = ["launch.nodes=2", "launch.nproc_per_node=2", "parallel.dp_replicate=2", "parallel.dp_shard=2",
        "data.batch_size=1"]  # 4 ranks x 1 sequence = the reference's batch of 4


def _refused() -> str:
    if not shutil.which("ip") or not shutil.which("unshare") or not shutil.which("nsenter"):
        return "iproute2 / util-linux (ip, unshare, nsenter) are not installed"
    r = subprocess.run(["bash", str(SCRIPT), "check"], capture_output=True, text=True, timeout=60)
    return "" if r.returncode == 0 else f"this machine refuses network namespaces: {r.stdout.strip()}"


REFUSED = _refused()
pytestmark = pytest.mark.skipif(bool(REFUSED), reason=REFUSED or "namespaces work")


class Hosts:
    """A set of namespace hosts with its own prefix and subnet (so two tests never share one)."""

    def __init__(self, prefix: str, subnet: str):
        self.env = {**worker_env(), "LT_NETNS_PREFIX": prefix, "LT_NETNS_SUBNET": subnet,
                    "RAY": str(Path(sys.executable).with_name("ray")), "PYTHON": sys.executable}
        self.prefix, self.subnet = prefix, subnet

    def script(self, *args: str, timeout: float = 180) -> str:
        r = subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, f"netns_hosts.sh {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    def cmd(self, k: int, *argv: str) -> list[str]:
        return ["bash", str(SCRIPT), "exec", str(k), *argv]

    def run(self, k: int, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(k, *argv), env=self.env, capture_output=True, text=True, timeout=timeout)

    def pids(self, k: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", f"{self.prefix}{k}"], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


@contextlib.contextmanager
def two_hosts(prefix: str, subnet: str):
    hosts = Hosts(prefix, subnet)
    hosts.script("down")  # what a killed earlier run may have left
    try:
        hosts.script("up", "2")
        yield hosts
    finally:
        hosts.script("down")


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory) -> dict[int, float]:
    """Step -> loss of the same run in one process, with the whole batch of 4."""
    rows, _ = train_worker(tmp_path_factory.mktemp("one"), *TINY, "data.batch_size=4", f"schedule.steps={STEPS}",
                           "checkpoint.every_steps=0")
    return {r["step"]: r["loss"] for r in rows}


def run_overrides(run_dir: Path) -> list[str]:
    return [*TINY, *HSDP, f"schedule.steps={STEPS}", f"checkpoint.every_steps={EVERY}", f"logging.run_dir={run_dir}"]


def assert_one_process_losses(run_dir: Path, ref: dict[int, float]) -> None:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    by_step = {r["step"]: r["loss"] for r in rows}  # a resumed run logs its steps after the checkpoint again
    assert sorted(by_step) == sorted(ref), (sorted(by_step)[-3:], STEPS)
    worst = max(abs(by_step[s] - ref[s]) / ref[s] for s in ref)
    assert worst < 1e-5, f"HSDP across two hosts differs from one process by {worst:.2e} (relative)"


def ranks_on_hosts(log: str, prefix: str) -> dict[tuple[int, int], str]:
    """(restart, rank) -> host from every worker's start line."""
    found = re.findall(r"worker rank (\d+)/4 \(local \d/2\) on host (\S+) \(node (\d)\).*restart (\d+)", log)
    return {(int(restart), int(rank)): host for rank, host, node, restart in found}


# ---------------------------------------------------------------------------------------------- Slurm


def _slurm_missing() -> str:
    return "" if shutil.which("slurmctld") and shutil.which("slurmd") else \
        "Slurm is not installed (bash launch/slurm_setup.sh installs slurm-wlm and munge)"


@pytest.mark.skipif(bool(_slurm_missing()), reason=_slurm_missing() or "Slurm is installed")
def test_slurm_two_node_hsdp_job_requeues_on_usr1_resumes_on_both_hosts_and_matches_one_process(
        tmp_path, one_process_losses):
    with two_hosts("ltslurm", "10.231.1") as hosts:
        hosts.script("slurm-up")

        def job(job_id: str) -> dict:
            r = hosts.run(1, "scontrol", "show", "job", "-o", job_id)
            return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv) if r.returncode == 0 else {}

        r = hosts.run(1, *longtrain_cmd("launch", "launch.backend=slurm", "launch.slurm.time=10",
                                        *run_overrides(tmp_path)), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        job_id = re.search(r"submitted slurm job (\d+)", r.stdout).group(1)
        wait_for(lambda: latest_checkpoint_step(tmp_path) > 0, 240, "the first checkpoint")
        # what --signal=B:USR1@N does near the time limit, now: USR1 to the batch shell
        assert hosts.run(1, "scancel", "--signal=USR1", "--batch", job_id).returncode == 0
        wait_for(lambda: int(job(job_id).get("Restarts", 0)) >= 1 and job(job_id).get("JobState") == "PENDING",
                 120, "the job to requeue itself", interval=0.5)
        time.sleep(2)  # a start within the second of the requeue is refused ("Job credential revoked")
        hosts.run(1, "scontrol", "update", f"JobId={job_id}", "StartTime=now")
        wait_for(lambda: job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300,
                 "the requeued job to finish", interval=1)
        info = job(job_id)
        log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "ltslurm[1-2]", (info, log[-3000:])
    assert "exiting with code 85" in log and "requeueing" in log and "resumed from" in log, log[-4000:]
    hosts_of = ranks_on_hosts(log, "ltslurm")
    for restart in (0, 1):  # both runs: ranks 0-1 on host 1, 2-3 on host 2 (dp_shard inside a host)
        assert [hosts_of.get((restart, r)) for r in range(4)] == ["ltslurm1", "ltslurm1", "ltslurm2", "ltslurm2"], \
            hosts_of
    assert_one_process_losses(tmp_path, one_process_losses)


# ------------------------------------------------------------------------------------------------ Ray


def _ray_missing() -> str:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed (pip install 'ray[default]')"
    return "" if Path(sys.executable).with_name("ray").exists() else "the ray command is not next to this python"


@pytest.mark.skipif(bool(_ray_missing()), reason=_ray_missing() or "Ray is installed")
def test_ray_spread_hsdp_job_restarts_after_a_worker_dies_on_host_2_and_matches_one_process(
        tmp_path, one_process_losses):
    with two_hosts("ltray", "10.231.2") as hosts:
        hosts.script("ray-up", timeout=420)
        launcher = subprocess.Popen(
            hosts.cmd(1, *longtrain_cmd("launch", "launch.backend=ray", "launch.ray.address=10.231.2.1:6379",
                                        "launch.ray.strategy=SPREAD", "launch.max_restarts=1",
                                        *run_overrides(tmp_path))),
            env={**hosts.env, "RAY_DEDUP_LOGS": "0"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: latest_checkpoint_step(tmp_path) > 0, 300, "the first checkpoint")
            from test_launch_common import cmdline

            on_2 = [p for p in hosts.pids(2) if cmdline(p).startswith("ray::TrainWorker")]
            assert len(on_2) == 2, f"SPREAD should put 2 workers on host 2: {[(p, cmdline(p)) for p in on_2]}"
            subprocess.run(["kill", "-KILL", str(on_2[-1])], check=True)
            out, _ = launcher.communicate(timeout=300)
        finally:
            if launcher.poll() is None:
                launcher.kill()  # `down` stops the cluster and whatever the driver left
                launcher.wait()
    assert launcher.returncode == 0, out[-4000:]
    assert "ray: attempt 0 ended" in out and "ray: attempt 1:" in out and "resumed from" in out, out[-4000:]
    hosts_of = ranks_on_hosts(out, "ltray")
    for attempt in (0, 1):
        on = [hosts_of.get((attempt, r)) for r in range(4)]
        assert on[0] == on[1] != on[2] == on[3] and set(on) == {"ltray1", "ltray2"}, hosts_of
    assert_one_process_losses(tmp_path, one_process_losses)
