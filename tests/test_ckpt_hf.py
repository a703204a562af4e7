"""Hugging Face Llama import/export: a tiny ``LlamaForCausalLM`` saved by transformers in the test
(no downloads) gives the same logits in longtrain, with every rotary scaling, and survives the
round trip through a longtrain checkpoint and ``ckpt export-hf``."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from longtrain.config import ConfigError, load_config  # noqa: E402
from longtrain.models import build_model  # noqa: E402
from longtrain.parallel.mesh import ParallelDims  # noqa: E402
from longtrain.trainer.checkpoint import Checkpointer  # noqa: E402
from longtrain.trainer.hf import HFError, hf_model_config, read_hf_config, resolve_hf_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
ATOL = 1e-5
ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},  # grows past max_position_embeddings=32 (seq 48)
}


def save_hf(path, rope: dict, tie: bool = False, vocab: int = 96):
    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                     rope_parameters=dict(rope, rope_theta=500.0))
    hm = LlamaForCausalLM(hc).eval()
    hm.save_pretrained(str(path))  # safetensors
    return hm


def tokens():
    return torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("rope", list(ROPES))
def test_hf_import_and_export_give_identical_logits(tmp_path, rope):
    from longtrain.cli import main

    hf = save_hf(tmp_path / "hf", ROPES[rope], tie=rope == "linear")
    over = ["model.arch=llama", "model.vocab_size=96", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_dim=96", "model.n_layers=2", f"model.tie_embeddings={rope == 'linear'}", "data.seq_len=48",
            f"checkpoint.init_from_hf={tmp_path / 'hf'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    cfg = resolve_hf_config(load_config(None, over))
    assert cfg.model.rope_scaling.type == ("none" if rope == "default" else rope)
    assert cfg.model.rope_theta == 500.0
    model = build_model(cfg.model).eval()
    ck = Checkpointer(cfg, ParallelDims.from_config(cfg, 1), tmp_path, model=model)
    assert ck.maybe_resume() is None  # no checkpoint: starts from the HF weights
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        ours = model(x)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)

    ck.save(sync=True)  # longtrain checkpoint -> export-hf -> transformers
    assert main(["ckpt", "export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    back = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref, atol=ATOL, rtol=0)
    assert hf_model_config(read_hf_config(tmp_path / "out")).rope_scaling == cfg.model.rope_scaling


def test_legacy_rope_scaling_key_and_hf_config_command(tmp_path, capsys):
    from longtrain.cli import main

    save_hf(tmp_path, ROPES["default"])
    raw = read_hf_config(tmp_path)
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=500000.0, rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    m = hf_model_config(read_hf_config(tmp_path))
    assert (m.rope_theta, m.rope_scaling.type, m.rope_scaling.factor, m.rope_scaling.original_max_position) == \
        (500000.0, "llama3", 32.0, 8192)
    assert main(["ckpt", "hf-config", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dim: 64" in out and "type: llama3" in out and "init_from_hf" in out


def test_shape_mismatch_with_hf_config_names_both_values(tmp_path):
    save_hf(tmp_path, ROPES["default"])
    cfg = load_config(None, ["model.arch=llama", "model.vocab_size=96", "model.dim=128", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.ffn_dim=96", "model.n_layers=2",
                             f"checkpoint.init_from_hf={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model.dim=128 but .*config.json has 64.*hf-config"):
        resolve_hf_config(cfg)
    with pytest.raises(HFError, match="not a directory"):
        resolve_hf_config(load_config(None, [f"checkpoint.init_from_hf={tmp_path / 'nope'}"]))


def test_train_starts_from_hf_weights_and_exports_them_back(tmp_path):
    """Through ``train()``: init_from_hf sets the rotary config and weights; the final checkpoint
    (no steps taken) exports to the same HF logits."""
    from longtrain.trainer.train import train

    hf = save_hf(tmp_path / "hf", ROPES["yarn"], vocab=264)  # the byte tokenizer needs >= 259
    over = ["model.arch=llama", "model.vocab_size=264", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_dim=96", "model.n_layers=2", "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=1",
            "data.stdlib_mb=0.2", "schedule.steps=0", "schedule.warmup_steps=0", "schedule.eval_every=0",
            "schedule.device=cpu", "logging.progress=false", "logging.tensorboard=false",
            f"logging.run_dir={tmp_path / 'run'}", f"checkpoint.init_from_hf={tmp_path / 'hf'}"]
    train(load_config(None, over))
    from longtrain.trainer.hf import export_hf

    export_hf(tmp_path / "run" / "checkpoints", tmp_path / "out")
    back = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert back.config.rope_parameters["rope_type"] == "yarn"
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)


def _sharded_import_loss(hf_dir: str, parallel: dict) -> float:
    from longtrain.parallel import all_reduce_sum, init_distributed, parallelize
    from longtrain.trainer.hf import load_hf_weights

    over = ["model.arch=llama", "model.vocab_size=96", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_dim=96", "model.n_layers=2", "model.max_seq_len=64", "data.seq_len=48",
            "schedule.device=cpu", "parallel.backend=gloo", "parallel.param_dtype=fp32", "parallel.dp_shard=-1",
            f"checkpoint.init_from_hf={hf_dir}"] + [f"parallel.{k}={v}" for k, v in parallel.items()]
    cfg = resolve_hf_config(load_config(None, over))
    dims = init_distributed(cfg)
    model = parallelize(build_model(cfg.model), dims, cfg)
    load_hf_weights(model, hf_dir, cfg.model)
    x = tokens()
    rows, cols = 2 // dims.dp_size, 48 // dims.sp_size
    sl = (slice(dims.dp_rank * rows, (dims.dp_rank + 1) * rows), slice(dims.sp_rank * cols, (dims.sp_rank + 1) * cols))
    pos = torch.arange(48).expand(2, 48)
    with torch.no_grad():
        loss = model(x[sl], pos[sl], labels=x.roll(-1, 1)[sl])
    return all_reduce_sum(loss, dims).item() / x.numel()


@pytest.mark.parametrize("parallel,world,rel", [
    ({"dp_shard": 2}, 2, 1e-5), ({"tp": 2, "dp_shard": 1}, 2, 1e-5),
    # one process in bf16: FSDP2 on a one-rank mesh, bf16 weights in the forward (hence the tolerance)
    ({"dp_shard": 1, "param_dtype": "bf16"}, 1, 2e-2)], ids=["dp_shard2", "tp2", "one_rank_bf16"])
def test_hf_import_into_a_sharded_model(tmp_path, parallel, world, rel):
    from dist_utils import run_distributed

    hf = save_hf(tmp_path, ROPES["llama3"])
    x = tokens()
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(hf(x).logits.reshape(-1, 96), x.roll(-1, 1).reshape(-1)).item()
    got = run_distributed(_sharded_import_loss, world, str(tmp_path), parallel, init_process_group=world > 1)
    assert got[0] == pytest.approx(ref, rel=rel) and got[-1] == got[0]


def _pipeline_import(hf_dir: str, tie: bool, ckpt_dir: str) -> bytes:
    """pp=2 (one stage per rank): start from the HF weights as ``train`` does (Checkpointer without a
    checkpoint), then report the weights this rank holds, the loss of one forward, and save."""
    import io
    import re

    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from longtrain.parallel import init_distributed
    from longtrain.parallel.pipeline import build_pipeline

    over = ["model.arch=llama", "model.vocab_size=96", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_dim=96", "model.n_layers=2", "model.max_seq_len=64", f"model.tie_embeddings={tie}",
            "data.seq_len=48", "data.batch_size=2", "schedule.device=cpu", "parallel.backend=gloo",
            "parallel.param_dtype=fp32", "parallel.pp=2", "parallel.pp_microbatches=2", "parallel.dp_shard=1",
            f"checkpoint.init_from_hf={hf_dir}", f"checkpoint.dir={ckpt_dir}"]
    cfg = resolve_hf_config(load_config(None, over))
    dims = init_distributed(cfg)
    model = build_pipeline(build_model(cfg.model), dims, cfg)
    ck = Checkpointer(cfg, dims, ckpt_dir, model=model)
    assert ck.maybe_resume() is None
    # the stage's weights under the whole model's names (renamed here, not by the code under test)
    held = {re.sub(r"^parts\.\d+\.", "", k): v.detach().clone() for k, v in get_model_state_dict(model).items()}
    x = tokens()
    loss = model.loss_sum({"tokens": x, "labels": x.roll(-1, 1), "position_ids": torch.arange(48).expand(2, 48)})
    ck.save(sync=True)
    ck.finish()
    buf = io.BytesIO()  # bytes: tensors through a multiprocessing queue share memory with the sender
    torch.save({"held": held, "loss": loss.item() / x.numel()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("tie", [False, True])
def test_hf_import_into_a_pipeline(tmp_path, tie):
    """parallel.pp=2: every stage holds exactly the HF weights of its part (the last stage's head
    the embedding when tied), the first forward's loss is the single-process import's, and the
    pipeline's checkpoint exports back to the same HF model."""
    import io

    from dist_utils import run_distributed
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from longtrain.trainer.hf import export_hf, load_hf_weights

    hf = save_hf(tmp_path / "hf", ROPES["llama3"], tie=tie)
    cfg = resolve_hf_config(load_config(None, [
        "model.arch=llama", "model.vocab_size=96", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_dim=96", "model.n_layers=2", "model.max_seq_len=64", f"model.tie_embeddings={tie}",
        "data.seq_len=48", f"checkpoint.init_from_hf={tmp_path / 'hf'}"]))
    one = build_model(cfg.model).eval()
    load_hf_weights(one, tmp_path / "hf", cfg.model)
    x = tokens()
    with torch.no_grad():
        ref = one(x, torch.arange(48).expand(2, 48), labels=x.roll(-1, 1)).item() / x.numel()
    whole = get_model_state_dict(one)

    got = [torch.load(io.BytesIO(r), weights_only=False)
           for r in run_distributed(_pipeline_import, 2, str(tmp_path / "hf"), tie, str(tmp_path / "ckpt"))]
    for rank, r in enumerate(got):
        assert r["held"], rank
        for k, t in r["held"].items():
            assert torch.equal(t, whole[k]), f"rank {rank}: {k} is not the HF weight"
    assert set(got[0]["held"]) | set(got[1]["held"]) == set(whole)
    assert ("head.output.weight" in got[1]["held"]) and ("tok_embeddings.weight" in got[0]["held"])
    assert got[0]["loss"] == got[1]["loss"] == pytest.approx(ref, rel=1e-5)

    export_hf(tmp_path / "ckpt", tmp_path / "out")
    back = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)


