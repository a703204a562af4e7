"""Packing: per-document positions and labels, cu_seqlens, long-document policies, best-fit."""

import numpy as np
import pytest

from longtrain.data.packing import IGNORE_INDEX, cu_seqlens_from_doc_ids, pack_documents, plan_packing


def _docs(lengths, start=1000):
    """Documents whose tokens are distinct across documents (doc k = start*k + 0..n-1)."""
    return [np.arange(n, dtype=np.int32) + start * (k + 1) for k, n in enumerate(lengths)]


def _check_sequence(seq, pad_id):
    tok, lab, pos, doc = seq["tokens"], seq["labels"], seq["position_ids"], seq["doc_ids"]
    S = len(tok)
    for t in range(S):
        # position = distance from the first slot of the same document piece
        first = t
        while first > 0 and doc[first - 1] == doc[t]:
            first -= 1
        if tok[t] != pad_id:
            assert pos[t] == t - first
    for t in range(S - 1):
        if doc[t + 1] != doc[t]:
            assert lab[t] == IGNORE_INDEX
        elif tok[t] != pad_id:
            assert lab[t] == tok[t + 1]
    cu = seq["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == S and np.all(np.diff(cu) > 0)
    for a, b in zip(cu[:-1], cu[1:]):
        assert np.all(doc[a:b] == doc[a]) and (a == 0 or doc[a - 1] != doc[a])


def test_positions_restart_and_labels_ignore_document_boundaries():
    docs = _docs([5, 3, 4])
    (seq,) = pack_documents(docs, seq_len=15, pad_id=7)
    assert seq["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 0, 0]
    assert seq["doc_ids"].tolist() == [0] * 5 + [1] * 3 + [2] * 4 + [3] * 3  # padding: its own id
    lab = seq["labels"].tolist()
    assert lab[4] == lab[7] == lab[11] == IGNORE_INDEX  # last token of each document
    assert lab[12:] == [IGNORE_INDEX] * 3  # padding
    assert lab[:4] == docs[0][1:].tolist()
    assert seq["cu_seqlens"].tolist() == [0, 5, 8, 12, 15]


@pytest.mark.parametrize("method", ["greedy", "best_fit"])
@pytest.mark.parametrize("split_long", ["split", "truncate", "drop"])
def test_every_sequence_is_consistent_for_random_documents(method, split_long):
    rng = np.random.default_rng(0)
    docs = _docs(rng.integers(2, 90, size=60).tolist())
    for seq in pack_documents(docs, seq_len=32, method=method, split_long=split_long, pad_id=1):
        _check_sequence(seq, pad_id=1)


def _predictions(seqs):
    """All (input token, label) pairs the sequences train on."""
    return sorted((int(t), int(l)) for s in seqs for t, l in zip(s["tokens"], s["labels"]) if l != IGNORE_INDEX)


@pytest.mark.parametrize("method", ["greedy", "best_fit"])
def test_split_keeps_every_prediction_of_a_long_document_exactly_once(method):
    docs = _docs([100, 7, 3])
    seqs = pack_documents(docs, seq_len=16, method=method, split_long="split")
    want = sorted((int(a), int(b)) for d in docs for a, b in zip(d[:-1], d[1:]))
    assert _predictions(seqs) == want


def test_truncate_keeps_the_first_seq_len_plus_one_tokens_and_drop_skips():
    docs = _docs([100, 7])
    seqs = pack_documents(docs, seq_len=16, split_long="truncate")
    long_doc = docs[0]
    want = sorted([(int(a), int(b)) for a, b in zip(long_doc[:16], long_doc[1:17])]
                  + [(int(a), int(b)) for a, b in zip(docs[1][:-1], docs[1][1:])])
    assert _predictions(seqs) == want
    plan = plan_packing([100, 7], seq_len=16, split_long="drop")
    assert plan.dropped == 1 and set(plan.seg_doc.tolist()) == {1}


def test_best_fit_packs_at_least_as_tightly_as_greedy():
    lengths = [6, 5, 5, 4, 3, 3, 2]
    greedy = plan_packing(lengths, seq_len=9, method="greedy")
    best = plan_packing(lengths, seq_len=9, method="best_fit")
    assert greedy.n_sequences == 4 and best.n_sequences == 3
    assert best.fill() >= greedy.fill()
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 300, size=500)
    assert (plan_packing(lengths, seq_len=511, method="best_fit").n_sequences
            <= plan_packing(lengths, seq_len=511, method="greedy").n_sequences)


def test_packing_is_deterministic():
    lengths = np.random.default_rng(2).integers(2, 300, size=300)
    a = plan_packing(lengths, seq_len=255, method="best_fit")
    b = plan_packing(lengths, seq_len=255, method="best_fit")
    assert all(np.array_equal(x, y) for x, y in zip((a.seq_ptr, a.seg_doc, a.seg_start, a.seg_len),
                                                   (b.seq_ptr, b.seg_doc, b.seg_start, b.seg_len)))


def test_doc_ids_give_the_block_diagonal_causal_mask_of_cu_seqlens():
    (seq,) = pack_documents(_docs([4, 6, 3]), seq_len=15)
    d = seq["doc_ids"]
    q, k = np.meshgrid(np.arange(15), np.arange(15), indexing="ij")
    mask = (d[q] == d[k]) & (q >= k)  # what FlexAttention's mask_mod computes
    ref = np.zeros((15, 15), bool)
    cu = cu_seqlens_from_doc_ids(d)
    for a, b in zip(cu[:-1], cu[1:]):
        ref[a:b, a:b] = np.tril(np.ones((b - a, b - a), bool))
    assert np.array_equal(mask, ref)


def test_without_doc_masking_positions_are_global_and_labels_a_plain_shift():
    docs = _docs([5, 3])
    (seq,) = pack_documents(docs, seq_len=7, doc_masking=False)
    assert "doc_ids" not in seq
    assert seq["position_ids"].tolist() == list(range(7))
    full = np.concatenate(docs)
    assert seq["labels"].tolist() == full[1:8].tolist()
