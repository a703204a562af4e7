"""The sample ledger: which global samples every step trained on, per rank, across restarts.

Owns: ``SampleLedger`` (``logging.ledger=true``), which appends one JSON line per completed step
to ``<run_dir>/ledger/rank<R>.jsonl``: the step, the attempt (how many times the job was
restarted), the global sample indices this rank read, a sha1 of the exact tokens and labels it
trained on, whether the update was applied, and the step's loss.

The idea: a restart must neither repeat nor skip data. After a run, the lineage of the final
model is, per step, the entry of the last attempt that completed it (an attempt resumes at its
checkpoint's step, and whatever a killed attempt did after that checkpoint was lost with it).
Comparing that lineage with an undisturbed run's ledger -- same samples, same digests, same
losses, every step exactly once -- is the audit ``tests/test_reliability_faults.py`` performs.
Cost: one hash of the step's token ids and one short line per step per rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class SampleLedger:
    def __init__(self, run_dir, dims, batch_size: int):
        self.dp_rank, self.dp_size, self.sp_rank = dims.dp_rank, dims.dp_size, dims.sp_rank
        self.batch_size = batch_size
        self.attempt = int(os.environ.get("LONGTRAIN_RESTART_COUNT") or 0)
        path = Path(run_dir) / "ledger"
        path.mkdir(parents=True, exist_ok=True)
        self.fh = open(path / f"rank{dims.rank}.jsonl", "a")

    def samples(self, consumed_before: int, n_micro: int) -> list[int]:
        """Global sample indices this dp rank read in a step (see ``longtrain.data.loader``)."""
        out = []
        for i in range(n_micro):
            base = consumed_before + i * self.dp_size * self.batch_size + self.dp_rank * self.batch_size
            out += range(base, base + self.batch_size)
        return out

    def record(self, step: int, consumed_before: int, batches: list[dict], applied: bool, loss: float) -> None:
        h = hashlib.sha1()
        for b in batches:
            for key in ("tokens", "labels"):
                h.update(b[key].numpy().tobytes())
        rec = {"step": step, "attempt": self.attempt, "dp_rank": self.dp_rank, "sp_rank": self.sp_rank,
               "samples": self.samples(consumed_before, len(batches)), "digest": h.hexdigest(),
               "applied": bool(applied), "loss": loss}
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def read_ledger(run_dir) -> list[dict]:
    """Every entry of every rank, in file order per rank."""
    out = []
    for f in sorted((Path(run_dir) / "ledger").glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        out += [{**json.loads(line), "rank": rank} for line in f.read_text().splitlines() if line.strip()]
    return out


def lineage(entries: list[dict]) -> dict[tuple[int, int], dict]:
    """(step, rank) -> the entry of the last attempt that completed that step: the final model's history."""
    out: dict[tuple[int, int], dict] = {}
    for e in entries:
        key = (e["step"], e["rank"])
        if key not in out or e["attempt"] >= out[key]["attempt"]:
            out[key] = e
    return out
