"""Hugging Face Llama import and export: config.json <-> ``ModelConfig``, safetensors <-> weights.

A Llama with ``model.qk_norm`` (an RMSNorm per head on q and k, before rotary) is exactly
transformers' ``Qwen3ForCausalLM`` (its ``q_norm`` / ``k_norm``), so it exports to and imports from
Qwen3. Peri-LN (``model.norm_placement=peri``) has no exact equivalent there (Gemma 2's sandwich
norms come with a (1 + w) RMSNorm, GELU and scaled embeddings), so its export is refused.
A σReparam Llama (``model.sigma_reparam``) exports as a plain one: each block linear's
``gamma / sigma(W) * W`` (sigma from the saved u, v, as evaluation computes it) is folded into the
exported weight (``models.sigma_reparam.fold_state_dict``); it cannot be imported back as
σReparam (a plain checkpoint has no gamma, u, v: ``config.validate`` refuses the combination).

Owns: the name map between our Llama and transformers' ``LlamaForCausalLM``, translating HF's
``rope_parameters`` / ``rope_scaling`` (default, linear, dynamic, yarn, llama3) to
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
_LAYER = {"self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
          "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
          "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
          "mlp.down_proj.weight": "feed_forward.w2.weight", "input_layernorm.weight": "attention_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_norm.weight": "attention.q_norm.weight", "self_attn.k_norm.weight": "attention.k_norm.weight"}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}
# HF's rotary buffer (older transformers saved it); never a weight
_IGNORED_HF = ("rotary_emb.inv_freq",)


class HFError(ConfigError):
    """An HF directory that cannot be used; the message names the file, the key and the fix."""


def hf_to_ours(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    if name.startswith("model.layers."):
        i, rest = name[len("model.layers."):].split(".", 1)
        if rest in _LAYER:
            return f"layers.{i}.{_LAYER[rest]}"
    return None


def ours_to_hf(name: str) -> str | None:
    if name in _GLOBAL_INV:
        return _GLOBAL_INV[name]
    if name.startswith("layers."):
        i, rest = name[len("layers."):].split(".", 1)
        if rest in _LAYER_INV:
            return f"model.layers.{i}.{_LAYER_INV[rest]}"
    return None


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


def hf_model_config(hf: dict, base: ModelConfig | None = None, where: str = "config.json") -> ModelConfig:
    """The longtrain ``ModelConfig`` for an HF Llama ``config.json`` (other fields from ``base``)."""
    mt = hf.get("model_type")
    archs = hf.get("architectures") or []
    qwen3 = mt == "qwen3" or "Qwen3ForCausalLM" in archs
    if mt != "llama" and "LlamaForCausalLM" not in archs and not qwen3:
        raise HFError(f"{where}: model_type={mt!r} (architectures {archs}) is not a Llama model; only Llama "
                      f"(LlamaForCausalLM) and Qwen3 (Qwen3ForCausalLM) checkpoints can be imported.")
    if qwen3 and hf.get("use_sliding_window"):
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
        rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=qwen3,
        norm_placement="pre")


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
    """An HF ``LlamaConfig`` (``Qwen3Config`` with ``model.qk_norm``) dict for a longtrain Llama config."""
    if m.arch != "llama":
        raise HFError(f"model.arch={m.arch!r}{_no_hf_equivalent(m)}: only Llama models can be exported to Hugging "
                      f"Face format.")
    if m.norm_placement != "pre":
        raise HFError(f"model.norm_placement={m.norm_placement!r} has no exact Hugging Face equivalent (Gemma 2's "
                      f"sandwich norms differ in RMSNorm, activation and embedding scale); only pre-norm models export.")
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
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
        "hidden_size": m.dim, "intermediate_size": m.ffn_dim, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
        "hidden_act": "silu", "max_position_embeddings": max_pos, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "rope_theta": m.rope_theta, "rope_parameters": rope, "torch_dtype": torch_dtype, "dtype": torch_dtype,
        "initializer_range": m.init_std, "use_cache": True,
    }
    if m.qk_norm:  # Qwen3's attention: q_norm / k_norm per head before rotary; full attention everywhere
        out.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False,
                   sliding_window=None, max_window_layers=m.n_layers,
                   layer_types=["full_attention"] * m.n_layers)
    if s.type != "none":
        out["rope_scaling"] = dict(rope)  # older transformers read this (and rope_theta)
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
    """HF safetensors renamed to our parameter names (full tensors, on CPU)."""
    from safetensors.torch import load_file  # optional (longtrain[hf]): only HF import/export needs it

    d = Path(hf_dir)
    out, unknown = {}, []
    for f in _safetensors_files(d):
        for name, t in load_file(str(f)).items():
            ours = hf_to_ours(name)
            if ours is None:
                if not name.endswith(_IGNORED_HF):
                    unknown.append(name)
                continue
            out[ours] = t
    if unknown:
        raise HFError(f"{d}: tensors with no longtrain counterpart: {unknown[:6]}; only plain Llama weights "
                      f"can be imported.")
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
            raise HFError(f"{hf_dir}: {ours_to_hf(name)} has shape {tuple(t.shape)}, the model's {name} needs "
                          f"{tuple(v.shape)}.")
        local[k] = t.to(v.dtype)
    set_model_state_dict(model, local, options=StateDictOptions(full_state_dict=True))


def write_hf(state: dict[str, torch.Tensor], m: ModelConfig, out_dir: str | os.PathLike, dtype: str = "float32",
             max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write our full state dict as an HF Llama directory: config.json + safetensors (+ index)."""
    from safetensors.torch import save_file  # optional (longtrain[hf]): only HF import/export needs it

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_sd = {}
    for k, t in state.items():
        name = ours_to_hf(k)
        if name is None:
            raise HFError(f"tensor {k} has no Hugging Face Llama counterpart; only arch=llama with "
                          f"model.norm_placement=pre exports.")
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
    """A longtrain DCP checkpoint (step directory or checkpoint root) to an HF Llama directory."""
    path = resolve_checkpoint_path(ckpt_path)
    cfg = config_from_dict(read_config(path))
    if cfg.model.arch != "llama":
        raise HFError(f"checkpoint {path} is model.arch={cfg.model.arch!r}{_no_hf_equivalent(cfg.model)}; only "
                      f"Llama exports to Hugging Face.")
    model_config_to_hf(cfg.model)  # refuses what has no exact equivalent before anything is read
    state = load_full_model_state(path)
    if cfg.model.sigma_reparam:  # W_hat = gamma / sigma(W) * W into each weight: a plain Llama
        state = fold_state_dict(state)
    return write_hf(state, dataclasses.replace(cfg.model, sigma_reparam=False), out_dir, dtype)
