"""Hugging Face import and export: config.json <-> ``ModelConfig``, safetensors <-> weights.

Which transformers class a longtrain Llama is, exactly (logits equal up to float rounding):

==========================  =================  ===============================================
``model.norm_placement``    ``model.qk_norm``  transformers class
==========================  =================  ===============================================
pre                         false              ``LlamaForCausalLM``
pre                         true               ``Qwen3ForCausalLM`` (its ``q_norm`` / ``k_norm``)
peri                        false              ``Gemma2ForCausalLM``
peri                        true               ``Gemma3ForCausalLM`` (text-only ``gemma3_text``)
==========================  =================  ===============================================

Peri-LN is Gemma 2's sandwich block (``input_layernorm`` -> attention -> ``post_attention_layernorm``
-> add; ``pre_feedforward_layernorm`` -> MLP -> ``post_feedforward_layernorm`` -> add); Gemma 3 adds
per-head q/k norms before rotary, as our QK-norm does. What Gemma does differently is compensated in
the weights (``gemma_weights_from_ours`` / ``ours_from_gemma_weights``): its RMSNorms multiply by
``1 + w`` (we export ``w - 1``); it multiplies the embedding by ``s = sqrt(hidden_size)``, rounded to
the weights' dtype as transformers rounds it (we export ``E / s``, and when the embedding is tied to
the head, the head would see ``E / s`` too, so the final norm's weight is multiplied by ``s``). The
config removes the rest: ``hidden_activation="silu"`` (Gemma's MLP is ``down(act(gate) * up)``, our
SwiGLU), no attention or final logit softcapping, ``query_pre_attn_scalar = head_dim`` (the usual
``1/sqrt(head_dim)``), ``full_attention`` in every layer (no sliding window). Importing reverses the
transform, and refuses a Gemma config that no longtrain Llama computes (GELU, softcapping, sliding
layers, bidirectional attention, another attention scale) naming the field and its value.

A σReparam Llama (``model.sigma_reparam``) exports as a plain one: each block linear's
``gamma / sigma(W) * W`` (sigma from the saved u, v, as evaluation computes it) is folded into the
exported weight (``models.sigma_reparam.fold_state_dict``), whatever its norm placement; it cannot be
imported back as σReparam (a plain checkpoint has no gamma, u, v: ``config.validate`` refuses the
combination). Looped models have no transformers class and are refused.

Owns: the name maps between our Llama and those four classes, translating HF's ``rope_parameters``
/ ``rope_scaling`` (default, linear, dynamic, yarn, llama3; Gemma 3's per layer type) to
``ModelConfig.rope_scaling`` and back, ``resolve_hf_config`` (the run's model config checked
against an HF directory before the model is built), ``load_hf_weights`` (a possibly sharded or
pipeline-split model initialised from local safetensors) and ``export_hf`` (a DCP checkpoint to an HF
directory). Local directories only: nothing is downloaded.

Why no q/k permutation: Meta's original checkpoints rotate interleaved pairs, and HF permutes
``q_proj``/``k_proj`` rows on conversion so its ``rotate_half`` (first half / second half of each
head) gives the same result. Our ``Rotary`` uses the same ``rotate_half`` layout as HF, so the
weights map one to one; the import and export tests compare logits with transformers to prove it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from longtrain.config import ConfigError, ModelConfig, RopeScalingConfig, config_from_dict
from longtrain.models import build_model
from longtrain.models.sigma_reparam import fold_state_dict
from longtrain.trainer.checkpoint_format import load_full_model_state, read_config, resolve_checkpoint_path

_GLOBAL = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "head.norm.weight",
           "lm_head.weight": "head.output.weight"}
_PROJ = {"self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
         "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
         "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
         "mlp.down_proj.weight": "feed_forward.w2.weight",
         "self_attn.q_norm.weight": "attention.q_norm.weight", "self_attn.k_norm.weight": "attention.k_norm.weight"}
# Llama / Qwen3: two norms per block; their "post_attention_layernorm" is the MLP's input norm
_LAYER_PRE = {**_PROJ, "input_layernorm.weight": "attention_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight"}
# Gemma 2 / 3 (Peri-LN): four; "post_attention_layernorm" normalises the attention's output
_LAYER_PERI = {**_PROJ, "input_layernorm.weight": "attention_norm.weight",
               "post_attention_layernorm.weight": "attention_out_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "ffn_out_norm.weight"}
_LAYER = {False: _LAYER_PRE, True: _LAYER_PERI}
_LAYER_INV = {peri: {v: k for k, v in m.items()} for peri, m in _LAYER.items()}
_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}
# HF's rotary buffer (older transformers saved it); never a weight
_IGNORED_HF = ("rotary_emb.inv_freq",)
# transformers' class per (norm_placement, qk_norm): (architecture, model_type)
_HF_CLASS = {("pre", False): ("LlamaForCausalLM", "llama"), ("pre", True): ("Qwen3ForCausalLM", "qwen3"),
             ("peri", False): ("Gemma2ForCausalLM", "gemma2"), ("peri", True): ("Gemma3ForCausalLM", "gemma3_text")}
# an HF model_type or architecture -> (norm_placement, qk_norm)
_FAMILY = {name: key for key, cls in _HF_CLASS.items() for name in cls}


class HFError(ConfigError):
    """An HF directory that cannot be used; the message names the file, the key and the fix."""


def hf_class(m: ModelConfig) -> str:
    """The transformers class a longtrain Llama exports to (the module docstring's table)."""
    return _HF_CLASS[(m.norm_placement, m.qk_norm)][0]


def hf_to_ours(name: str, peri: bool = False) -> str | None:
    """Our parameter name for an HF tensor name (``peri``: Gemma's four norms per block)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    if name.startswith("model.layers."):
        i, rest = name[len("model.layers."):].split(".", 1)
        if rest in _LAYER[peri]:
            return f"layers.{i}.{_LAYER[peri][rest]}"
    return None


def ours_to_hf(name: str, peri: bool = False) -> str | None:
    if name in _GLOBAL_INV:
        return _GLOBAL_INV[name]
    if name.startswith("layers."):
        i, rest = name[len("layers."):].split(".", 1)
        if rest in _LAYER_INV[peri]:
            return f"model.layers.{i}.{_LAYER_INV[peri][rest]}"
    return None


def gemma_embed_scale(dim: int, dtype: torch.dtype) -> float:
    """Gemma's embedding multiplier as transformers applies it: ``sqrt(hidden_size)`` in a float32
    buffer cast to the weights' dtype (55.4256 becomes 55.5 in bfloat16)."""
    return float(torch.tensor(dim ** 0.5, dtype=torch.float32).to(dtype))


def gemma_weights_from_ours(state: dict[str, torch.Tensor], m: ModelConfig,
                            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our Peri-LN weights (our names) as Gemma computes with them, in float32: every RMSNorm
    weight ``w - 1`` (Gemma multiplies by ``1 + w``), the embedding ``E / s``, and with tied
    embeddings the final norm ``g * s - 1`` (the head then sees ``E / s``); ``s`` is the embedding
    scale of ``dtype``, the dtype the export is written (and run) in."""
    s = gemma_embed_scale(m.dim, dtype)
    out = {}
    for k, t in state.items():
        t = t.float()
        if k == "tok_embeddings.weight":
            t = t / s
        elif k == "head.norm.weight" and m.tie_embeddings:
            t = t * s - 1.0
        elif k.endswith("norm.weight"):  # w - 1 is exact in float32 for w in [0.5, 2] (Sterbenz)
            t = t - 1.0
        out[k] = t
    return out


def ours_from_gemma_weights(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``gemma_weights_from_ours`` on Gemma tensors under our names, in float32;
    ``s`` is the embedding scale of the stored embedding's dtype, the one transformers runs it with."""
    emb = state.get("tok_embeddings.weight")
    s = gemma_embed_scale(m.dim, emb.dtype if emb is not None else torch.float32)
    out = {}
    for k, t in state.items():
        t = t.float()
        if k == "tok_embeddings.weight":
            t = t * s
        elif k == "head.norm.weight" and m.tie_embeddings:
            t = (1.0 + t) / s
        elif k.endswith("norm.weight"):
            t = 1.0 + t
        out[k] = t
    return out


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    d = Path(hf_dir)
    f = d / "config.json"
    if not d.is_dir():
        raise HFError(f"checkpoint.init_from_hf={str(hf_dir)!r} is not a directory; give a local Hugging Face "
                      f"model directory (config.json + *.safetensors). Nothing is downloaded.")
    if not f.is_file():
        raise HFError(f"{d} has no config.json; checkpoint.init_from_hf needs a Hugging Face model directory.")
    return json.loads(f.read_text())


def _rope_from_hf(hf: dict, where: str) -> tuple[float, RopeScalingConfig]:
    # transformers 5 writes rope_parameters (theta inside); 4.x wrote rope_scaling + rope_theta, and
    # 5.x lets rope_scaling win when both are present
    params = hf.get("rope_parameters") or {}
    rope = dict(hf.get("rope_scaling") or params)
    theta = float(rope.get("rope_theta", params.get("rope_theta", hf.get("rope_theta", 10000.0))))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise HFError(f"{where}: partial_rotary_factor != 1 is not supported by longtrain's rotary embedding.")
    max_pos = int(hf.get("max_position_embeddings", 2048))
    orig = int(rope.get("original_max_position_embeddings") or max_pos)
    if kind == "default":
        return theta, RopeScalingConfig()
    if kind == "linear":
        return theta, RopeScalingConfig(type="linear", factor=float(rope["factor"]))
    if kind == "dynamic":  # HF's dynamic NTK measures growth against max_position_embeddings
        return theta, RopeScalingConfig(type="dynamic", factor=float(rope["factor"]), original_max_position=max_pos)
    if kind == "llama3":
        return theta, RopeScalingConfig(type="llama3", factor=float(rope["factor"]), original_max_position=orig,
                                        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                                        high_freq_factor=float(rope.get("high_freq_factor", 4.0)))
    if kind == "yarn":
        if rope.get("truncate", True) is False:
            raise HFError(f"{where}: yarn with truncate=false is not supported (longtrain truncates the "
                          f"correction range, as the YaRN paper and HF's default do).")
        factor = rope.get("factor")
        factor = float(factor) if factor is not None else max_pos / orig
        af = rope.get("attention_factor")
        if af is None and rope.get("mscale") and rope.get("mscale_all_dim"):
            def m(s, k):
                return 1.0 if s <= 1 else 0.1 * k * math.log(s) + 1.0

            af = m(factor, rope["mscale"]) / m(factor, rope["mscale_all_dim"])
        return theta, RopeScalingConfig(type="yarn", factor=factor, original_max_position=orig,
                                        beta_fast=float(rope.get("beta_fast") or 32.0),
                                        beta_slow=float(rope.get("beta_slow") or 1.0),
                                        attention_factor=None if af is None else float(af))
    raise HFError(f"{where}: rope type {kind!r} is not supported; longtrain maps default, linear, dynamic, "
                  f"yarn and llama3.")


# transformers' Gemma2Config / Gemma3TextConfig defaults, for the keys a config.json leaves out
_GEMMA_DEFAULTS = {
    "gemma2": {"hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": 30.0,
               "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 256, "head_dim": 256,
               "sliding_window": 4096, "tie_word_embeddings": True, "rope_theta": 10000.0},
    "gemma3_text": {"hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
                    "attn_logit_softcapping": None, "query_pre_attn_scalar": 256, "head_dim": 256,
                    "sliding_window": 4096, "tie_word_embeddings": True, "rope_theta": 1_000_000.0},
}


def _gemma_layer_types(hf: dict, mt: str) -> list[str]:
    """``layer_types``, or the pattern transformers derives without it (Gemma 2 alternates sliding
    and full attention; Gemma 3 makes every ``sliding_window_pattern``-th layer full)."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    every = 2 if mt == "gemma2" else int(hf.get("sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(int(hf["num_hidden_layers"]))]


def _gemma_config(hf: dict, mt: str, where: str) -> dict:
    """``hf`` with Gemma's defaults filled in and Gemma 3's full-attention rotary settings brought
    to the top level; refuses (one line, the first field) what a longtrain Peri-LN Llama cannot compute."""
    g = {**_GEMMA_DEFAULTS[mt], **hf}
    why = "longtrain's Peri-LN Llama is Gemma with "
    for key in ("hidden_activation", "hidden_act"):  # 5.x reads hidden_activation; older versions hidden_act
        if key in g and g[key] != "silu":
            raise HFError(f"{where}: {key}={g[key]!r} is not supported; {why}SwiGLU ({key}='silu') only.")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if g[key] is not None:
            raise HFError(f"{where}: {key}={g[key]!r} is not supported; {why}no logit softcapping ({key}=null) only.")
    if g.get("use_bidirectional_attention"):
        raise HFError(f"{where}: use_bidirectional_attention={g['use_bidirectional_attention']!r} is not supported; "
                      f"longtrain's models are causal.")
    layer_types = _gemma_layer_types(g, mt)
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    if sliding:
        given = "layer_types" if hf.get("layer_types") else "layer_types (absent, so transformers' default)"
        raise HFError(f"{where}: {given} has {layer_types[sliding[0]]!r} at layers {sliding[:8]}"
                      f"{' ...' if len(sliding) > 8 else ''} (sliding_window={g['sliding_window']}); longtrain "
                      f"attends over the whole causal context, so only full_attention in every layer imports.")
    head_dim = int(g["head_dim"])
    if float(g["query_pre_attn_scalar"]) != head_dim:
        raise HFError(f"{where}: query_pre_attn_scalar={g['query_pre_attn_scalar']} differs from head_dim={head_dim}; "
                      f"longtrain scales attention logits by 1/sqrt(head_dim).")
    if mt == "gemma3_text":  # rotary per layer type: every layer is full attention, so its settings hold
        params = g.get("rope_parameters") or {}
        full = params.get("full_attention", params if "rope_type" in params else None)
        g["rope_parameters"] = dict(full or {}, rope_theta=(full or {}).get("rope_theta", g["rope_theta"]))
    return g


def hf_model_config(hf: dict, base: ModelConfig | None = None, where: str = "config.json") -> ModelConfig:
    """The longtrain ``ModelConfig`` for an HF ``config.json`` of a Llama, Qwen3, Gemma 2 or text-only
    Gemma 3 (other fields from ``base``); a config no longtrain Llama computes exactly is refused."""
    mt = hf.get("model_type")
    archs = hf.get("architectures") or []
    family = _FAMILY.get(mt) or next((_FAMILY[a] for a in archs if a in _FAMILY), None)
    if mt == "gemma3":
        raise HFError(f"{where}: model_type='gemma3' is the multimodal Gemma 3; only its text-only form "
                      f"(model_type='gemma3_text', Gemma3ForCausalLM) can be imported.")
    if family is None:
        raise HFError(f"{where}: model_type={mt!r} (architectures {archs}) has no longtrain equivalent; Llama "
                      f"(LlamaForCausalLM), Qwen3 (Qwen3ForCausalLM), Gemma 2 (Gemma2ForCausalLM) and text-only "
                      f"Gemma 3 (Gemma3ForCausalLM) checkpoints can be imported.")
    placement, qk_norm = family
    if placement == "peri":
        hf = _gemma_config(hf, _HF_CLASS[family][1], where)
    if hf.get("use_sliding_window"):
        raise HFError(f"{where}: use_sliding_window=true is not supported (longtrain attends over the whole "
                      f"causal context); only full-attention Qwen3 models can be imported.")
    for key, ok in (("attention_bias", False), ("mlp_bias", False)):
        if bool(hf.get(key, False)) != ok:
            raise HFError(f"{where}: {key}={hf.get(key)} is not supported (longtrain's Llama has no biases).")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"{where}: hidden_act={hf.get('hidden_act')!r} is not supported; longtrain uses SwiGLU (silu).")
    n_heads = int(hf["num_attention_heads"])
    dim = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != dim // n_heads:
        raise HFError(f"{where}: head_dim={head_dim} differs from hidden_size/num_attention_heads={dim // n_heads}; "
                      f"longtrain derives head_dim from model.dim / model.n_heads.")
    theta, scaling = _rope_from_hf(hf, where)
    base = base if base is not None else ModelConfig()
    return dataclasses.replace(
        base, arch="llama", vocab_size=int(hf["vocab_size"]), dim=dim, n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), ffn_dim=int(hf["intermediate_size"]),
        n_layers=int(hf["num_hidden_layers"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=qk_norm,
        norm_placement=placement)


# the fields an HF checkpoint fixes: the run's config must agree on them
HF_SHAPE_KEYS = ("arch", "vocab_size", "dim", "n_heads", "n_kv_heads", "ffn_dim", "n_layers", "tie_embeddings",
                 "qk_norm", "norm_placement")


def resolve_hf_config(cfg):
    """The run config with its model section checked against ``checkpoint.init_from_hf``.

    Shapes must agree (an error names both values). Numerics that belong to the pretrained
    weights are taken from the HF config: ``rope_theta``, ``norm_eps`` and ``rope_scaling`` --
    except that a run which sets its own ``rope_scaling`` (type other than none) keeps it, which
    is how a context extension (e.g. yarn on a base model) is trained. Differences are printed.
    """
    hf_dir = cfg.checkpoint.init_from_hf
    hf = read_hf_config(hf_dir)
    theirs = hf_model_config(hf, cfg.model, where=f"{hf_dir}/config.json")
    ours = cfg.model
    diffs = [f"model.{k}={getattr(ours, k)!r} but {hf_dir}/config.json has {getattr(theirs, k)!r}"
             for k in HF_SHAPE_KEYS if getattr(ours, k) != getattr(theirs, k)]
    if diffs:
        raise HFError("the run's model config does not match checkpoint.init_from_hf: " + "; ".join(diffs)
                      + f". Set these model.* values (`longtrain ckpt hf-config {hf_dir}` prints the whole model "
                        f"section).")
    scaling = ours.rope_scaling if ours.rope_scaling.type != "none" else theirs.rope_scaling
    new = dataclasses.replace(ours, rope_theta=theirs.rope_theta, norm_eps=theirs.norm_eps, rope_scaling=scaling)
    notes = [f"model.{k}: {getattr(ours, k)!r} -> {getattr(new, k)!r}" for k in ("rope_theta", "norm_eps", "rope_scaling")
             if getattr(ours, k) != getattr(new, k)]
    if ours.rope_scaling.type != "none" and ours.rope_scaling != theirs.rope_scaling:
        notes.append(f"keeping the run's model.rope_scaling ({ours.rope_scaling.type}) over the HF config's "
                     f"({theirs.rope_scaling.type}): a context extension")
    if notes and int(os.environ.get("RANK", "0")) == 0:
        print("[longtrain] from the Hugging Face config: " + "; ".join(notes), flush=True)
    return dataclasses.replace(cfg, model=new)


def _no_hf_equivalent(m: ModelConfig) -> str:
    """The looped model's features transformers has no class for, for the refusal message."""
    parts = [f"core_attention={m.core_attention}" if "gdn" in m.core_attention else "",
             f"hyper_streams={m.hyper_streams}" if m.hyper_streams > 1 else ""]
    named = ", ".join(p for p in parts if p)
    return f" (with {named}: transformers has no looped Llama for such a core to map onto)" if named else ""


def model_config_to_hf(m: ModelConfig, torch_dtype: str = "float32") -> dict:
    """The HF config dict of ``hf_class(m)`` (Llama, Qwen3, Gemma 2 or Gemma 3) for a longtrain Llama."""
    if m.arch != "llama":
        raise HFError(f"model.arch={m.arch!r}{_no_hf_equivalent(m)}: only Llama models can be exported to Hugging "
                      f"Face format.")
    rope: dict = {"rope_type": "default", "rope_theta": m.rope_theta}
    s = m.rope_scaling
    max_pos = m.max_seq_len
    if s.type == "linear":
        rope.update(rope_type="linear", factor=s.factor)
    elif s.type == "dynamic":
        rope.update(rope_type="dynamic", factor=s.factor)
        max_pos = s.original_max_position  # HF's dynamic NTK grows against max_position_embeddings
    elif s.type == "llama3":
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_position)
    elif s.type == "yarn":
        rope.update(rope_type="yarn", factor=s.factor, original_max_position_embeddings=s.original_max_position,
                    beta_fast=s.beta_fast, beta_slow=s.beta_slow)
        max_pos = int(s.original_max_position * s.factor)  # HF checks factor against this ratio
        if s.attention_factor is not None:
            rope["attention_factor"] = s.attention_factor
    arch, model_type = _HF_CLASS[(m.norm_placement, m.qk_norm)]
    out = {
        "architectures": [arch], "model_type": model_type, "vocab_size": m.vocab_size,
        "hidden_size": m.dim, "intermediate_size": m.ffn_dim, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
        "hidden_act": "silu", "max_position_embeddings": max_pos, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "rope_theta": m.rope_theta, "rope_parameters": rope, "torch_dtype": torch_dtype, "dtype": torch_dtype,
        "initializer_range": m.init_std, "use_cache": True,
    }
    if s.type != "none":
        out["rope_scaling"] = dict(rope)  # older transformers read this (and rope_theta)
    if model_type != "llama":  # full attention in every layer: no sliding window
        out.update(sliding_window=None, layer_types=["full_attention"] * m.n_layers)
    if model_type == "qwen3":  # q_norm / k_norm per head before rotary
        out.update(use_sliding_window=False, max_window_layers=m.n_layers)
    if m.norm_placement == "peri":
        # Gemma: SwiGLU, attention scaled by 1/sqrt(head_dim), no softcapping, causal, no padding row
        # (the (1 + w) norms and the embedding scale are compensated in the weights)
        del out["mlp_bias"]
        out.update(hidden_activation="silu", query_pre_attn_scalar=m.head_dim, attn_logit_softcapping=None,
                   final_logit_softcapping=None, use_bidirectional_attention=False, pad_token_id=None,
                   # Gemma's forward builds a sliding-window mask whatever layer_types say (and fails
                   # on None); no layer uses it
                   sliding_window=max_pos)
    if model_type == "gemma3_text":  # rotary per layer type (only full_attention is used)
        out.update(rope_parameters={"full_attention": rope,
                                    "sliding_attention": {"rope_type": "default", "rope_theta": m.rope_theta}},
                   rope_local_base_freq=m.rope_theta)
    return out


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def _safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [d / n for n in names]
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise HFError(f"{d} holds no *.safetensors files; save the model with save_pretrained(..., "
                      f"safe_serialization=True).")
    for f in files:
        if not f.is_file():
            raise HFError(f"{d}: {f.name}, listed in model.safetensors.index.json, is missing.")
    return files


def read_hf_state_dict(hf_dir: str | os.PathLike, m: ModelConfig) -> dict[str, torch.Tensor]:
    """HF safetensors renamed to our parameter names (full tensors, on CPU); a Gemma's weights
    (``model.norm_placement=peri``) turned back into ours (``ours_from_gemma_weights``)."""
    from safetensors.torch import load_file  # optional (longtrain[hf]): only HF import/export needs it

    d = Path(hf_dir)
    peri = m.norm_placement == "peri"
    out, unknown = {}, []
    for f in _safetensors_files(d):
        for name, t in load_file(str(f)).items():
            ours = hf_to_ours(name, peri)
            if ours is None:
                if not name.endswith(_IGNORED_HF):
                    unknown.append(name)
                continue
            out[ours] = t
    if unknown:
        raise HFError(f"{d}: tensors with no longtrain counterpart: {unknown[:6]}; only the weights of "
                      f"{hf_class(m)} map onto model.norm_placement={m.norm_placement} model.qk_norm={m.qk_norm}.")
    if peri:
        out = ours_from_gemma_weights(out, m)
    if m.tie_embeddings:  # the head is the embedding (a pipeline's last stage holds it without the embedding)
        out.pop("head.output.weight", None)
        if "tok_embeddings.weight" in out:
            out["head.output.weight"] = out["tok_embeddings.weight"]
    return out


def load_hf_weights(model: torch.nn.Module, hf_dir: str | os.PathLike, m: ModelConfig) -> None:
    """Copy HF weights into ``model`` (plain, FSDP2 or tensor-parallel: each rank keeps its shard;
    a pipeline's stages: each takes the weights of the parts it holds).

    The model's state-dict keys are matched to the HF tensors by the whole model's names, through
    ``model.checkpoint_key`` where it has one -- the mapping checkpoints use, which drops a
    ``PipelineModel``'s ``parts.<i>.`` stage prefix.
    """
    hf = read_hf_config(hf_dir)
    theirs = hf_model_config(hf, m, where=f"{hf_dir}/config.json")
    diffs = [f"model.{k}={getattr(m, k)!r} vs {getattr(theirs, k)!r}" for k in HF_SHAPE_KEYS
             if getattr(m, k) != getattr(theirs, k)]
    if diffs:
        raise HFError(f"{hf_dir}: the model does not match its config.json: " + "; ".join(diffs))
    sd = read_hf_state_dict(hf_dir, m)
    with torch.device("meta"):  # the whole model's names: a pipeline rank holds only some of them
        expected = set(build_model(m).state_dict())
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise HFError(f"{hf_dir}: weights do not match the model: missing {missing[:6]}, unexpected {extra[:6]}.")
    key = getattr(model, "checkpoint_key", None) or (lambda k: k)
    current = get_model_state_dict(model)
    local = {}
    for k, v in current.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = key(k)
        if name not in sd:
            raise HFError(f"{hf_dir}: the model's {k} ({name}) has no Hugging Face counterpart.")
        t = sd[name]
        if tuple(t.shape) != tuple(v.shape):
            hf_name = ours_to_hf(name, m.norm_placement == "peri")
            raise HFError(f"{hf_dir}: {hf_name} has shape {tuple(t.shape)}, the model's {name} needs "
                          f"{tuple(v.shape)}.")
        local[k] = t.to(v.dtype)
    set_model_state_dict(model, local, options=StateDictOptions(full_state_dict=True))


def write_hf(state: dict[str, torch.Tensor], m: ModelConfig, out_dir: str | os.PathLike, dtype: str = "float32",
             max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write our full state dict as an HF directory of ``hf_class(m)``: config.json + safetensors
    (+ index); a Peri-LN model's weights are first turned into Gemma's (``gemma_weights_from_ours``)."""
    from safetensors.torch import save_file  # optional (longtrain[hf]): only HF import/export needs it

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peri = m.norm_placement == "peri"
    if peri:
        state = gemma_weights_from_ours(state, m, tdtype)
    hf_sd = {}
    for k, t in state.items():
        name = ours_to_hf(k, peri)
        if name is None:
            raise HFError(f"tensor {k} has no {hf_class(m)} counterpart; only arch=llama exports.")
        if name == "lm_head.weight" and m.tie_embeddings:
            continue
        hf_sd[name] = t.detach().to(tdtype).contiguous()
    shards, cur, size = [], {}, 0
    for name in sorted(hf_sd):
        nbytes = hf_sd[name].numel() * hf_sd[name].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = hf_sd[name]
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, sh in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, str(out / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in sh})
        total = sum(t.numel() * t.element_size() for t in hf_sd.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(model_config_to_hf(m, dtype), indent=2) + "\n")
    return out


def export_hf(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """A longtrain DCP checkpoint (step directory or checkpoint root) to an HF directory of
    ``hf_class`` (Llama, Qwen3, Gemma 2 or Gemma 3)."""
    path = resolve_checkpoint_path(ckpt_path)
    cfg = config_from_dict(read_config(path))
    if cfg.model.arch != "llama":
        raise HFError(f"checkpoint {path} is model.arch={cfg.model.arch!r}{_no_hf_equivalent(cfg.model)}; only "
                      f"Llama exports to Hugging Face.")
    model_config_to_hf(cfg.model)  # refuses what has no exact equivalent before anything is read
    state = load_full_model_state(path)
    if cfg.model.sigma_reparam:  # W_hat = gamma / sigma(W) * W into each weight: a plain model
        state = fold_state_dict(state)
    return write_hf(state, dataclasses.replace(cfg.model, sigma_reparam=False), out_dir, dtype)
