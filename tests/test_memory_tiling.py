"""Tiled loss never materialises [tokens, vocab]; tiled MLP never holds [tokens, ffn] at once."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longtrain.models.llama import FeedForward, LMHead
from longtrain.memory.tiling import tiled_loss_forward, tiled_mlp_forward

torch.set_num_threads(1)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_in_head_step(seq: int, vocab: int, dim: int, chunk: int) -> tuple[int, torch.Tensor]:
    torch.manual_seed(0)
    head = LMHead(dim, vocab, 1e-5)
    if chunk:
        head.forward = tiled_loss_forward(head.forward, chunk)
    h = torch.randn(1, seq, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (1, seq))
    with LargestTensor() as mode:
        loss = head(h, labels)
        loss.backward()
    return mode.largest, loss.detach()


@pytest.mark.parametrize("seq", [512, 2048])
def test_tiled_loss_creates_no_tensor_of_seq_by_vocab(seq):
    vocab, dim, chunk = 1024, 32, 64
    largest, _ = largest_in_head_step(seq, vocab, dim, chunk)
    # the largest things left: the output weight (and its gradient) [vocab, dim], one chunk's
    # logits [chunk, vocab], the hidden-state gradient [seq, dim] -- none grows with seq x vocab
    assert largest <= max(vocab * dim, chunk * vocab, seq * dim)
    assert largest <= seq * vocab // 8
    untiled, _ = largest_in_head_step(seq, vocab, dim, 0)
    assert untiled >= seq * vocab  # the untiled head does make full logits


def test_tiled_loss_peak_does_not_grow_with_sequence():
    small, _ = largest_in_head_step(512, 1024, 8, 64)
    large, _ = largest_in_head_step(4096, 1024, 8, 64)
    assert small == large == 1024 * 64  # one chunk's logits, whatever the sequence length


def test_tiled_loss_equals_untiled_with_ignored_tokens_and_batches():
    torch.manual_seed(0)
    head = LMHead(16, 50, 1e-5)
    h = torch.randn(3, 37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 37))
    labels[1, 5:20] = -100
    ref = head(h, labels)
    g_ref = torch.autograd.grad(ref, [h, *head.parameters()])
    tiled = tiled_loss_forward(head.forward, 10)
    out = tiled(h, labels)
    g = torch.autograd.grad(out, [h, *head.parameters()])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tiled_mlp_holds_one_chunk_of_the_intermediate():
    torch.manual_seed(0)
    dim, ffn, seq, chunks = 16, 512, 1024, 8
    mlp = FeedForward(dim, ffn)
    x = torch.randn(1, seq, dim, requires_grad=True)
    ref = mlp(x)
    g_ref = torch.autograd.grad(ref.square().sum(), [x, *mlp.parameters()])
    tiled = tiled_mlp_forward(FeedForward.forward.__get__(mlp), chunks)
    with LargestTensor() as mode:
        out = tiled(x)
        g = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    assert mode.largest <= max(seq // chunks * ffn, ffn * dim, seq * dim) < seq * ffn
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref):
        # weight gradients add 1024 tokens' terms in another order (chunk by chunk): entries near
        # zero differ by a few 1e-6 with some thread counts, so atol scales with the largest entry
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
