"""Properties of the plain models (single process, float32)."""

import dataclasses

import pytest
import torch

from longtrain.config import load_config
from longtrain.models import Llama, Looped, build_model
from longtrain.models.attention import CoreAttention


def tiny(arch="llama", **kw):
    over = [f"model.arch={arch}", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=96",
            "model.vocab_size=97", "model.n_layers=3"] + [f"model.{k}={v}" for k, v in kw.items()]
    return load_config(None, over).model


@pytest.mark.parametrize("arch", ["llama", "looped"])
def test_decoder_is_causal_changing_later_tokens_leaves_earlier_outputs(arch):
    torch.manual_seed(0)
    m = build_model(tiny(arch))
    x = torch.randint(0, 97, (2, 24))
    y = x.clone()
    y[:, 13:] = torch.randint(0, 97, (2, 11))
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :13], b[:, :13], rtol=0, atol=1e-6)
    assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-3  # and later outputs do change


def test_looped_with_one_loop_and_no_lora_equals_plain_stack():
    torch.manual_seed(0)
    mc = tiny("looped", n_prelude=1, n_core=2, n_coda=1, loops=1, lora_rank=0, reinject="add")
    looped = Looped(mc)
    plain = Llama(dataclasses.replace(mc, arch="llama", n_layers=4))
    blocks = [*looped.prelude.values(), *looped.core.layers.values(), *looped.coda.values()]
    with torch.no_grad():
        plain.tok_embeddings.weight.copy_(looped.tok_embeddings.weight)
        for i, b in enumerate(blocks):
            plain.layers[str(i)].load_state_dict(b.state_dict())
        plain.head.load_state_dict(looped.head.state_dict())
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(looped(x, n_loops=1), plain(x), rtol=1e-6, atol=1e-6)


def test_lora_starts_at_zero_and_then_differs_per_loop():
    torch.manual_seed(0)
    mc = tiny("looped", lora_rank=4, loops=3)
    with_lora = Looped(mc)
    without = Looped(dataclasses.replace(mc, lora_rank=0))
    missing, unexpected = with_lora.load_state_dict(without.state_dict(), strict=False)
    assert not unexpected and all(".lora." in k for k in missing)
    x = torch.randint(0, 97, (1, 12))
    # zero-initialised deltas: the same function as without LoRA
    torch.testing.assert_close(with_lora(x), without(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        for lora in with_lora.core.lora.values():
            lora.B.normal_()
    assert (with_lora(x) - without(x)).abs().max() > 1e-3
    # and the per-loop tables are used: loop 0's and loop 1's deltas differ
    lora = next(iter(with_lora.core.lora.values()))
    h = torch.randn(1, 12, lora.A.shape[-1])
    assert (lora.delta(h, 0) - lora.delta(h, 1)).abs().max() > 1e-3


def _grads(model, x, **kw):
    model.zero_grad()
    y = torch.randint(0, 97, x.shape, generator=torch.Generator().manual_seed(1))
    model(x, labels=y, **kw).backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_truncated_backprop_equals_full_when_b_equals_r_and_untracked_loops_contribute_nothing():
    torch.manual_seed(0)
    mc = tiny("looped", loops=4, backprop_loops=0, lora_rank=2)
    full = Looped(mc)
    with torch.no_grad():
        for lora in full.core.lora.values():
            lora.B.normal_(std=0.1)
    x = torch.randint(0, 97, (2, 16))
    g_full = _grads(full, x)
    full.cfg = dataclasses.replace(mc, backprop_loops=4)
    g_b4 = _grads(full, x)
    for n in g_full:
        torch.testing.assert_close(g_b4[n], g_full[n], rtol=1e-5, atol=1e-7)
    full.cfg = dataclasses.replace(mc, backprop_loops=1)
    g_b1 = _grads(full, x)
    # the LoRA tables of loops 0..2 ran without a graph: exactly zero gradient there
    for name, lora in full.core.lora.items():
        gA = g_b1[f"core.lora.{name}.A"]
        assert torch.all(gA[:3] == 0) and gA[3].abs().max() > 0
    # and the result differs from full backprop (the shared core gets less gradient)
    assert any((g_b1[n] - g_full[n]).abs().max() > 1e-6 for n in g_full if n.startswith("core.layers"))


def test_gqa_with_as_many_kv_heads_as_heads_equals_multi_head_attention():
    torch.manual_seed(0)
    q = torch.randn(2, 10, 4, 8)
    k = torch.randn(2, 10, 4, 8)
    v = torch.randn(2, 10, 4, 8)
    out = CoreAttention("sdpa")(q, k, v)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8 ** 0.5
    scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # grouped: 4 query heads on 2 kv heads equals MHA with each kv head repeated for its group
    k2, v2 = k[:, :, :2], v[:, :, :2]
    gqa = CoreAttention("sdpa")(q, k2, v2)
    mha = CoreAttention("sdpa")(q, k2.repeat_interleave(2, dim=2), v2.repeat_interleave(2, dim=2))
    torch.testing.assert_close(gqa, mha, rtol=1e-6, atol=1e-6)


def test_document_mask_equals_running_each_document_alone():
    torch.manual_seed(0)
    m = build_model(tiny("llama"))
    docs = [torch.randint(0, 97, (n,)) for n in (5, 9, 2)]
    tokens = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    packed = m(tokens, position_ids=pos, doc_ids=doc_ids)
    alone = torch.cat([m(d[None]) for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_rope_scaling_variants_change_frequencies_as_configured():
    from longtrain.models.rope import rope_inv_freq
    from longtrain.config import RopeScalingConfig

    base, _ = rope_inv_freq(64, 10000.0)
    lin, _ = rope_inv_freq(64, 10000.0, RopeScalingConfig(type="linear", factor=4.0))
    torch.testing.assert_close(lin, base / 4)
    l3, _ = rope_inv_freq(64, 500000.0, RopeScalingConfig(type="llama3", factor=8.0, original_max_position=8192))
    b3, _ = rope_inv_freq(64, 500000.0)
    assert torch.allclose(l3[:4], b3[:4]) and torch.allclose(l3[-4:], b3[-4:] / 8)  # high freq kept, low scaled
    _, mscale = rope_inv_freq(64, 10000.0, RopeScalingConfig(type="yarn", factor=4.0, original_max_position=128))
    assert mscale > 1.0


def test_deepcopy_of_looped_model_with_lora_uses_its_own_lora_tables():
    import copy

    torch.manual_seed(0)
    m = Looped(tiny("looped", lora_rank=2, loops=2))
    twin = copy.deepcopy(m)
    with torch.no_grad():
        for lora in twin.core.lora.values():
            lora.B.normal_()
    x = torch.randint(0, 97, (1, 8))
    assert (twin(x) - m(x)).abs().max() > 1e-3  # the copy's LoRA changed, the original's did not
    with torch.no_grad():
        for name, lora in twin.core.lora.items():
            m.core.lora[name].B.copy_(lora.B)
    torch.testing.assert_close(twin(x), m(x))
