"""The instability monitors measure what they claim, warn past their thresholds, and reach
metrics.jsonl from a training run.

Values are checked against direct computations on a tiny model: the full attention matrix of
each block (softmax of the scaled, causally and document-masked q.k from the q and k the block
really used), the blocks' outputs, the logits of the full forward, and the parameters before and
after an optimizer step.
"""

from __future__ import annotations

import json
import math

import torch

from longtrain.config import load_config
from longtrain.models import build_model
from longtrain.models.attention import CoreAttention, dense_document_mask
from longtrain.parallel.mesh import ParallelDims
from longtrain.trainer.stability import StabilityMonitor

LLAMA = ["model.arch=llama", "model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=64", "model.n_layers=2", "model.max_seq_len=64", "data.seq_len=32", "logging.stability_every=2",
         "logging.stability.queries=8", "logging.stability.tokens=5", "schedule.device=cpu"]


def _setup(*over):
    cfg = load_config(None, LLAMA + list(over))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # larger q/k weights: sharper attention, so entropies differ per row
        for ref in model.blocks():
            ref.module.attention.wq.weight.mul_(20)
    return cfg, model, StabilityMonitor(model, cfg.logging, ParallelDims.from_config(cfg, world_size=1))


def _batch(docs: bool):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (2, 32), generator=g)
    doc_ids = torch.tensor([[0] * 10 + [1] * 22, [0] * 27 + [1] * 5]) if docs else None
    return tokens, tokens.roll(-1, 1), doc_ids


def _expected_attention(q, k, doc_ids, n):
    """Full attention probabilities from scratch, then the statistics of the last n rows."""
    B, S, H, D = q.shape
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    mask = torch.ones(S, S, dtype=torch.bool).tril()[None, None]
    if doc_ids is not None:
        mask = dense_document_mask(doc_ids)
    s = s.masked_fill(~mask, float("-inf"))[:, :, -n:]
    p = s.softmax(-1)
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return s.max().item(), ent.mean().item()


def test_monitor_values_match_direct_computation_and_fire_only_on_monitored_steps():
    for docs in (False, True):
        cfg, model, mon = _setup()
        tokens, labels, doc_ids = _batch(docs)
        seen, outs = {}, {}
        hooks = []
        for ref in model.blocks():
            core = next(m for m in ref.module.modules() if isinstance(m, CoreAttention))
            hooks.append(core.register_forward_pre_hook(lambda m, a, n=ref.name: seen.update({n: a[:2]}) or None))
            hooks.append(ref.module.register_forward_hook(
                lambda m, a, o, n=ref.name: outs.update({n: o.detach()}) or None))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mon.begin(0)  # step 1 of every 2: not monitored
        assert mon.handles == []
        mon.begin(1)
        loss = model(tokens, doc_ids=doc_ids, labels=labels)
        loss.backward()
        mon.after_backward()
        grads = {ref.name: torch.cat([p.grad.flatten() for p in ref.module.parameters()]) for ref in model.blocks()}
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt.step()
        out = mon.end(2)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        for h in hooks:
            h.remove()
        for ref in model.blocks():
            top, ent = _expected_attention(*seen[ref.name], doc_ids, 8)
            assert math.isclose(out[f"stability/attn_max_logit/{ref.name}"], top, rel_tol=1e-5), (ref.name, docs)
            assert math.isclose(out[f"stability/attn_entropy/{ref.name}"], ent, rel_tol=1e-5), (ref.name, docs)
            assert math.isclose(out[f"stability/act_rms/{ref.name}"], outs[ref.name].square().mean().sqrt().item(),
                                rel_tol=1e-5)
            assert math.isclose(out[f"stability/grad_rms/{ref.name}"], grads[ref.name].square().mean().sqrt().item(),
                                rel_tol=1e-5)
        assert math.isclose(out["stability/update_ratio"], ((after - before).norm() / before.norm()).item(), rel_tol=1e-5)
        assert out["stability/logz_drift"] == 0.0  # the first measurement is the reference
        assert out["stability/warnings"] == 0
        ents = [v for k, v in out.items() if "attn_entropy" in k]
        assert 0.0 < min(ents) and max(ents) < math.log(32)


