"""Context extension end to end, on CPU with a tiny Hugging Face Llama made by transformers (no hub):
long documents (`data prepare --min-length`) -> `checkpoint.init_from_hf` with RoPE scaling at 4x
the HF model's context -> a few training steps at that length -> `longtrain eval` -> `ckpt export-hf`,
whose logits match longtrain's at the extended length."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from longtrain.cli import main  # noqa: E402
from longtrain.config import load_config  # noqa: E402
from longtrain.models import build_model  # noqa: E402
from longtrain.trainer.checkpoint_format import load_full_model_state, resolve_checkpoint_path  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
ORIGINAL = 32  # the HF model's context; extended 4x to 128
SCALINGS = {"yarn": ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4"],
            "llama3": ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=4",
                       "model.rope_scaling.low_freq_factor=1", "model.rope_scaling.high_freq_factor=4"]}


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_extend_a_hf_llama_4x_train_evaluate_and_export_with_matching_logits(tmp_path, scaling):
    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=ORIGINAL, rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    LlamaForCausalLM(hc).save_pretrained(str(tmp_path / "hf"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):  # long documents to train on, and short ones --min-length drops
        (corpus / f"long{i}.txt").write_text(f"def function_{i}(x):\n    return x + {i}\n" * 12)
        (corpus / f"short{i}.txt").write_text(f"x = {i}\n")
    assert main(["data", "prepare", str(corpus), "--out", str(tmp_path / "shards"), "--min-length", "200",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["skipped"] == {"short": 12}

    run = tmp_path / "run"
    over = ["model.arch=llama", "model.vocab_size=264", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_dim=96", "model.n_layers=2", "model.max_seq_len=128", *SCALINGS[scaling],
            f"model.rope_scaling.original_max_position={ORIGINAL}", "data.source=shards",
            f"data.path={tmp_path / 'shards'}", "data.seq_len=128", "data.batch_size=2", "data.eval_fraction=0.2",
            "schedule.steps=2", "schedule.warmup_steps=1", "schedule.eval_every=0", "schedule.device=cpu",
            "logging.progress=false", "logging.tensorboard=false", f"logging.run_dir={run}",
            f"checkpoint.init_from_hf={tmp_path / 'hf'}"]
    from longtrain.trainer.train import train

    train(load_config(None, over))
    assert main(["eval", str(run), "eval.passkey_trials=1", "eval.plots=false", "eval.batches=1"]) == 0
    result = json.loads((run / "eval" / "step-2.json").read_text())
    assert result["seq_len"] == 128 and result["loss_by_position"]["buckets"][-1]["hi"] == 128

    assert main(["ckpt", "export-hf", str(run / "checkpoints"), str(tmp_path / "out")]) == 0
    back = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert back.config.rope_parameters["rope_type"] == scaling
    ckpt = resolve_checkpoint_path(run / "checkpoints")
    cfg = load_config(ckpt / "config.yaml")
    ours = build_model(cfg.model).eval()
    ours.load_state_dict(load_full_model_state(ckpt))
    x = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x), atol=1e-4, rtol=0)
