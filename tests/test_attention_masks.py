"""The FlexAttention document mask is built from block ranges without an S x S tensor, and equals
``create_block_mask``'s (block counts, full blocks and attention outputs)."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from longtrain.models.attention import CoreAttention, document_block_mask, dense_document_mask


def _doc_ids(B, S, kind, gen):
    if kind == "packed":  # increasing ids, as the packer writes them
        cuts = torch.sort(torch.randint(0, S, (B, 6), generator=gen), dim=1).values
        return (torch.arange(S)[None, :, None] >= cuts[:, None, :]).sum(-1).int()
    if kind == "one":
        return torch.zeros(B, S, dtype=torch.int32)
    return torch.randint(0, 3, (B, S), generator=gen).int()  # any order: still exact


@pytest.mark.parametrize("S,kind", [(512, "packed"), (1000, "packed"), (640, "shuffled"), (384, "one")])
def test_document_block_mask_equals_create_block_mask(S, kind):
    gen = torch.Generator().manual_seed(S)
    B = 2
    doc = _doc_ids(B, S, kind, gen)

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    ref = create_block_mask(mask_mod, B, None, S, S, device="cpu")
    mine = document_block_mask(doc)
    assert torch.equal(mine.to_dense(), ref.to_dense())  # same partial + full blocks
    assert torch.equal(mine.full_kv_num_blocks, ref.full_kv_num_blocks)  # full blocks skip mask_mod
    q, k, v = (torch.randn(B, 2, S, 16, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex without torch.compile on CPU: the unfused reference
        out, want = flex_attention(q, k, v, block_mask=mine), flex_attention(q, k, v, block_mask=ref)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_document_block_mask_stays_small_at_long_lengths():
    S = 1 << 18  # the eager create_block_mask would need an S x S mask (64 GiB of bools)
    doc = torch.zeros(1, S, dtype=torch.int32)
    doc[:, S // 3:] = 1
    bm = document_block_mask(doc)
    n = S // 128
    assert bm.kv_indices.shape == (1, 1, n, n)
    # partial blocks: the diagonal, plus the block holding the document cut (against earlier and later blocks)
    assert int(bm.kv_num_blocks.sum()) <= 2 * n + 2
    cut = (S // 3) // 128
    assert int(bm.full_kv_num_blocks.sum()) == cut * (cut - 1) // 2 + (n - cut - 1) * (n - cut - 2) // 2


def test_flex_backend_with_document_masks_equals_the_dense_mask():
    gen = torch.Generator().manual_seed(0)
    B, S, H, D = 1, 256, 2, 16
    doc = _doc_ids(B, S, "packed", gen)
    q, k, v = (torch.randn(B, S, H, D, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = CoreAttention("flex")(q, k, v, doc)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=dense_document_mask(doc)).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