def test_output_logit_statistics_are_those_of_the_last_tokens():
    cfg, model, mon = _setup()
    tokens, labels, _ = _batch(False)
    with torch.no_grad():
        logits = model(tokens)[:, -5:].float()
    mon.begin(1)
    model(tokens, labels=labels).backward()
    mon.after_backward()
    out = mon.end(2)
    assert math.isclose(out["stability/out_logit_max"], logits.max().item(), rel_tol=1e-6)
    assert math.isclose(out["stability/out_logit_mean"], logits.mean().item(), rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(out["stability/logz_mean"], torch.logsumexp(logits, -1).mean().item(), rel_tol=1e-6)


def test_warnings_fire_past_the_thresholds(capsys):
    cfg, model, mon = _setup("logging.stability.entropy_min=10", "logging.stability.attn_logit_max=0.001",
                             "logging.stability.output_logit_max=0.0001")
    tokens, labels, _ = _batch(False)
    mon.begin(1)
    model(tokens, labels=labels).backward()
    mon.after_backward()
    out = mon.end(2)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[longtrain] warning: step 2:")]
    assert out["stability/warnings"] == len(lines) == 2 * 2 + 1, lines  # 2 layers x (entropy, logit) + output
    assert any("attention entropy collapse in layers.0" in l for l in lines)
    assert any("attention logit growth in layers.1" in l for l in lines)
    assert any("output logit growth" in l for l in lines)


def test_a_training_run_logs_the_monitors_with_per_iteration_residual_rms(tmp_path):
    from longtrain.trainer.train import train

    over = ["model.arch=looped", "model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_dim=64", "model.loops=3", "model.loop_norm=true", "model.qk_norm=true",
            "model.norm_placement=peri", "optim.z_loss=1e-4", "memory.recompute=full", "data.source=synthetic",
            "data.seq_len=32", "data.batch_size=2", "schedule.steps=4", "schedule.warmup_steps=1",
            "schedule.eval_every=0", "schedule.device=cpu", "logging.stability_every=2", "logging.log_every=2",
            "logging.progress=false", "logging.tensorboard=false", "checkpoint.save_final=false",
            f"logging.run_dir={tmp_path}/run"]
    train(load_config(None, over))
    recs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    stab = [r for r in recs if "stability/update_ratio" in r]
    assert [r["step"] for r in stab] == [2, 4]
    r = stab[-1]
    assert {f"stability/loop_rms/{i}" for i in range(3)} <= set(r)
    # the core's output is normalised every iteration: RMS ~ 1 (its norm weight is still ~1)
    assert all(abs(r[f"stability/loop_rms/{i}"] - 1.0) < 0.1 for i in range(3)), r
    assert "stability/attn_entropy/core.layers.1" in r and "stability/grad_rms/prelude.0" in r
    assert math.isfinite(r["stability/logz_drift"])


def monitor_in_layout(model_over: list[str], parallel: dict) -> dict:
    """One monitored step on the parallel model and on a plain copy; every rank returns both."""
    from test_parallel_equivalence import local_slice, make_batch, make_config

    from longtrain.parallel import all_reduce_sum, init_distributed, parallelize

    over = model_over + ["logging.stability_every=1", "logging.stability.queries=8", "logging.stability.tokens=64"]
    cfg = make_config(over, parallel)
    dims = init_distributed(cfg)
    one = ParallelDims.from_config(make_config(over, {}), world_size=1)
    batch = make_batch(cfg, 2 * dims.dp_size, 0, docs=True)

    def measure(model, d, feed):
        mon = StabilityMonitor(model, cfg.logging, d)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mon.begin(0)
        b = feed(batch)
        loss = model(b["tokens"], b["position_ids"], b["doc_ids"], labels=b["labels"])
        (loss / all_reduce_sum((b["labels"] != -100).sum(), d)).backward()
        mon.after_backward()
        opt.step()
        return mon.end(1)

    torch.manual_seed(0)
    expect = measure(build_model(cfg.model), one, lambda b: b)
    torch.manual_seed(0)
    got = measure(parallelize(build_model(cfg.model), dims, cfg), dims, lambda b: local_slice(b, dims))
    return {"got": got, "expect": expect}


def test_monitors_under_tensor_and_sequence_parallel_equal_one_process():
    from dist_utils import run_distributed

    llama = ["model.arch=llama", "model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
             "model.ffn_dim=64", "model.n_layers=2", "model.max_seq_len=64", "model.qk_norm=true"]
    for parallel in ({"tp": 2}, {"sp": 2}):
        r = run_distributed(monitor_in_layout, 2, llama, parallel, init_process_group=False)[0]
        assert set(r["got"]) == set(r["expect"]), parallel
        for k, v in r["expect"].items():
            assert math.isclose(r["got"][k], v, rel_tol=1e-4, abs_tol=1e-6), (parallel, k, r["got"][k], v)


def monitor_in_pipeline(model_over: list[str], parallel: dict) -> dict:
    """One monitored trainer step (``trainer.step.forward_backward``) through the pipeline schedule
    and on a plain copy in this process; every rank returns both."""
    from test_parallel_equivalence import local_slice, make_batch, make_config

    from longtrain.parallel import init_distributed
    from longtrain.parallel.pipeline import build_pipeline
    from longtrain.trainer.step import forward_backward

    over = model_over + ["logging.stability_every=1", "logging.stability.queries=8", "logging.stability.tokens=64"]
    cfg = make_config(over, parallel)
    dims = init_distributed(cfg)
    cfg_one = make_config(over, {})
    one = ParallelDims.from_config(cfg_one, world_size=1)
    batch = make_batch(cfg, 2 * dims.dp_size, 0, docs=True)

    def measure(model, d, c, feed):
        mon = StabilityMonitor(model, c.logging, d)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mon.begin(0)
        forward_backward(model, [feed(batch)], d, c, None)
        mon.after_backward()
        opt.step()
        return mon.end(1)

    torch.manual_seed(0)
    expect = measure(build_model(cfg.model), one, cfg_one, lambda b: b)
    torch.manual_seed(0)
    got = measure(build_pipeline(build_model(cfg.model), dims, cfg), dims, cfg, lambda b: local_slice(b, dims))
    return {"got": got, "expect": expect}


def test_monitors_under_pipeline_parallel_equal_one_process_with_global_layer_names():
    """pp=2: each stage measures the blocks it holds, the last one the output logits; rank 0 (the
    first stage) logs every layer under its global name. The looped model runs its core on both
    ranks, two stages per rank (interleaved 1F1B): the core's per-iteration RMS, its blocks'
    attention and its shared weights (counted once) come from both."""
    from dist_utils import run_distributed

    llama = ["model.arch=llama", "model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
             "model.ffn_dim=64", "model.n_layers=4", "model.max_seq_len=64", "model.qk_norm=true"]
    looped = ["model.arch=looped", "model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
              "model.ffn_dim=64", "model.n_prelude=1", "model.n_core=2", "model.n_coda=1", "model.loops=3",
              "model.loops_max=3", "model.lora_rank=2", "model.tie_embeddings=true", "model.max_seq_len=64"]
    cases = [(llama, {"pp": 2, "pp_microbatches": 2}, ["attn_max_logit/layers.3", "grad_rms/layers.0"]),
             (looped, {"pp": 2, "pp_microbatches": 2, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2},
              ["loop_rms/2", "attn_entropy/core.layers.1", "grad_rms/coda.0"])]
    for model_over, parallel, names in cases:
        for rank, r in enumerate(run_distributed(monitor_in_pipeline, 2, model_over, parallel, init_process_group=False)):
            assert {f"stability/{n}" for n in names} <= set(r["expect"]), (parallel, names)
            assert set(r["got"]) == set(r["expect"]), (parallel, rank, set(r["got"]) ^ set(r["expect"]))
            for k, v in r["expect"].items():
                assert math.isclose(r["got"][k], v, rel_tol=1e-4, abs_tol=1e-6), (parallel, rank, k, r["got"][k], v)
