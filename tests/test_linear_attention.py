"""The gated delta rule's chunked reference computes the recurrence it stands for.

``recurrent`` below is the recurrence of ``models.linear_attention``'s docstring token by token
(test-only: O(S) sequential steps); the chunked reference must match it in values and gradients,
with chunks shorter and longer than the sequence, with padding, and with packed documents (whose
states must not leak across a document start). The layer then runs forward and backward in a
looped core, and the kernel rule picks the reference on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longtrain.config import ConfigError

from longtrain.models.linear_attention import (GatedDeltaNet, document_starts, gated_delta_chunked,
                                               select_gdn_kernel)


def recurrent(q, k, v, g, beta, scale, doc_ids=None):
    """S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t."""
    B, S, H, Dk = q.shape
    state = q.new_zeros(B, H, Dk, v.shape[-1])
    starts = document_starts(doc_ids) if doc_ids is not None else torch.zeros(B, S, dtype=torch.bool)
    eye = torch.eye(Dk, dtype=q.dtype)
    outs = []
    for t in range(S):
        alpha = g[:, t].exp().masked_fill(starts[:, t, None], 0.0)[..., None, None]  # [B, H, 1, 1]
        kt, vt, bt = k[:, t], v[:, t], beta[:, t][..., None, None]
        erase = eye - bt * kt[..., :, None] * kt[..., None, :]
        state = alpha * (erase @ state) + bt * kt[..., :, None] * vt[..., None, :]
        outs.append(scale * (q[:, t, :, None, :] @ state).squeeze(-2))
    return torch.stack(outs, dim=1)


def _inputs(B=2, S=19, H=3, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, S, H, D, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, S, H, D, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)
    g = -F.softplus(torch.randn(B, S, H, generator=gen, dtype=torch.float64))
    beta = torch.sigmoid(torch.randn(B, S, H, generator=gen, dtype=torch.float64))
    return [t.requires_grad_() for t in (q, k, v, g, beta)]


def _docs(B, S, seed=1):
    gen = torch.Generator().manual_seed(seed)
    doc_ids = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        for c in sorted(torch.randperm(S - 1, generator=gen)[:3].add(1).tolist()):
            doc_ids[b, c:] += 1
    return doc_ids


@pytest.mark.parametrize("chunk", [4, 8, 32])
@pytest.mark.parametrize("docs", [False, True])
def test_chunked_reference_matches_recurrence_values_and_grads(chunk, docs):
    inputs = _inputs()
    doc_ids = _docs(2, 19) if docs else None
    scale = 8 ** -0.5
    got = gated_delta_chunked(*inputs, scale, doc_ids, chunk=chunk)
    want = recurrent(*inputs, scale, doc_ids)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)  # float64 in, float64 inside
    w = torch.randn_like(want)
    g_got = torch.autograd.grad((got * w).sum(), inputs)
    g_want = torch.autograd.grad((want * w).sum(), inputs)
    for name, a, b in zip("q k v g beta".split(), g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")
        assert torch.isfinite(a).all(), name


def test_document_start_empties_the_state():
    """Changing a token of document 0 changes nothing in document 1 (and the check has teeth: it
    does change later tokens of document 0)."""
    q, k, v, g, beta = (t.detach() for t in _inputs(B=1, S=16))
    doc_ids = torch.tensor([[0] * 9 + [1] * 7])
    base = gated_delta_chunked(q, k, v, g, beta, 0.3, doc_ids, chunk=4)
    v2 = v.clone()
    v2[:, 2] += 5.0
    moved = gated_delta_chunked(q, k, v2, g, beta, 0.3, doc_ids, chunk=4)
    assert torch.equal(moved[:, 9:], base[:, 9:])
    assert (moved[:, 3:9] - base[:, 3:9]).abs().max() > 1e-2


def test_kernel_rule_picks_the_reference_on_cpu_and_refuses_forced_fla():
    assert select_gdn_kernel("auto", torch.device("cpu")) == "reference"
    assert select_gdn_kernel("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ConfigError, match="model.gdn_kernel=fla needs a CUDA device"):
        select_gdn_kernel("fla", torch.device("cpu"))


def test_layer_runs_forward_and_backward_under_bf16_autocast():
    torch.manual_seed(0)
    layer = GatedDeltaNet(32, 4)
    layer.reset_decay()
    x = torch.randn(2, 24, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, doc_ids=_docs(2, 24))
    y.float().sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    alpha = torch.exp(-F.softplus(layer.wa.bias.detach()))
    assert 0.7 < alpha.min() < alpha.max() < 0.9999  # decays spread from fast to slow heads
