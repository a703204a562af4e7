"""The global sample order: sample index -> packed sequence, a pure function of (seed, epoch, index).

Owns: the train/eval document split, the per-epoch document shuffle, windowed packing, and the
mapping from a global sample index to the document pieces of that sample.

The idea. Epoch ``e`` permutes the split's documents with ``rng(seed, split, e)``, cuts the
permutation into windows of ``window`` documents, packs each window on its own
(``data.packing.plan_packing``, from lengths only) and shuffles the window's sequences with
``rng(seed, split, e, w)``. Samples are numbered globally across epochs: epoch ``e`` holds the
samples after epoch ``e-1``'s last one. Nothing here depends on the number of ranks or on what
was read before, so any rank can find any sample, and a run resumes -- on any data-parallel
size -- from one integer (samples consumed) plus where the current epoch started. Windows are
packed lazily, when a sample in them is first asked for, and only a few packed windows are kept,
so memory stays at O(documents) integers however large the corpus.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
import numpy as np

from .packing import PackPlan, plan_packing
from .validate import DataError

_SPLIT_SALT = {"train": 0x7A1, "eval": 0xE7A1}
_HOLDOUT_SALT = 0x401D  # the held-out set is the same for every seed, so eval losses compare


def split_documents(lengths: np.ndarray, eval_fraction: float) -> dict[str, np.ndarray]:
    """Indices of the train and eval documents (sorted); documents of length < 2 are in neither."""
    usable = np.flatnonzero(np.asarray(lengths) >= 2)
    n_eval = 0
    if eval_fraction > 0 and len(usable) >= 2:
        n_eval = min(len(usable) - 1, max(1, int(round(eval_fraction * len(usable)))))
    perm = np.random.default_rng([_HOLDOUT_SALT]).permutation(len(usable))
    return {"eval": np.sort(usable[perm[:n_eval]]), "train": np.sort(usable[perm[n_eval:]])}


class GlobalSampleOrder:
    """Maps a global sample index to ``(epoch, pieces)`` for one split of one document set."""

    def __init__(self, lengths: np.ndarray, docs: np.ndarray, *, seq_len: int, method: str,
                 split_long: str, seed: int, split: str = "train", window: int = 4096, cache: int = 4,
                 length_weighting: float = 0.0):
        if len(docs) == 0:
            raise DataError(f"the {split} split holds no documents; "
                            + ("set data.eval_fraction > 0 (and have at least 2 documents) to evaluate."
                               if split == "eval" else "the dataset is empty or every document was skipped."))
        self.lengths = np.asarray(lengths, np.int64)
        self.docs = np.asarray(docs, np.int64)
        self.seq_len, self.method, self.split_long = seq_len, method, split_long
        self.seed, self.split, self.window = seed, split, max(1, window)
        self.length_weighting = float(length_weighting) if split == "train" else 0.0  # eval losses compare
        self._salt = _SPLIT_SALT[split]
        self._cache_size = cache
        self._goto_epoch(0, 0)

    # ---- epochs --------------------------------------------------------------------------------

    def _goto_epoch(self, epoch: int, start: int) -> None:
        self.epoch, self.epoch_start = epoch, start
        rng = np.random.default_rng([self.seed, self._salt, epoch])
        docs = self.docs if self.length_weighting == 0 else self._weighted_docs(rng)
        self._perm = docs[rng.permutation(len(docs))]
        self._n_windows = (len(self._perm) + self.window - 1) // self.window
        self._cum = [0]  # samples before window w (known for the windows packed so far)
        self._plans: OrderedDict[int, PackPlan] = OrderedDict()

    def _weighted_docs(self, rng: np.random.Generator) -> np.ndarray:
        """This epoch's documents under ``data.length_weighting`` p: document d appears
        floor(w_d) times plus once more with probability frac(w_d), w_d = (length_d / mean)^p, so
        long documents are seen more often (and short ones may sit an epoch out). A function of
        (seed, epoch) only, so a resumed run draws the same epochs."""
        lens = self.lengths[self.docs].astype(np.float64)
        w = (lens / lens.mean()) ** self.length_weighting
        counts = np.floor(w).astype(np.int64) + (rng.random(len(w)) < w - np.floor(w))
        if counts.sum() == 0:
            counts[np.argmax(lens)] = 1
        return np.repeat(self.docs, counts)

    def window_plan(self, w: int) -> PackPlan:
        plan = self._plans.get(w)
        if plan is None:
            docs = self._perm[w * self.window:(w + 1) * self.window]
            plan = plan_packing(self.lengths[docs], docs, seq_len=self.seq_len, method=self.method,
                                split_long=self.split_long)
            rng = np.random.default_rng([self.seed, self._salt, self.epoch, w + 1])
            plan = plan.reorder(rng.permutation(plan.n_sequences))
            self._plans[w] = plan
            if len(self._plans) > self._cache_size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(w)
        return plan

    def _extend(self) -> bool:
        """Pack the next unpacked window of this epoch; False if the epoch has none left."""
        w = len(self._cum) - 1
        if w >= self._n_windows:
            return False
        self._cum.append(self._cum[-1] + self.window_plan(w).n_sequences)
        return True

    def epoch_length(self) -> int:
        """Samples in the current epoch (packs every remaining window's lengths)."""
        while self._extend():
            pass
        return self._cum[-1]

    def seek(self, g: int) -> None:
        """Make the current epoch the one holding global sample ``g``."""
        if g < self.epoch_start:
            self._goto_epoch(0, 0)  # only a rewind (e.g. a restarted eval) walks from the start
        while True:
            k = g - self.epoch_start
            while self._cum[-1] <= k and self._extend():
                pass
            if k < self._cum[-1]:
                return
            total = self._cum[-1]
            if total == 0:
                why = (f"data.split_long=drop drops every document longer than a sequence, and all of them "
                       f"are. Use data.split_long=split (or truncate), or a longer data.seq_len"
                       if self.split_long == "drop" else
                       "every document is shorter than 2 tokens, which carry no prediction. Use longer documents")
                raise DataError(f"the {self.split} split packs into 0 sequences of data.seq_len={self.seq_len}: "
                                f"{why}.")
            self._goto_epoch(self.epoch + 1, self.epoch_start + total)

    def sample(self, g: int) -> tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(epoch, (doc ids, starts, lengths))`` of global sample ``g``."""
        self.seek(g)
        k = g - self.epoch_start
        w = bisect.bisect_right(self._cum, k) - 1
        return self.epoch, self.window_plan(w).segments(k - self._cum[w])

    # ---- resume --------------------------------------------------------------------------------

    def position(self, g: int) -> dict:
        """The epoch holding sample ``g`` and where it started: with ``g`` a complete resume point."""
        self.seek(g)
        return {"epoch": self.epoch, "epoch_start": self.epoch_start}

    def restore(self, epoch: int, epoch_start: int) -> None:
        if epoch_start < 0 or epoch < 0:
            raise DataError(f"data loader state has epoch={epoch}, epoch_start={epoch_start}; both must be >= 0.")
        self._goto_epoch(epoch, epoch_start)

    def fingerprint(self) -> dict:
        """What the order depends on; a resumed run must match it to continue the same order."""
        out = {"seed": self.seed, "split": self.split, "seq_len": self.seq_len, "packing": self.method,
               "split_long": self.split_long, "window": self.window, "n_docs": int(len(self.docs)),
               "n_tokens": int(self.lengths[self.docs].sum())}
        if self.length_weighting:  # only when on: states saved before the setting existed still match
            out["length_weighting"] = self.length_weighting
        return out


def sample_index(step: int, dp_rank: int, dp_size: int, batch_size: int, b: int, start: int = 0) -> int:
    """Global sample of row ``b`` of ``dp_rank``'s micro-batch at ``step`` (counted from ``start``)."""
    return start + step * dp_size * batch_size + dp_rank * batch_size + b