QWEN3 = ["model.arch=llama", "model.vocab_size=96", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=96", "model.n_layers=2", "data.seq_len=48", "model.qk_norm=true"]


def test_qk_norm_llama_is_qwen3_import_and_export_give_identical_logits(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from longtrain.cli import main

    torch.manual_seed(0)
    hc = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    hf = Qwen3ForCausalLM(hc).eval()
    with torch.no_grad():  # per-head norm weights away from 1, so a missing or misplaced norm shows
        for layer in hf.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    hf.save_pretrained(str(tmp_path / "hf"))
    over = QWEN3 + [f"checkpoint.init_from_hf={tmp_path / 'hf'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    cfg = resolve_hf_config(load_config(None, over))
    model = build_model(cfg.model).eval()
    ck = Checkpointer(cfg, ParallelDims.from_config(cfg, 1), tmp_path, model=model)
    assert ck.maybe_resume() is None
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)
    ck.save(sync=True)
    assert main(["ckpt", "export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    assert read_hf_config(tmp_path / "out")["architectures"] == ["Qwen3ForCausalLM"]
    back = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref, atol=ATOL, rtol=0)
    # a run without qk_norm cannot start from a Qwen3 checkpoint
    with pytest.raises(HFError, match="model.qk_norm=False but .* has True"):
        resolve_hf_config(load_config(None, [o for o in over if o != "model.qk_norm=true"]))
