"""``launch.backend=ray``: the workers as Ray actors in one placement group, one torch.distributed job.

Owns: ``launch_ray(cfg, config, overrides)``, the driver. The idea:

1. Make the config path and the run's paths absolute (``driver_paths``: Ray workers run where
   ``ray start`` ran), then connect to ``launch.ray.address`` (``auto``, ``HOST:6379``,
   ``ray://head:10001``; an address where nothing answers is an error within seconds) or start a
   local cluster.
2. Reserve one bundle per worker -- ``{CPU: cpus_per_worker, GPU: gpus_per_worker}`` -- in a
   placement group (``launch.ray.strategy``: PACK fills few nodes, SPREAD uses many), so a job
   either gets all of its workers or waits; it never half-starts.
3. Start one actor per bundle. Rank 0's actor reports its node IP and a free port there: that is
   MASTER_ADDR:MASTER_PORT. Ranks are numbered node by node (``rank_order``): SPREAD deals the
   bundles out round-robin, but the mesh puts tp, sp and dp_shard on neighbouring ranks and
   expects them inside one node, so each node gets a contiguous block of ranks; local ranks count
   actors on the same node. Each actor sets torchrun's variables and calls ``longtrain.launch.worker.run_worker``
   in its own process -- the same code path as the other backends.
4. Wait with ``ray.wait``: the first actor that dies or raises ends the attempt (the others would
   otherwise sit in a collective until its timeout). Every actor of the attempt is then killed
   and, while ``launch.max_restarts`` allows, a fresh group starts; the workers resume from the
   newest checkpoint by themselves. Fresh processes mean no stale process group survives. A
   worker stopped by a ``UserError`` (a bad setting, file or checkpoint) ends the job at once
   with its own one-line message: no restart can fix it. For any other exception the driver
   prints the worker's exception, not Ray's wrapper.
5. Each actor returns the training function's result dict; the driver prints rank 0's and
   returns it.

GPUs: Ray gives each actor CUDA_VISIBLE_DEVICES with only its own GPU. Co-located workers get
the union of their node's GPUs instead and LOCAL_RANK points at their own, so device
``cuda:LOCAL_RANK`` (what the mesh uses) is the GPU Ray assigned -- and NCCL sees its peers.

Ray is an optional dependency (``longtrain[ray]``): each function that needs it imports it, so
the other backends run without it installed.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from longtrain.config import Config, ConfigError, resolve_config_path
from longtrain.errors import EXIT_CODE_USER_ERROR, UserError, user_error_line
from longtrain.launch.env import free_port
from longtrain.launch.worker import run_worker

_ACTOR_CLASS = None


class TrainWorker:
    """One rank. Created as a Ray actor (``ray.remote(TrainWorker)``), one per placement bundle."""

    def __init__(self, rank: int):
        self.rank = rank

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this
        return f"rank{self.rank}"

    def describe(self) -> dict:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "free_port": free_port()}

    def run(self, env: dict, config: Optional[str], overrides: list[str]) -> dict:
        os.environ.update(env)
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        try:
            return {"ok": True, "result": run_worker(config, overrides)}
        except SystemExit as e:  # a checkpoint-and-stop request (exit code 85) or sys.exit in the entry
            return {"ok": False, "exit_code": e.code}
        except UserError as e:  # a bad setting, file or checkpoint: the driver shows this line, no restart
            return {"ok": False, "exit_code": EXIT_CODE_USER_ERROR, "error": user_error_line(e)}


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(max_restarts=0)(TrainWorker)
    return _ACTOR_CLASS


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A ConfigError within ``timeout_s`` when nothing listens at ``launch.ray.address``.

    ray.init retries an address where nothing answers for minutes; one TCP connection tells the
    user at once. ("auto" is Ray's own lookup of a cluster on this machine, which fails fast.)
    """
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"launch.ray.address={address!r} must be auto, HOST:PORT (the head's GCS, port 6379 "
                          f"by default) or ray://HOST:PORT (Ray Client, 10001).")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"launch.ray.address={address}: nothing answers at {host}:{port} within {timeout_s:.0f}s "
                          f"({e.strerror or type(e).__name__}); start the cluster there (`ray start --head`), fix "
                          f"the address, or leave launch.ray.address empty for a local cluster.") from None


