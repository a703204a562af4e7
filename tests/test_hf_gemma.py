"""Peri-LN Llamas through Hugging Face Gemma: ``model.norm_placement=peri`` exports to
``Gemma2ForCausalLM`` (with ``model.qk_norm``, to text-only ``Gemma3ForCausalLM``) with the same
logits, imports back to the same weights, and Gemma directories transformers wrote import when their
config is one a Peri-LN Llama computes; those it is not (GELU, softcapping, sliding windows, another
attention scale, the multimodal Gemma 3) are refused with one line naming the field.

``model.dim=48``: sqrt(48) is not a power of two, so the embedding scale's compensation is rounded
as it will be in use; every norm weight is drawn away from 1, so a norm exported without its
``w - 1`` (or the tied final norm without its ``* sqrt(dim)``) changes the logits."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig  # noqa: E402

from longtrain.config import load_config  # noqa: E402
from longtrain.models import build_model  # noqa: E402
from longtrain.parallel.mesh import ParallelDims  # noqa: E402
from longtrain.trainer.checkpoint import Checkpointer  # noqa: E402
from longtrain.trainer.hf import HFError, hf_model_config, read_hf_config, resolve_hf_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
REL = 1e-5  # max |difference| / max |logit|, float32
SHAPE = ["model.arch=llama", "model.vocab_size=96", "model.dim=48", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=96", "model.n_layers=2", "model.max_seq_len=64", "model.rope_theta=500.0", "data.seq_len=48",
         "model.norm_placement=peri"]
ROPES = {"default": [], "yarn": ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4.0",
                                 "model.rope_scaling.original_max_position=16"],
         "linear": ["model.rope_scaling.type=linear", "model.rope_scaling.factor=2.0"]}


def tokens():
    return torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))


def assert_logits_close(got, ref):
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= REL, f"max relative logit difference {err:.2e} > {REL}"


def peri_model(over):
    cfg = load_config(None, over)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # every RMSNorm weight (block, q/k, final) away from 1
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return cfg, model


@pytest.mark.parametrize("qk_norm,tie,rope", [(False, False, "default"), (False, True, "linear"),
                                              (True, True, "yarn"), (True, False, "default")],
                         ids=["gemma2", "gemma2_tied_linear", "gemma3_tied_yarn", "gemma3"])
def test_peri_ln_exports_to_gemma_and_imports_back_with_identical_logits(tmp_path, qk_norm, tie, rope):
    from longtrain.cli import main

    over = SHAPE + ROPES[rope] + [f"model.qk_norm={qk_norm}", f"model.tie_embeddings={tie}"]
    cfg, model = peri_model(over + [f"checkpoint.dir={tmp_path / 'ckpt'}"])
    Checkpointer(cfg, ParallelDims.from_config(cfg, 1), tmp_path, model=model).save(sync=True)
    assert main(["ckpt", "export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(hf).__name__ == ("Gemma3ForCausalLM" if qk_norm else "Gemma2ForCausalLM")
    assert hf.config.tie_word_embeddings == tie
    x = tokens()
    with torch.no_grad():
        ref = model(x)
        assert_logits_close(hf(x).logits, ref)

    # the exported directory as checkpoint.init_from_hf: the run config it implies, then the weights
    back_cfg = resolve_hf_config(load_config(None, over + [f"checkpoint.init_from_hf={tmp_path / 'out'}",
                                                           f"checkpoint.dir={tmp_path / 'ckpt2'}"]))
    assert hf_model_config(read_hf_config(tmp_path / "out")).rope_scaling == cfg.model.rope_scaling
    back = build_model(back_cfg.model).eval()
    assert Checkpointer(back_cfg, ParallelDims.from_config(back_cfg, 1), tmp_path, model=back).maybe_resume() is None
    theirs = back.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(theirs[k], v, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    with torch.no_grad():
        assert_logits_close(back(x), ref)


def test_sigma_reparam_peri_ln_exports_folded_to_gemma(tmp_path):
    """σReparam folds into the weights before the Gemma transform: the export is a plain Gemma 2."""
    from longtrain.cli import main
    from longtrain.models.sigma_reparam import begin_train_step

    cfg, model = peri_model(SHAPE + ["model.sigma_reparam=true", f"checkpoint.dir={tmp_path / 'ckpt'}"])
    with torch.no_grad():  # weights moved and gains away from sigma, then one power iteration
        for p in model.parameters():
            p.mul_(1 + 0.3 * torch.rand_like(p))
        model.train()
        begin_train_step(model)
        model(torch.randint(0, 96, (1, 8)))
    model.eval()
    Checkpointer(cfg, ParallelDims.from_config(cfg, 1), tmp_path, model=model).save(sync=True)
    assert main(["ckpt", "export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(hf).__name__ == "Gemma2ForCausalLM"
    x = tokens()
    with torch.no_grad():
        assert_logits_close(hf(x).logits, model(x))


def _transformers_gemma(path, gemma3: bool):
    """A Gemma (2, or text-only 3) written by transformers, in a config a Peri-LN Llama computes."""
    kw = dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-5,
              hidden_activation="silu", query_pre_attn_scalar=12, attn_logit_softcapping=None,
              final_logit_softcapping=None, layer_types=["full_attention"] * 2, sliding_window=64,
              rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    if gemma3:
        kw["rope_parameters"] = {"full_attention": kw["rope_parameters"],
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(Gemma3TextConfig(**kw) if gemma3 else Gemma2Config(**kw)).eval()
    with torch.no_grad():  # (1 + w) norms away from 1
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    hf.save_pretrained(str(path))
    return hf


@pytest.mark.parametrize("gemma3", [False, True], ids=["gemma2", "gemma3"])
def test_transformers_gemma_imports_with_identical_logits(tmp_path, gemma3):
    hf = _transformers_gemma(tmp_path / "hf", gemma3)
    over = SHAPE + [f"model.qk_norm={gemma3}", "model.tie_embeddings=true",
                    f"checkpoint.init_from_hf={tmp_path / 'hf'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    cfg = resolve_hf_config(load_config(None, over))
    assert (cfg.model.rope_scaling.type, cfg.model.rope_scaling.factor, cfg.model.rope_theta) == ("linear", 2.0, 500.0)
    model = build_model(cfg.model).eval()
    assert Checkpointer(cfg, ParallelDims.from_config(cfg, 1), tmp_path, model=model).maybe_resume() is None
    x = tokens()
    with torch.no_grad():
        assert_logits_close(model(x), hf(x).logits)


def _gemma_json(gemma3=False, **changes) -> dict:
    cfg = (Gemma3TextConfig if gemma3 else Gemma2Config)(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12)
    d = cfg.to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize("raw,field", [
    (_gemma_json(), "hidden_activation='gelu_pytorch_tanh'"),  # transformers' defaults: a real Gemma 2
    (_gemma_json(hidden_activation="silu"), "attn_logit_softcapping=50.0"),
    (_gemma_json(hidden_activation="silu", attn_logit_softcapping=None), "final_logit_softcapping=30.0"),
    (_gemma_json(True, hidden_activation="silu"), "layer_types has 'sliding_attention' at layers [0, 1, 2, 3]"),
    (_gemma_json(True, hidden_activation="silu", layer_types=["full_attention"] * 4), "query_pre_attn_scalar=256"),
    ({**_gemma_json(True), "model_type": "gemma3"}, "model_type='gemma3' is the multimodal Gemma 3"),
], ids=["gelu", "attn_softcap", "final_softcap", "sliding", "attn_scale", "multimodal"])
def test_inexpressible_gemma_config_is_refused_with_one_line(tmp_path, capsys, raw, field):
    from longtrain.cli import main

    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HFError, match=field.replace("[", r"\[").replace("]", r"\]")):
        hf_model_config(read_hf_config(tmp_path))
    assert main(["ckpt", "hf-config", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err


def test_gemma_config_without_layer_types_takes_transformers_sliding_default(tmp_path):
    """A config.json without layer_types (as older transformers wrote Gemma 2) is sliding on every
    other layer, as transformers reads it: refused, not imported as full attention."""
    raw = _gemma_json(hidden_activation="silu", attn_logit_softcapping=None, final_logit_softcapping=None,
                      query_pre_attn_scalar=12)
    del raw["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HFError, match=r"layer_types \(absent.*'sliding_attention' at layers \[0, 2\]"):
        hf_model_config(read_hf_config(tmp_path))
    raw["layer_types"] = ["full_attention"] * 4
    (tmp_path / "config.json").write_text(json.dumps(raw))
    m = hf_model_config(read_hf_config(tmp_path))
    assert (m.norm_placement, m.qk_norm, m.tie_embeddings) == ("peri", False, True)
