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


def save_hf(path, rope: dict, tie: bool = False):
    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
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
