"""The loader: sp slices, dp disjointness, the global sample order, exact resume on any dp size."""

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from longtrain.config import DataConfig
from longtrain.data.loader import build_loader
from longtrain.data.validate import DataError

VOCAB = 300


def _cfg(**kw):
    base = dict(source="synthetic", seq_len=64, batch_size=2, synthetic_docs=300, synthetic_doc_len=40,
                pack_window=64, seed=7)
    base.update(kw)
    return DataConfig(**base)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("doc_masking", [True, False])
@pytest.mark.parametrize("sp", [2, 4])
def test_concatenated_sp_slices_equal_the_unsliced_sequence(sp, doc_masking):
    cfg = _cfg(doc_masking=doc_masking)
    for dp_rank in range(2):
        full = _take(build_loader(cfg, vocab_size=VOCAB, dp_rank=dp_rank, dp_size=2), 3)
        parts = [_take(build_loader(cfg, vocab_size=VOCAB, dp_rank=dp_rank, dp_size=2, sp_rank=r, sp_size=sp), 3)
                 for r in range(sp)]
        for step in range(3):
            for k in full[step]:
                cat = torch.cat([parts[r][step][k] for r in range(sp)], dim=1)
                assert torch.equal(cat, full[step][k]), k
            assert parts[0][step]["tokens"].shape == (2, 64 // sp)
    # the last label of slice r is the first token of slice r+1 when both are in one document
    b = full[0]
    if doc_masking:
        t = 64 // sp - 1
        same = (b["doc_ids"][:, t] == b["doc_ids"][:, t + 1]) & (b["labels"][:, t] != -100)  # not padding
        assert same.any() and torch.equal(b["labels"][same, t], b["tokens"][same, t + 1])


def test_batch_contract_dtypes_and_shapes():
    b = next(build_loader(_cfg(), vocab_size=VOCAB))
    assert set(b) == {"tokens", "labels", "position_ids", "doc_ids"}
    assert b["tokens"].dtype == b["labels"].dtype == b["position_ids"].dtype == torch.int64
    assert b["doc_ids"].dtype == torch.int32 and all(v.shape == (2, 64) for v in b.values())
    assert set(next(build_loader(_cfg(doc_masking=False), vocab_size=VOCAB))) == {"tokens", "labels", "position_ids"}


def test_dp_ranks_read_disjoint_samples_whose_union_is_the_global_batch():
    dp, B = 4, 2
    ranks = [_take(build_loader(_cfg(batch_size=B), vocab_size=VOCAB, dp_rank=r, dp_size=dp), 3) for r in range(dp)]
    glob = _take(build_loader(_cfg(batch_size=dp * B), vocab_size=VOCAB), 3)  # dp=1, one global batch per step
    for step in range(3):
        for k in glob[step]:
            assert torch.equal(torch.cat([ranks[r][step][k] for r in range(dp)]), glob[step][k])
        rows = {tuple(x.tolist()) for x in glob[step]["tokens"]}
        assert len(rows) == dp * B  # distinct samples: no two ranks read the same one


def _global_samples(cfg, n):
    """The global sample order: a dp=1, B=1 loader yields sample 0, 1, 2, ..."""
    ref = build_loader(replace(cfg, batch_size=1), vocab_size=VOCAB)
    return [b["tokens"][0] for b in _take(ref, n)]


def test_resume_from_state_dict_yields_exactly_the_uninterrupted_batches():
    cfg = _cfg()
    a = build_loader(cfg, vocab_size=VOCAB, dp_rank=1, dp_size=2)
    _take(a, 5)
    state = a.state_dict()
    b = build_loader(cfg, vocab_size=VOCAB, dp_rank=1, dp_size=2)
    b.load_state_dict(state)
    for x, y in zip(_take(a, 6), _take(b, 6)):
        assert _same(x, y)


@pytest.mark.parametrize("new_dp", [1, 4])
def test_resume_on_another_dp_size_continues_the_global_sample_order(new_dp):
    cfg = _cfg(batch_size=2)
    ranks = [build_loader(cfg, vocab_size=VOCAB, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        for L in ranks:
            next(L)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()  # global: the same on every rank
    consumed = state["consumed_samples"]
    assert consumed == 3 * 2 * 2
    ref = _global_samples(cfg, consumed + 4 * new_dp * 2)
    new = [build_loader(cfg, vocab_size=VOCAB, dp_rank=r, dp_size=new_dp) for r in range(new_dp)]
    for L in new:
        L.load_state_dict(state)
    for step in range(4):
        for r, L in enumerate(new):
            batch = next(L)
            for b in range(2):
                assert torch.equal(batch["tokens"][b], ref[consumed + step * new_dp * 2 + r * 2 + b])


def test_epochs_reshuffle_deterministically_and_resume_across_an_epoch_boundary():
    cfg = _cfg(synthetic_docs=20, synthetic_doc_len=30, batch_size=3)
    a = build_loader(cfg, vocab_size=VOCAB)
    n_epoch = a.order.epoch_length()
    steps = (3 * n_epoch) // 3 + 2
    seq = _take(a, steps)
    assert a.epoch >= 2
    first = [tuple(r.tolist()) for b in seq for r in b["tokens"]][:n_epoch]
    second = [tuple(r.tolist()) for b in seq for r in b["tokens"]][n_epoch:2 * n_epoch]
    assert first != second  # a new shuffle in epoch 1
    # resume in the middle of epoch 1 from a state taken there
    b = build_loader(cfg, vocab_size=VOCAB)
    k = (n_epoch + n_epoch // 2) // 3
    _take(b, k)
    state = b.state_dict()
    assert state["epoch"] == 1 and state["epoch_start"] == n_epoch
    c = build_loader(cfg, vocab_size=VOCAB)
    c.load_state_dict(state)
    for x, y in zip(_take(c, steps - k), seq[k:]):
        assert _same(x, y)
    # same seed -> same order; other seed -> another order
    assert _same(next(build_loader(cfg, vocab_size=VOCAB)), seq[0])
    assert not _same(next(build_loader(replace(cfg, seed=8), vocab_size=VOCAB)), seq[0])


def test_resume_refuses_a_state_from_other_data_settings():
    a = build_loader(_cfg(), vocab_size=VOCAB)
    next(a)
    b = build_loader(_cfg(seq_len=128), vocab_size=VOCAB)
    with pytest.raises(DataError, match="seq_len=64 .now 128.*data.on_order_change=continue"):
        b.load_state_dict(a.state_dict())
    b.load_state_dict(a.state_dict(), strict=False)
    assert b.consumed == a.consumed
    # the config says so for a whole run (context extension to a longer seq_len)
    c = build_loader(_cfg(seq_len=128, on_order_change="continue"), vocab_size=VOCAB)
    c.load_state_dict(a.state_dict())
    assert c.consumed == a.consumed


def test_eval_split_uses_held_out_documents_in_its_own_order():
    cfg = _cfg(eval_fraction=0.1)
    tr = build_loader(cfg, vocab_size=VOCAB)
    ev = build_loader(cfg, vocab_size=VOCAB, split="eval")
    assert set(tr.order.docs.tolist()).isdisjoint(ev.order.docs.tolist())
    assert len(ev.order.docs) == 30
    assert _same(next(ev), next(build_loader(cfg, vocab_size=VOCAB, split="eval")))
    with pytest.raises(DataError, match="eval_fraction"):
        build_loader(_cfg(eval_fraction=0.0), vocab_size=VOCAB, split="eval")


def test_stdlib_default_needs_no_arguments_and_costs_milliseconds_per_batch():
    loader = build_loader(DataConfig(), vocab_size=264)
    b = next(loader)
    assert b["tokens"].shape == (8, 256) and int(b["tokens"].max()) < 259
    t0 = time.perf_counter()
    _take(loader, 100)
    assert (time.perf_counter() - t0) / 100 < 0.01
    text = bytes(int(x) for x in b["tokens"][0] if x < 256).decode("utf-8", "replace")
    assert text.isprintable() or "\n" in text or " " in text


def test_a_tokenizer_larger_than_the_model_vocab_is_refused():
    with pytest.raises(DataError, match=r"data.tokenizer='byte' has 259 tokens but model.vocab_size=200"):
        build_loader(DataConfig(), vocab_size=200)


def test_seq_len_must_divide_by_sp():
    with pytest.raises(DataError, match="not divisible by parallel.sp=3"):
        build_loader(_cfg(), vocab_size=VOCAB, sp_rank=0, sp_size=3)


def test_synthetic_period_documents_repeat_their_first_period_tokens():
    from longtrain.data.sources import SyntheticDocuments

    plain = SyntheticDocuments(50, 40, VOCAB, seed=7)
    periodic = SyntheticDocuments(50, 40, VOCAB, seed=7, period=8)
    assert np.array_equal(plain.lengths, periodic.lengths)  # same packing, only the contents differ
    for i in range(50):
        d = periodic.get(i)
        assert len(d) == plain.lengths[i] and d.min() >= 0 and d.max() < VOCAB
        assert np.array_equal(d[8:], d[:-8])  # every token after the first period is the one 8 back
        assert np.array_equal(d[:8], plain.get(i)[:8])
    assert not all(np.array_equal(plain.get(i)[8:], plain.get(i)[:-8]) for i in range(50))


def test_a_negative_synthetic_period_is_one_config_error():
    from longtrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.synthetic_period=-1 must be >= 0"):
        load_config(None, ["data.source=synthetic", "data.synthetic_period=-1"])