def _connect(cfg: Config) -> bool:
    """ray.init as configured; True when this process started the cluster (and should stop it)."""
    import ray

    rc = cfg.launch.ray
    if ray.is_initialized():
        return False
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
    if rc.address:
        _check_reachable(rc.address)
        # a remote cluster's workers need this checkout on their path too (or longtrain installed)
        try:
            ray.init(address=rc.address, runtime_env={"env_vars": env} if env else None, log_to_driver=True)
        except ConnectionError as e:
            raise ConfigError(f"launch.ray.address={rc.address}: {str(e).splitlines()[0]} Start a cluster "
                              f"(`ray start --head`) or leave launch.ray.address empty for a local one.") from None
        return False
    ray.init(num_cpus=rc.num_cpus or None, include_dashboard=False, log_to_driver=True)
    return True


def _reserve(cfg: Config, n: int):
    import ray
    from ray.util.placement_group import placement_group

    rc = cfg.launch.ray
    bundle = {"CPU": rc.cpus_per_worker}
    if rc.gpus_per_worker:
        bundle["GPU"] = rc.gpus_per_worker
    pg = placement_group([dict(bundle) for _ in range(n)], strategy=rc.strategy, name="longtrain")
    try:
        ray.get(pg.ready(), timeout=rc.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
        raise ConfigError(
            f"Ray could not reserve {n} bundles of {bundle} with strategy {rc.strategy} within "
            f"{rc.placement_timeout_s:.0f}s; the cluster has {ray.cluster_resources()}. Lower "
            f"launch.nodes x launch.nproc_per_node or launch.ray.cpus_per_worker/gpus_per_worker, or add "
            f"nodes.") from None
    return pg


def rank_order(bundle_nodes: list[str]) -> list[int]:
    """Bundle indices in rank order: nodes in the order of their first bundle, each node's bundles
    together. ``[a, b, a, b]`` (what SPREAD gives) -> ``[0, 2, 1, 3]``: ranks 0-1 on a, 2-3 on b."""
    first = {node: i for i, node in reversed(list(enumerate(bundle_nodes)))}
    return sorted(range(len(bundle_nodes)), key=lambda i: (first[bundle_nodes[i]], i))


def _bundle_nodes(pg, n: int) -> list[str]:
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(pg)["bundles_to_node_id"]
    return [table[i] for i in range(n)]


def _worker_envs(infos: list[dict], attempt: int, cfg: Config) -> list[dict]:
    """torchrun's variables per rank from what the actors reported (``infos[rank]``)."""
    master = infos[0]
    by_node: dict[str, list[int]] = {}
    for rank, info in enumerate(infos):
        by_node.setdefault(info["ip"], []).append(rank)
    threads = max(1, int(cfg.launch.ray.cpus_per_worker))
    envs = []
    for rank, info in enumerate(infos):
        peers = by_node[info["ip"]]
        env = {"RANK": str(rank), "WORLD_SIZE": str(len(infos)), "LOCAL_RANK": str(peers.index(rank)),
               "LOCAL_WORLD_SIZE": str(len(peers)), "GROUP_RANK": str(list(by_node).index(info["ip"])),
               "MASTER_ADDR": master["ip"], "MASTER_PORT": str(master["free_port"]),
               "LONGTRAIN_ATTEMPT": str(attempt), "OMP_NUM_THREADS": str(threads)}
        node_gpus = sorted({g for r in peers for g in infos[r]["gpus"]}, key=lambda g: (len(g), g))
        if node_gpus and len(info["gpus"]) == 1:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
            env["LOCAL_RANK"] = str(node_gpus.index(info["gpus"][0]))
        envs.append(env)
    return envs


def _run_attempt(cfg: Config, pg, n: int, attempt: int, config, overrides, loopback: bool) -> tuple[str, Any]:
    """Start n actors, run them to the end or the first failure, kill them.

    ("ok", the ranks' results), ("failed", why) or ("user_error", the worker's line): a restart
    cannot fix the last."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    rc = cfg.launch.ray
    cls = _actor_class()
    bundles = rank_order(_bundle_nodes(pg, n))  # bundles[rank]: the bundle that rank runs in
    actors = [cls.options(num_cpus=rc.cpus_per_worker, num_gpus=rc.gpus_per_worker,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=b))
              .remote(rank) for rank, b in enumerate(bundles)]
    try:
        infos = ray.get([a.describe.remote() for a in actors])
        node_ip = {nd["NodeID"]: nd["NodeManagerAddress"] for nd in ray.nodes()}  # as the cluster knows them
        for info in infos:
            # a cluster of this machine only (started here): rendezvous on the loopback interface
            info["ip"] = "127.0.0.1" if loopback else node_ip[info["node_id"]]
        envs = _worker_envs(infos, attempt, cfg)
        print(f"[longtrain] ray: attempt {attempt}: {n} workers, master {envs[0]['MASTER_ADDR']}:"
              f"{envs[0]['MASTER_PORT']}, pids {[i['pid'] for i in infos]}", flush=True)
        refs = [a.run.remote(env, config, overrides) for a, env in zip(actors, envs)]
        rank_of = {ref: r for r, ref in enumerate(refs)}
        results: dict[int, dict] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ref = done[0]
            try:
                out = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                return "failed", f"rank {rank_of[ref]} failed: {_worker_error(e)}"
            if not out.get("ok"):
                if out.get("exit_code") == EXIT_CODE_USER_ERROR:
                    return "user_error", f"rank {rank_of[ref]}: {out['error']}"
                return "failed", f"rank {rank_of[ref]} exited with code {out.get('exit_code')}"
            results[rank_of[ref]] = out["result"]
        return "ok", [results[r] for r in range(n)]
    finally:
        for a in actors:  # the whole group goes, healthy ranks too: they cannot continue without the others
            ray.kill(a, no_restart=True)


def _worker_error(e: Exception) -> str:
    """The worker's own exception (``TypeError: ...``) rather than Ray's wrapper around it."""
    cause = getattr(e, "cause", None)  # RayTaskError: the exception the actor raised
    if isinstance(cause, BaseException):
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[0] if text else ''}"
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def driver_paths(cfg: Config, config: Optional[str], overrides: list[str]) -> tuple[Optional[str], list[str]]:
    """The config path and the run's paths made absolute here, on the driver.

    Ray workers run in the directory where ``ray start`` ran, not where ``longtrain launch`` did,
    so a relative ``my.yaml``, run directory or data path would name something else there (or
    nothing). The overrides appended last win over the ones given.
    """
    def absolute(p: str) -> str:
        return str(Path(p).expanduser().resolve())

    fixed = [f"logging.run_dir={str(cfg.run_dir.resolve()).replace('{', '{{').replace('}', '}}')}"]
    if cfg.data.path:
        fixed.append(f"data.path={absolute(cfg.data.path)}")
    if cfg.data.tokenizer != "byte" and Path(cfg.data.tokenizer).exists():
        fixed.append(f"data.tokenizer={absolute(cfg.data.tokenizer)}")
    for key in ("dir", "init_from_hf"):
        if getattr(cfg.checkpoint, key):
            fixed.append(f"checkpoint.{key}={absolute(getattr(cfg.checkpoint, key))}")
    if cfg.checkpoint.resume not in ("auto", "none"):
        fixed.append(f"checkpoint.resume={absolute(cfg.checkpoint.resume)}")
    config = str(resolve_config_path(config).resolve()) if config is not None else None
    return config, [*overrides, *fixed]


def launch_ray(cfg: Config, config: Optional[str], overrides: list[str]) -> int:
    """Run the job on Ray; the exit code: 0 done (rank 0's result printed), EXIT_CODE_USER_ERROR
    when a worker stopped on an error a restart cannot fix, 1 when it failed after every restart."""
    import ray
    from ray.util.placement_group import remove_placement_group

    lc = cfg.launch
    n = lc.nodes * lc.nproc_per_node
    config, overrides = driver_paths(cfg, config, overrides)
    started = _connect(cfg)
    try:
        pg = _reserve(cfg, n)
        try:
            for attempt in range(lc.max_restarts + 1):
                t0 = time.monotonic()
                status, out = _run_attempt(cfg, pg, n, attempt, config, overrides, loopback=started)
                if status == "ok":
                    print("[longtrain] ray: done; rank 0 result: " + json.dumps(out[0], default=str), flush=True)
                    return 0
                if status == "user_error":
                    print(f"[longtrain] ray: {out} (not restarted: a restart cannot fix it)", file=sys.stderr,
                          flush=True)
                    return EXIT_CODE_USER_ERROR
                more = attempt < lc.max_restarts
                print(f"[longtrain] ray: attempt {attempt} ended after {time.monotonic() - t0:.0f}s: {out}; "
                      + (f"restarting the group from the newest checkpoint ({attempt + 1} of {lc.max_restarts})"
                         if more else f"giving up after {lc.max_restarts} restart(s)"),
                      file=sys.stderr, flush=True)
            return 1
        finally:
            remove_placement_group(pg)
    finally:
        if started:
            ray.shutdown()
