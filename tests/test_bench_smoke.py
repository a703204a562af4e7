"""The benchmark scripts run end to end on a CPU and write the result schema the tables read.

GPU numbers cannot be checked here; what is checked: bench_train.py builds a job through the
normal config/setup path, runs timed steps and writes every schema key with sane values; the
profile summary sums kernels by category correctly (a synthetic trace); the longest-sequence
search converges on the boundary, and runs a length the planner refuses with its leanest policy
forced (a real trial, here against a simulated OOM); ``--gpu-cap-gb`` plans for the capped card and
refuses a CPU run; the table's configuration and step-time-over-ours columns; the ideal step's
arithmetic. The ALST baseline needs DeepSpeed and is skipped unless LONGTRAIN_ALST_SMOKE=1 (DeepSpeed
JIT-builds its CPU communication op, which takes minutes the first time). The ALST optimizer
fallback, the torchtitan baseline and the race script: tests/test_bench_race.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
from longest_seq import Search  # noqa: E402


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("BENCH_SIMULATE_OOM_ABOVE", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = "2"
    return env


def test_bench_train_tiny_cpu_writes_every_schema_key(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--config", "llama3.2-1b", "--device", "cpu",
           "--tiny", "--steps", "2", "--warmup", "1", "--out", str(out), "--planner"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    missing = [k for k in common.SCHEMA_KEYS if k not in rec]
    assert not missing, missing
    assert rec["status"] == "ok", rec.get("error")
    assert rec["system"] == "longtrain" and rec["seq_len"] == 256 and rec["world_size"] == 1
    assert len(rec["step_times_s"]) == 2 and rec["step_time_s_median"] > 0
    assert rec["tokens_per_step"] == 256 * rec["batch_size"]
    assert rec["tokens_per_s"] == pytest.approx(rec["tokens_per_step"] / rec["step_time_s_median"])
    assert rec["tokens_per_s_per_gpu"] == pytest.approx(rec["tokens_per_s"])
    assert 0 < rec["mfu_causal"] < rec["mfu"]  # the causal count is the smaller one
    assert rec["flops_per_token_causal"] < rec["flops_per_token"]
    assert rec["peak_host_rss_gib"] > 0 and rec["peak_gpu_mem_gib"] is None  # no GPU here
    assert "skipped" in rec["profile"]
    assert "planner" in rec and "available" in rec["planner"]
    assert rec["loss"] > 0
    assert rec["configuration"].startswith("sp=1 dp=1 policy=manual recompute=none")
    assert rec["kernel_rates"] == {"skipped": "no GPU"} and rec["ideal"]["skipped"] == "no GPU"
    assert rec["ideal"]["matmul_flops_per_token"] > 0 and rec["step_breakdown"] == {}


def test_bench_train_records_oom_and_exits_3(tmp_path):
    out = tmp_path / "r.json"
    env = _env()
    env["BENCH_SIMULATE_OOM_ABOVE"] = "128"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--config", "llama3.2-1b", "--device", "cpu",
           "--tiny", "--steps", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["status"] == "OOM" and rec["failed_rank"] == 0


def test_gpu_cap_sets_the_planner_budget_and_refuses_a_cpu_run(tmp_path):
    import bench_train

    args = bench_train.build_parser().parse_args(["--tiny", "--device", "cpu", "--gpu-cap-gb", "40"])
    assert "memory.gpu_budget_gb=40" in bench_train.build_overrides(args)
    args = bench_train.build_parser().parse_args(["--gpu-cap-gb", "40", "memory.gpu_budget_gb=30"])
    ov = bench_train.build_overrides(args)
    assert ov.index("memory.gpu_budget_gb=30") > ov.index("memory.gpu_budget_gb=40")  # the user's wins
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--config", "llama3.2-1b", "--device", "cpu",
           "--tiny", "--steps", "1", "--warmup", "0", "--gpu-cap-gb", "40", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "--gpu-cap-gb 40: needs a CUDA device" in proc.stderr, proc.stderr[-2000:]
    assert json.loads(out.read_text())["status"] == "error"
    # the search starts where the planner puts the capped card, whichever way the flag is spelled
    import longest_seq

    starts = [longest_seq.planner_start(longest_seq.build_parser().parse_args(
        ["--config", "llama3.2-1b", "--log", str(tmp_path / "l.json"), "--", *flag]))
        for flag in (["--gpu-cap-gb", "16"], ["--gpu-cap-gb=16"], ["memory.gpu_budget_gb=16"])]
    assert starts[0] == starts[1] == starts[2] and starts[0][1] == "planner.plan", starts


def test_profile_summary_sums_categories_and_exposed_communication(tmp_path):
    # times in microseconds; a 10 ms step
    ev = [
        {"ph": "X", "cat": "kernel", "name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma", "ts": 0, "dur": 3000},
        {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm_bf16bf16_bf16f32", "ts": 3000, "dur": 2000},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "ts": 4000, "dur": 2000},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 6000, "dur": 1000},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 7000, "dur": 500},
        {"ph": "X", "cat": "kernel", "name": "void at::native::(anonymous namespace)::multi_tensor_apply_kernel"
                                            "<FusedAdamMathFunctor<float, 4>>", "ts": 8000, "dur": 500},
        {"ph": "X", "cat": "kernel", "name": "elementwise_kernel_add", "ts": 8500, "dur": 500},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9000},  # host events are ignored
        {"ph": "X", "cat": "user_annotation", "name": "Optimizer.step#AdamW.step", "ts": 7900, "dur": 800},
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    s = common.summarize_trace(str(path), step_time_s=0.010)
    assert s["kernel_time_s"]["attention"] == pytest.approx(0.003)
    assert s["kernel_time_s"]["communication"] == pytest.approx(0.002)
    assert s["kernel_time_s"]["offload_dtoh"] == pytest.approx(0.001)
    assert s["kernel_time_s"]["offload_htod"] == pytest.approx(0.0005)
    assert s["kernel_time_s"]["matmul"] == pytest.approx(0.002)
    assert s["kernel_time_s"]["optimizer"] == pytest.approx(0.0005)
    assert s["kernel_time_s"]["other"] == pytest.approx(0.0005)
    assert s["optimizer_host_s"] == pytest.approx(0.0008)
    assert s["attention_share"] == pytest.approx(0.3)
    assert s["offload_share"] == pytest.approx(0.15)
    # the all-gather (4-6 ms) overlaps the gemm (3-5 ms) for 1 ms: 1 ms exposed
    assert s["exposed_communication_s"] == pytest.approx(0.001)
    assert s["gpu_busy_s"] == pytest.approx(0.0085)
    assert s["communication_by_op_s"] == {"AllGather": pytest.approx(0.002)}
    # the step's shares: an ideal of 4 ms leaves 1 ms of attention + matmul time as recomputation
    b = common.step_breakdown(s, {"step_s": 0.004})
    assert b["attention"] == pytest.approx(0.3) and b["matmul"] == pytest.approx(0.2)
    assert b["recompute_est"] == pytest.approx(0.1)
    assert b["collectives"] == pytest.approx(0.2) and b["all_to_all"] == 0
    assert b["optimizer"] == pytest.approx(0.08)  # the host span is longer than the kernel
    assert b["offload"] == pytest.approx(0.15) and b["gpu_idle"] == pytest.approx(0.15)


def test_ideal_step_is_model_flops_at_the_measured_rates():
    from longtrain.config import load_config
    from longtrain.models.costs import flops_per_token, matmul_params_per_token

    m = load_config("llama3-8b", []).model
    seq, world = 131072, 2
    rates = {"matmul_flops": 734e12, "attention_flops": 567e12}
    i = common.ideal_step(m, seq, seq, world, rates)
    mm = 6 * matmul_params_per_token(m) * seq / world / 734e12
    attn = (flops_per_token(m, seq, causal=True) - 6 * matmul_params_per_token(m)) * seq / world / 567e12
    assert i["matmul_s"] == pytest.approx(mm) and i["attention_s"] == pytest.approx(attn)
    assert i["step_s"] == pytest.approx(mm + attn)
    assert 10 < i["step_s"] < 20  # 8B at 128K on 2 GPUs: ~14 s of kernels without recomputation
    assert common.ideal_step(m, seq, seq, world, {"skipped": "no GPU"})["skipped"] == "no GPU"


def test_kernel_rate_helpers_count_flops_and_fall_back_from_gqa(monkeypatch):
    # the timing is CUDA events on a GPU; here a fixed 10 ms per call, so the rates are FLOPs / 10 ms
    import torch

    monkeypatch.setattr(common, "_time_cuda", lambda fn, reps, device: (fn(), 0.01)[1])
    cpu = torch.device("cpu")
    assert common._matmul_rate(cpu, 64, 1) == pytest.approx(2 * 64 ** 3 / 0.01)
    r = common._attention_rate(cpu, 4, 2, 16, "math", 64, 1)
    assert r == {"attention_flops": pytest.approx(3 * 4 * 64 * 64 * 4 * 16 / 2 / 0.01)}
    # a pinned kernel that refuses the call (cuDNN has no CPU kernel): said, not guessed
    r = common._attention_rate(cpu, 4, 2, 16, "cudnn", 64, 1)
    assert r["attention_flops"] is None and "attention_error" in r and "K/V expanded" in r["attention_gqa_note"]
    assert common.kernel_rates(cpu, 4, 2, 16) == {"skipped": "no GPU"}


def test_table_prints_each_configuration_and_the_step_time_over_longtrains():
    recs = [{"system": "longtrain", "config": "llama3-8b", "seq_len": 131072, "status": "ok",
             "step_time_s_median": 20.0, "configuration": "sp=2 policy=auto"},
            {"system": "alst", "config": "llama3-8b", "seq_len": 131072, "status": "ok",
             "step_time_s_median": 30.0, "configuration": "ZeRO-3 sp=2, optimizer gpu"},
            {"system": "torchtitan", "config": "llama3-8b", "seq_len": 262144, "status": "OOM",
             "configuration": "FSDP2 dp_shard=1 cp=2"}]
    lines = common.print_table(recs).splitlines()
    head = lines[0].split()
    assert head[-1] == "configuration" and "x_ours" in head and "ideal_s" in head
    alst = lines[2].split()
    assert alst[head.index("x_ours")] == "1.50" and lines[2].endswith("ZeRO-3 sp=2, optimizer gpu")
    assert lines[3].split()[head.index("x_ours")] == "-"  # no longtrain record at 256K


def test_search_doubles_then_bisects_to_one_unit():
    fits = 1000
    s = Search(q=64, start=256, grow=2.0, max_seq=1 << 20, rel_tol=0.0)
    tried = []
    while (seq := s.next()) is not None:
        tried.append(seq)
        s.record(seq, seq <= fits)
    assert tried[:3] == [256, 512, 1024]
    assert s.lo == 960 and s.hi == 1024 and all(t % 64 == 0 for t in tried)


def test_search_halves_when_the_start_fails():
    s = Search(q=64, start=4096, grow=2.0, max_seq=1 << 20, rel_tol=0.0)
    tried = []
    while (seq := s.next()) is not None:
        tried.append(seq)
        s.record(seq, seq <= 300)
    assert tried[:4] == [4096, 2048, 1024, 512]
    assert s.lo == 256 and s.hi == 320


def test_search_runs_what_the_planner_refuses_with_its_leanest_policy(tmp_path):
    # tiny Llama on the CPU with a GPU budget the planner fills near 4-5K tokens; the "GPU" (a
    # simulated OOM) holds 5120: the planner refuses 5120, the forced leanest trial passes it
    env = _env()
    env["BENCH_SIMULATE_OOM_ABOVE"] = "5120"
    log = tmp_path / "l.json"
    cmd = [sys.executable, str(ROOT / "bench" / "longest_seq.py"), "--config", "tiny-llama", "--unit", "512",
           "--max-trials", "6", "--trial-timeout-s", "120", "--log", str(log),
           # the torch optimizer offload: with "auto" a trial whose policy offloads the optimizer JIT-builds
           # DeepSpeed's CPU Adam first (60-120 s on 2 cores, or a wait on another build's lock), inside
           # the trial's timeout; the search, not DeepSpeed, is under test here
           "--", "--device", "cpu", "data.batch_size=1", "memory.gpu_budget_gb=1.12", "memory.optimizer_offload_impl=torch"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    d = json.loads(log.read_text())
    assert d["result"] == {"longest_ok": 5120, "shortest_fail": 5632}, d["trials"]
    forced = [t for t in d["trials"] if t.get("policy_forced")]
    assert [(t["seq_len"], t["outcome"]) for t in forced] == [(5120, "ok")]
    assert forced[0]["planner"].startswith("no_fit: ConfigError: no memory policy fits")
    mem = json.loads(Path(forced[0]["result_file"]).read_text())["resolved_memory"]
    assert mem["fsdp_cpu_offload"] and mem["offload_fraction"] == 1.0 and mem["recompute"] == "full"
    # the planner's own picks stay unforced
    assert all(t["outcome"] in ("ok", "OOM") and not t.get("policy_forced") for t in d["trials"] if t["seq_len"] != 5120)


@pytest.mark.skipif(not os.environ.get("LONGTRAIN_ALST_SMOKE"), reason="set LONGTRAIN_ALST_SMOKE=1 (needs deepspeed; JIT build)")
def test_alst_baseline_tiny_cpu(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    out = tmp_path / "a.json"
    cmd = [sys.executable, str(ROOT / "bench" / "alst_baseline.py"), "--config", "llama3.2-1b", "--device", "cpu",
           "--tiny", "--steps", "2", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["status"] == "ok" and rec["system"] == "alst"
    assert not [k for k in common.SCHEMA_KEYS if k not in rec]
    # --optimizer auto: the first attempt (optimizer on the device) fits, so no CPU Adam is built
    assert [a["optimizer"] for a in rec["optimizer_attempts"]] == ["gpu"] and not rec["optimizer_fallback"]
    assert rec["cpu_adam_build_s"] is None and rec["recipe"]["offload_optimizer"] == "none"
    assert rec["configuration"].startswith("ZeRO-3 sp=1, optimizer gpu, params gpu")
