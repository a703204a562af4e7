"""The worker's view of the job: one set of torchrun-style variables, whatever started it.

Owns: ``normalize_env``, which every worker calls before training. The trainer (through
``longtrain.parallel.mesh.init_distributed``) reads only RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT -- torchrun's contract -- so no backend-specific
code reaches it. The backends differ only in who fills those in:

- local (torch elastic) and Ray: the launcher sets them; this module keeps them as they are.
- Slurm: ``srun`` gives every task SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, ...;
  they are mapped here. The master is the first host of the step's node list (the same answer as
  ``scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1``) and the port is derived from the job
  id and the restart count, so every task of every node computes the same rendezvous point from
  its own environment, with no file or service to share. A requeued job gets a new port, so a
  socket of the previous run still in TIME_WAIT cannot block it.
- nothing (``python -m longtrain.launch.worker`` by hand): a world of one on a free local port.

It also names how many times this job has been restarted (LONGTRAIN_RESTART_COUNT), so a worker
can tell a first start from a restart.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import MutableMapping, Optional

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class WorkerEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    restart_count: int
    source: str  # "torchrun" (a launcher set the variables), "slurm" or "single"
    node_rank: int = 0  # GROUP_RANK: which of the job's nodes this worker is on
    host: str = ""  # this worker's host name, so a multi-node log says where each rank ran

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}) "
                f"on host {self.host} (node {self.node_rank}) "
                f"master {self.master_addr}:{self.master_port} from {self.source} env, "
                f"restart {self.restart_count}")


def free_port(host: str = "") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed host list to names: ``gpu[01-03,07],cpu1`` -> gpu01 gpu02 gpu03 gpu07 cpu1.

    ``scontrol show hostnames`` does the same on a Slurm node; this fallback is for when the
    command is not on PATH inside the task (containers) and for tests.
    """
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", spec.strip()):
        prefix, ranges = m.group(1), m.group(2)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if hi:
                hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(prefix + lo)
    return hosts


def first_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    hosts = expand_hostlist(nodelist)
    if not hosts:
        raise RuntimeError(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r}")
    return hosts[0]


def tasks_per_node(spec: str) -> list[int]:
    """``SLURM_STEP_TASKS_PER_NODE`` like ``4(x2),3`` -> [4, 4, 3]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise RuntimeError(f"cannot parse SLURM tasks per node {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_master_port(job_id: int, restart_count: int) -> int:
    """The rendezvous port of a Slurm job: fixed by its id and restart count, in 20000-39999."""
    return 20000 + (job_id * 7 + restart_count * 3001) % 20000


def _int(env: MutableMapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set")
        return default
    return int(value)


def restart_count(env: MutableMapping[str, str]) -> int:
    """How many times this job was restarted: by torch elastic, Ray (our driver) or Slurm requeue."""
    return (_int(env, "TORCHELASTIC_RESTART_COUNT", 0) + _int(env, "SLURM_RESTART_COUNT", 0)
            + _int(env, "LONGTRAIN_ATTEMPT", 0))


def normalize_env(env: Optional[MutableMapping[str, str]] = None) -> WorkerEnv:
    """Fill in the torchrun variables from whatever started this process; return what they are."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        source = "torchrun"
        env.setdefault("LOCAL_RANK", env["RANK"])
        env.setdefault("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env:
            if int(env["WORLD_SIZE"]) > 1:
                raise RuntimeError("RANK and WORLD_SIZE are set but MASTER_PORT is not; every rank must be "
                                   "given the same MASTER_ADDR and MASTER_PORT by its launcher.")
            env["MASTER_PORT"] = str(free_port())
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        # a task started by srun (the batch script itself has no SLURM_STEP_NUM_TASKS: it is not a worker)
        source = "slurm"
        node_id = _int(env, "SLURM_NODEID", 0)
        per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"]))
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["LOCAL_WORLD_SIZE"] = str(per_node[node_id] if node_id < len(per_node) else per_node[0])
        env["GROUP_RANK"] = str(node_id)
        if not env.get("MASTER_ADDR"):
            env["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
        if not env.get("MASTER_PORT"):
            env["MASTER_PORT"] = str(slurm_master_port(_int(env, "SLURM_JOB_ID"), restart_count(env)))
    else:
        source = "single"
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port("127.0.0.1")))
    count = restart_count(env)
    env["LONGTRAIN_RESTART_COUNT"] = str(count)
    return WorkerEnv(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"), local_rank=_int(env, "LOCAL_RANK"),
                     local_world_size=_int(env, "LOCAL_WORLD_SIZE"), master_addr=env["MASTER_ADDR"],
                     master_port=_int(env, "MASTER_PORT"), restart_count=count, source=source,
                     node_rank=_int(env, "GROUP_RANK", 0), host=socket.gethostname())
