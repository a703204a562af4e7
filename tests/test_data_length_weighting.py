"""``data.length_weighting``: train epochs show long documents more often, as a pure function of
(seed, epoch), so a run resumes on the same samples; the eval split is never weighted."""

import numpy as np
import pytest

from longtrain.data.loader import Loader
from longtrain.data.sampler import GlobalSampleOrder
from longtrain.data.sources import MemoryDocuments
from longtrain.data.validate import DataError

LENGTHS = [8] * 30 + [64] * 6  # doc ids 0-29 short, 30-35 long


def _order(weighting, split="train"):
    return GlobalSampleOrder(np.array(LENGTHS), np.arange(len(LENGTHS)), seq_len=32, method="greedy",
                             split_long="split", seed=3, split=split, window=64, length_weighting=weighting)


def _token_share_of_long_docs(order) -> float:
    long_tokens = all_tokens = 0
    for g in range(order.epoch_length()):
        _, (docs, _, lens) = order.sample(g)
        long_tokens += int(lens[docs >= 30].sum())
        all_tokens += int(lens.sum())
    return long_tokens / all_tokens


def test_length_weighting_shows_long_documents_more_often_and_never_weights_eval():
    plain = _token_share_of_long_docs(_order(0.0))
    assert plain == pytest.approx(6 * 64 / (30 * 8 + 6 * 64), abs=0.02)  # each document once
    assert _token_share_of_long_docs(_order(1.0)) > plain + 0.15
    assert _token_share_of_long_docs(_order(2.0)) > _token_share_of_long_docs(_order(1.0))
    assert _token_share_of_long_docs(_order(1.0, split="eval")) == plain
    assert "length_weighting" not in _order(0.0).fingerprint()  # old loader states still match


def _loader(weighting):
    docs = MemoryDocuments([np.arange(n) % 250 for n in LENGTHS])
    return Loader(docs, _order(weighting), batch_size=2, seq_len=32, pad_id=258, doc_masking=True)


def test_a_weighted_loader_resumes_on_the_same_samples_and_refuses_another_weighting():
    a = _loader(1.0)
    for _ in range(7):
        next(a)
    state = a.state_dict()
    expected = [next(a)["tokens"] for _ in range(5)]
    b = _loader(1.0)
    b.load_state_dict(state)
    assert all((next(b)["tokens"] == t).all() for t in expected)
    with pytest.raises(DataError, match="length_weighting=1.0 \\(now None\\)"):
        _loader(0.0).load_state_dict(state)
