"""Long-context evaluation: loss by position, passkey retrieval and loss against loop count.

Owns: ``long_context_eval(model, dims, cfg, step)`` (what ``longtrain eval`` and, with
``eval.every_eval``, the training loop call on a live, parallelised model),
``evaluate_checkpoint`` (a checkpoint or run directory -> model from the run's saved config ->
results) and ``write_results`` (JSON, TensorBoard scalars, PNG plots through ``trainer.plots``).

What is measured, and the idea behind each:

- **Loss by position.** Mean token loss in log2 buckets of the token's position ([0], [1],
  [2, 4), [4, 8), ...) on the held-out split the loader already has. Positions are the batch's
  ``position_ids`` -- the position inside the document under ``data.doc_masking`` -- so a bucket is
  "tokens that had this much context": a curve that keeps falling says far tokens use far context.
- **Passkey retrieval.** A 5-digit key sits at a depth (0 = start, 1 = just before the question)
  inside filler cut from the held-out documents, followed by "What is the pass key? The pass key
  is " and the key. Scored teacher-forced: a prompt counts as retrieved when the argmax of the
  logits at every key position is the key's next token. That is exactly "greedy decoding writes
  the key" (each greedy step sees the same prefix as the teacher-forced one while all earlier
  digits are right) at the cost of one forward pass. The grid is length x depth, averaged over
  ``eval.passkey_trials`` keys; ``digit_accuracy`` (the share of right key tokens) moves before
  the all-or-nothing accuracy does.
- **Loss against loop count** (``model.arch=looped``). The same held-out batches at loop counts
  1 .. ``loops_max`` and past it, the test-time-compute curve. Past ``loops_max`` needs a model
  without per-loop tables (``model.lora_rank=0``, ``model.hyper_streams=1``); the evaluated model is then built with
  ``loops_max`` raised (no weight depends on it).

Layouts: every rank runs the same forwards (FSDP and tensor parallel gather inside them); each
data-parallel rank reads its own held-out batches and owns every ``dp``-th passkey prompt, each
sequence-parallel rank scores its slice of the sequence, and the sums are reduced over (dp, sp).
Pipeline parallelism is not supported here: checkpoints reshard, so evaluate with
``parallel.pp=1``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from longtrain.config import Config, ConfigError
from longtrain.data.loader import build_loader, open_documents
from longtrain.data.sampler import split_documents
from longtrain.data.tokenizer import load_tokenizer
from longtrain.data.validate import check_vocab
from longtrain.memory.planner import resolve_policy
from longtrain.models import build_model
from longtrain.models.llama import IGNORE_INDEX
from longtrain.parallel.mesh import init_distributed
from longtrain.parallel.parallelize import parallelize
from longtrain.parallel.reduce import all_reduce_sum
from longtrain.trainer.checkpoint import Checkpointer
from longtrain.trainer.checkpoint_format import CheckpointError, read_config, read_meta, resolve_checkpoint_path
from longtrain.trainer.plots import PlotsUnavailable, save_plots  # matplotlib itself is imported on use
from longtrain.trainer.step import _autocast, model_kwargs

PASSKEY_DIGITS = 5


# --------------------------------------------------------------------------------------------
# Loss by position
# --------------------------------------------------------------------------------------------


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each log2 bucket covering positions 0 .. seq_len-1: [0,1), [1,2), [2,4), ..."""
    out, lo = [(0, 1)], 1
    while lo < seq_len:
        out.append((lo, min(2 * lo, seq_len)))
        lo *= 2
    return out


def bucket_of(positions: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Bucket index of each position (0 -> 0, p >= 1 -> floor(log2 p) + 1), clamped to the last."""
    p = positions.to(torch.int64).clamp(min=0)
    idx = torch.where(p > 0, torch.floor(torch.log2(p.clamp(min=1).double())).long() + 1, torch.zeros_like(p))
    return idx.clamp(max=n_buckets - 1)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-token cross-entropy [B, S] in fp32 (0 where the label is ignored), ``chunk`` positions at
    a time, so only that many rows of logits are ever upcast (the logits themselves are the model's
    output, [B, S, vocab] in the compute dtype)."""
    labels = labels.to(logits.device)
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for b in range(logits.shape[0]):
        for s in range(0, logits.shape[1], chunk):
            out[b, s:s + chunk] = F.cross_entropy(logits[b, s:s + chunk].float(), labels[b, s:s + chunk],
                                                  ignore_index=IGNORE_INDEX, reduction="none")
    return out


@torch.no_grad()
def loss_by_position(model, batches: list[dict], dims, cfg: Config, n_loops: Optional[int] = None) -> dict:
    """``{"loss", "tokens", "buckets": [{"lo", "hi", "loss", "tokens"}]}`` over ``batches`` (this
    rank's slices), summed over the dp and sp ranks."""
    buckets = position_buckets(cfg.data.seq_len)
    n = len(buckets)
    sums = torch.zeros(n, dtype=torch.float64, device=dims.device)
    counts = torch.zeros(n, dtype=torch.float64, device=dims.device)
    extra = {"n_loops": n_loops} if n_loops is not None else {}
    for batch in batches:
        with _autocast(cfg, dims.device):
            logits = model(**model_kwargs(batch, dims.device), **extra)
        labels = batch["labels"].to(dims.device)
        loss = token_losses(logits, labels).double()
        keep = labels != IGNORE_INDEX
        idx = bucket_of(batch["position_ids"].to(dims.device), n)[keep]
        sums.index_add_(0, idx, loss[keep])
        counts.index_add_(0, idx, torch.ones_like(loss[keep]))
    sums, counts = all_reduce_sum(sums, dims), all_reduce_sum(counts, dims)
    rows = [{"lo": lo, "hi": hi, "tokens": int(c), "loss": (float(s / c) if c > 0 else None)}
            for (lo, hi), s, c in zip(buckets, sums.tolist(), counts.tolist())]
    total = float(counts.sum())
    return {"loss": float(sums.sum()) / total if total else None, "tokens": int(total), "buckets": rows}


# --------------------------------------------------------------------------------------------
# Passkey retrieval
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PasskeyPrompt:
    tokens: np.ndarray  # int64 [length]: filler, the key sentence at ``depth``, the question, the key
    labels: np.ndarray  # int64 [length]: the key's tokens where they are predicted, IGNORE_INDEX elsewhere
    key: str
    depth: float


def _prompt_parts(tok, key: str) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """(head, needle, question, answer) token arrays of the passkey prompt for ``key``."""
    needle = tok.encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
    question = tok.encode("\nWhat is the pass key? The pass key is ")
    head = [np.array([tok.bos_id])] if tok.bos_id is not None else []
    return head, needle, question, tok.encode(key)


def passkey_overhead(tok) -> int:
    """Tokens of a passkey prompt without filler: the shortest usable prompt length."""
    head, needle, question, answer = _prompt_parts(tok, "0" * PASSKEY_DIGITS)
    return sum(len(x) for x in [*head, needle, question, answer])


def passkey_prompt(tok, filler: np.ndarray, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A ``length``-token prompt hiding ``key`` at ``depth`` of ``filler`` (tokens, reused as needed)."""
    head, needle, question, answer = _prompt_parts(tok, key)
    fixed = sum(len(x) for x in head) + len(needle) + len(question) + len(answer)
    n_fill = length - fixed
    if n_fill < 0:
        raise ConfigError(f"eval.passkey_lengths: {length} tokens cannot hold the passkey prompt ({fixed} tokens "
                          f"without filler); use lengths of at least {fixed}.")
    fill = np.resize(filler, n_fill) if len(filler) else np.zeros(n_fill, np.int64)
    cut = int(round(depth * n_fill))
    tokens = np.concatenate([*head, fill[:cut], needle, fill[cut:], question, answer]).astype(np.int64)
    labels = np.full(length, IGNORE_INDEX, np.int64)
    labels[length - len(answer) - 1:length - 1] = answer  # the logits at p predict token p + 1
    return PasskeyPrompt(tokens, labels, key, depth)


def key_token_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: key tokens whose argmax prediction is right, and key tokens (labels != IGNORE)."""
    mask = labels != IGNORE_INDEX
    hits = (logits.argmax(dim=-1) == labels) & mask
    return hits.sum(dim=1), mask.sum(dim=1)


def default_passkey_lengths(seq_len: int, sp: int, shortest: int) -> list[int]:
    """seq_len / 8, / 4, / 2 and seq_len, multiples of ``sp`` of at least ``shortest`` tokens
    (seq_len alone when none of the others is), shortest first."""
    out = sorted({(seq_len // d) // sp * sp for d in (8, 4, 2)} | {seq_len})
    return [L for L in out if L >= shortest] or [seq_len]


def held_out_filler(cfg: Config, tok, max_tokens: int) -> np.ndarray:
    """Up to ``max_tokens`` tokens of the held-out documents (special tokens dropped), in order."""

    docs, _ = open_documents(cfg.data, cfg.model.vocab_size)
    special = [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None]
    parts, n = [], 0
    for i in split_documents(docs.lengths, cfg.data.eval_fraction)["eval"]:
        ids = np.asarray(docs.get(int(i)), dtype=np.int64)
        ids = ids[~np.isin(ids, special)]
        parts.append(ids)
        n += len(ids)
        if n >= max_tokens:
            break
    return np.concatenate(parts)[:max_tokens] if parts else np.zeros(0, np.int64)


@torch.no_grad()
def passkey_grid(model, dims, cfg: Config, n_loops: Optional[int] = None) -> dict:
    """Accuracy and digit accuracy per (length, depth): ``{"lengths", "depths", "accuracy", ...}``."""

    ev = cfg.eval
    tok = load_tokenizer(cfg.data.tokenizer)  # the keys and the question are text
    check_vocab(tok.vocab_size, cfg.model.vocab_size, cfg.data.tokenizer)
    lengths = ([int(x) for x in ev.passkey_lengths]
               or default_passkey_lengths(cfg.data.seq_len, dims.sp_size, passkey_overhead(tok)))
    depths = [float(d) for d in ev.passkey_depths]
    filler = held_out_filler(cfg, tok, max(lengths) * 2)
    rng = np.random.default_rng(cfg.schedule.seed + 20251)
    extra = {"n_loops": n_loops} if n_loops is not None else {}
    acc, digit = [], []
    for L in lengths:
        prompts = []
        for d in depths:
            for _ in range(ev.passkey_trials):
                key = "".join(str(x) for x in rng.integers(0, 10, PASSKEY_DIGITS))
                start = int(rng.integers(0, max(1, len(filler) - L)))
                prompts.append(passkey_prompt(tok, filler[start:], L, d, key))
        hits, n_key = _score_prompts(model, prompts, dims, cfg, extra)
        right = (hits == n_key).double().view(len(depths), -1)
        acc.append(right.mean(dim=1).tolist())
        digit.append((hits / n_key.clamp(min=1)).view(len(depths), -1).mean(dim=1).tolist())
    return {"lengths": lengths, "depths": depths, "trials": ev.passkey_trials, "accuracy": acc,
            "digit_accuracy": digit}


def _score_prompts(model, prompts: list[PasskeyPrompt], dims, cfg: Config, extra: dict):
    """(hits, key tokens) per prompt, summed over ranks. Data-parallel rank r scores prompts
    r, r + dp, ...; every rank runs the same number of forwards (FSDP gathers inside them), the
    last ones on a repeated prompt that is not counted."""
    dp, r = dims.dp_size, dims.dp_rank
    lo = dims.sp_rank * (len(prompts[0].tokens) // dims.sp_size)
    hi = lo + len(prompts[0].tokens) // dims.sp_size
    mine = list(range(r, len(prompts), dp))
    n_mine, rounds = len(mine), math.ceil(len(prompts) / dp)
    mine += [mine[-1] if mine else 0] * (rounds - n_mine)
    hits = torch.zeros(len(prompts), dtype=torch.float64, device=dims.device)
    n_key = torch.zeros(len(prompts), dtype=torch.float64, device=dims.device)
    bs = cfg.data.batch_size
    for start in range(0, rounds, bs):
        idx = mine[start:start + bs]
        tokens = torch.from_numpy(np.stack([prompts[i].tokens for i in idx]))
        labels = torch.from_numpy(np.stack([prompts[i].labels for i in idx]))
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        batch = {"tokens": tokens[:, lo:hi], "position_ids": positions[:, lo:hi]}
        if cfg.data.doc_masking:  # one document: the loader's contract, every token in document 0
            batch["doc_ids"] = torch.zeros_like(batch["tokens"], dtype=torch.int32)
        with _autocast(cfg, dims.device):
            logits = model(**model_kwargs(batch, dims.device), **extra)
        h, n = key_token_hits(logits, labels[:, lo:hi].to(dims.device))
        for k, i in enumerate(idx):
            if start + k < n_mine:
                hits[i] += h[k].double()
                n_key[i] += n[k].double()
    return all_reduce_sum(hits, dims), all_reduce_sum(n_key, dims)


# --------------------------------------------------------------------------------------------
# The whole evaluation on a live model
# --------------------------------------------------------------------------------------------


def check_eval_settings(cfg: Config) -> None:
    """The ``eval.*`` values that need no model or data, checked before anything is loaded."""
    ev, sp = cfg.eval, cfg.parallel.sp
    for L in ev.passkey_lengths:
        if not isinstance(L, int) or L <= 0 or L % sp:
            raise ConfigError(f"eval.passkey_lengths entry {L!r} must be a positive whole number of tokens divisible "
                              f"by parallel.sp={sp}; e.g. eval.passkey_lengths=[{4096 * sp},{8192 * sp}].")
        if L > cfg.model.max_seq_len:
            raise ConfigError(f"eval.passkey_lengths entry {L} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
                              f"raise model.max_seq_len (and the rotary scaling, for a longer context).")
    if not ev.passkey_depths or any(not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in ev.passkey_depths):
        raise ConfigError(f"eval.passkey_depths={ev.passkey_depths} must be fractions in [0, 1] (0 = the key at the "
                          f"start of the filler, 1 = at its end), e.g. [0, 0.5, 1].")
    if cfg.model.arch == "looped":
        requested_loops(cfg)


def per_loop_tables(m) -> str:
    """The looped model's weights indexed by iteration up to ``loops_max`` ("" when none): they
    fix the largest loop count a checkpoint can run."""
    return ", ".join(t for t, on in (("model.lora_rank > 0", m.lora_rank > 0),
                                     ("model.hyper_streams > 1", m.hyper_streams > 1)) if on)


def requested_loops(cfg: Config) -> list[int]:
    """``eval.loops``, or 1 .. ``model.loops_max + eval.loops_past``."""
    want = list(cfg.eval.loops) or list(range(1, cfg.model.loops_max + cfg.eval.loops_past + 1))
    if any(not isinstance(n, int) or n < 1 for n in want):
        raise ConfigError(f"eval.loops={want} must hold loop counts >= 1.")
    return sorted(set(want))


def loop_counts(cfg: Config, model_loops_max: int) -> list[int]:
    """The requested loop counts the model accepts (at most ``model_loops_max``)."""
    return [n for n in requested_loops(cfg) if n <= model_loops_max]


def held_out_batches(cfg: Config, dims) -> list[dict]:
    """``eval.batches`` held-out micro-batches of this rank (the same ones at every call)."""

    loader = build_loader(cfg.data, split="eval", vocab_size=cfg.model.vocab_size, dp_rank=dims.dp_rank,
                          dp_size=dims.dp_size, sp_rank=dims.sp_rank, sp_size=dims.sp_size)
    return [next(loader) for _ in range(cfg.eval.batches)]


@torch.no_grad()
def long_context_eval(model, dims, cfg: Config, step: int, model_loops_max: Optional[int] = None) -> dict:
    """Loss by position, the passkey grid and (looped) loss against loop count for a live model.

    Every rank calls it; every rank gets the same result. ``model_loops_max`` is the largest loop
    count the model accepts (default ``model.loops_max``)."""
    if dims.pp > 1:
        raise ConfigError(f"long-context evaluation does not run under parallel.pp={dims.pp}; evaluate the "
                          f"checkpoint with parallel.pp=1 (checkpoints reshard to any layout).")
    check_eval_settings(cfg)
    was_training = model.training
    model.eval()
    try:
        batches = held_out_batches(cfg, dims)
        out: dict = {"step": int(step), "seq_len": cfg.data.seq_len, "arch": cfg.model.arch,
                     "layout": {k: int(getattr(dims, k)) for k in ("dp_replicate", "dp_shard", "sp", "tp", "pp")}}
        looped = cfg.model.arch == "looped"
        out["loss_by_position"] = loss_by_position(model, batches, dims, cfg, cfg.model.loops if looped else None)
        out["passkey"] = passkey_grid(model, dims, cfg, cfg.model.loops if looped else None)
        if looped:
            counts = loop_counts(cfg, model_loops_max or cfg.model.loops_max)
            out.update(loops=cfg.model.loops, loops_max=cfg.model.loops_max)
            out["loss_vs_loops"] = [{"loops": n, "loss": loss_by_position(model, batches, dims, cfg, n)["loss"]}
                                    for n in counts]
            if max(counts, default=0) < max(requested_loops(cfg)):
                out["loops_note"] = ("no loop counts past model.loops_max: "
                                     + (f"the model has per-loop tables up to it ({per_loop_tables(cfg.model)})"
                                        if per_loop_tables(cfg.model) else "not during training (run `longtrain eval`)"))
    finally:
        model.train(was_training)
    return out


def evaluate_in_training(model, dims, cfg: Config, step: int, run_dir: Path) -> dict:
    """The ``eval.every_eval`` hook of the training loop: evaluate and write on the main rank."""
    result = long_context_eval(model, dims, cfg, step)
    if dims.is_main:
        write_results(result, Path(run_dir), plots=cfg.eval.plots, tensorboard=cfg.logging.tensorboard)
    return result


# --------------------------------------------------------------------------------------------
# Where the results go
# --------------------------------------------------------------------------------------------


def write_results(result: dict, run_dir: Path, plots: bool = True, tensorboard: bool = True,
                  out_dir: Optional[Path] = None) -> dict[str, list[str]]:
    """``<out_dir>/step-N.json`` (default ``<run_dir>/eval``), TensorBoard scalars under
    ``<run_dir>/tb`` and PNG plots; returns the paths written and any notes."""
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"step-{result['step']}"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    written, notes = [str(path)], []
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            notes.append("tensorboard is not installed; no TensorBoard scalars (pip install 'longtrain[tensorboard]')")
        else:
            with SummaryWriter(str(Path(run_dir) / "tb")) as tb:
                for name, value in scalars(result).items():
                    tb.add_scalar(name, value, result["step"])
            written.append(str(Path(run_dir) / "tb"))
    if plots:
        try:
            written += [str(p) for p in save_plots(result, out_dir, stem)]
        except PlotsUnavailable as e:
            notes.append(str(e))
    return {"written": written, "notes": notes}


def scalars(result: dict) -> dict[str, float]:
    """The TensorBoard view of a result: one scalar per bucket, passkey length and loop count."""
    out = {}
    for b in result["loss_by_position"]["buckets"]:
        if b["loss"] is not None:
            out[f"eval_position/loss_pos{b['lo']:08d}"] = b["loss"]
    pk = result["passkey"]
    for L, row in zip(pk["lengths"], pk["accuracy"]):
        out[f"eval_passkey/accuracy_len{L:08d}"] = float(np.mean(row))
    for r in result.get("loss_vs_loops", []):
        out[f"eval_loops/loss_loops{r['loops']:03d}"] = r["loss"]
    return out


def summary_lines(result: dict) -> list[str]:
    """A few printed lines: the loss by bucket, passkey accuracy by length, loss by loop count."""
    lp = result["loss_by_position"]
    lines = [f"step {result['step']}: held-out loss {lp['loss']:.4f} over {lp['tokens']} tokens; by position:"
             if lp["loss"] is not None else f"step {result['step']}: no held-out tokens"]
    lines.append("  " + "  ".join(f"[{b['lo']},{b['hi']}) {b['loss']:.3f}" for b in lp["buckets"] if b["loss"] is not None))
    pk = result["passkey"]
    lines.append("passkey accuracy by length (mean over depths): " + "  ".join(
        f"{L}: {np.mean(a):.2f}" for L, a in zip(pk["lengths"], pk["accuracy"])))
    if "loss_vs_loops" in result:
        lines.append("loss by loop count: " + "  ".join(f"{r['loops']}: {r['loss']:.4f}" for r in result["loss_vs_loops"]))
    return lines


# --------------------------------------------------------------------------------------------
# From a checkpoint
# --------------------------------------------------------------------------------------------


def locate_checkpoint(target: str) -> tuple[Path, Path]:
    """(step directory, run directory) for a run directory, a checkpoint directory or a step directory."""

    p = Path(target)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; give a run directory (runs/<name>, written by `longtrain "
                              f"train`) or a checkpoint (runs/<name>/checkpoints or .../checkpoints/step-N).")
    if (p / "config.yaml").is_file() and not (p / ".metadata").exists():  # a run directory
        saved = read_config(p)
        root = Path(saved.get("checkpoint", {}).get("dir") or p / "checkpoints")
        if not root.is_dir():
            raise CheckpointError(f"run directory {p} has no checkpoints ({root} does not exist); train with "
                                  f"checkpoint.save_final=true (the default) or give the checkpoint's path.")
        return resolve_checkpoint_path(root), p
    ckpt = resolve_checkpoint_path(p)
    return ckpt, (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)


# the training layout is not the evaluation's: checkpoints reshard, so evaluation starts from one
# process (or data parallel over what --nproc starts) and takes the layout given on its command line
SINGLE_PROCESS_LAYOUT = ["parallel.dp_replicate=1", "parallel.dp_shard=-1", "parallel.tp=1", "parallel.sp=1",
                         "parallel.pp=1", "parallel.pp_boundaries=null"]


def eval_overrides(target: str, overrides: list[str]) -> tuple[str, list[str]]:
    """The saved config of ``target``'s checkpoint and the overrides that make a worker evaluate it
    (``evaluate_worker``): a one-process layout, the user's, then the checkpoint and run directory."""
    ckpt, run_dir = locate_checkpoint(target)
    return str(ckpt / "config.yaml"), [*SINGLE_PROCESS_LAYOUT, *overrides, f"checkpoint.resume={ckpt.resolve()}",
                                       f"logging.run_dir={run_dir.resolve()}"]


def evaluate_worker(cfg: Config) -> dict:
    """``launch.entry`` for evaluation: evaluate the checkpoint ``checkpoint.resume`` names (``auto``:
    the newest under the run's checkpoint directory) in this process's place of the layout, write
    ``<run_dir>/eval/step-N.json`` and the plots on rank 0; returns the result."""

    check_eval_settings(cfg)
    mode = cfg.checkpoint.resume
    if mode == "none":
        raise CheckpointError("checkpoint.resume=none names no checkpoint to evaluate; set it to a checkpoint "
                              "path, or to auto for the newest in the run's checkpoint directory.")
    root = cfg.checkpoint.dir or cfg.run_dir / "checkpoints"
    ckpt = resolve_checkpoint_path(root if mode == "auto" else mode)
    if cfg.parallel.pp > 1:
        raise ConfigError(f"longtrain eval does not run under parallel.pp={cfg.parallel.pp}; use parallel.pp=1 "
                          f"(checkpoints reshard to any layout; parallel.sp and parallel.tp work).")
    dims = init_distributed(cfg)
    if cfg.memory.policy == "auto":

        cfg = resolve_policy(cfg, dims)
    model_cfg = cfg.model
    if cfg.model.arch == "looped" and not per_loop_tables(cfg.model):  # no weight depends on loops_max
        model_cfg = dataclasses.replace(cfg.model, loops_max=max(cfg.model.loops_max, *requested_loops(cfg)))
    with torch.device(dims.device):
        model = build_model(model_cfg)
    model = parallelize(model, dims, cfg)
    try:
        Checkpointer(cfg, dims, cfg.run_dir, model=model).load(ckpt, restore_data=False)  # weights only
        step = int(read_meta(ckpt).get("step", 0))
        if dims.is_main:
            print(f"[longtrain] evaluating step {step} at data.seq_len={cfg.data.seq_len}; {dims.describe()}",
                  flush=True)
        result = long_context_eval(model, dims, cfg, step, model_cfg.loops_max)
    finally:
        if dims.watchdog is not None:
            dims.watchdog.stop()
    result["checkpoint"] = str(ckpt)
    if dims.is_main:
        info = write_results(result, cfg.run_dir, plots=cfg.eval.plots, tensorboard=cfg.logging.tensorboard)
        for line in summary_lines(result):
            print(f"[longtrain] {line}")
        for note in info["notes"]:
            print(f"[longtrain] note: {note}")
        print(f"[longtrain] eval written: {', '.join(info['written'])}", flush=True)
    return {"step": result["step"], "loss": result["loss_by_position"]["loss"], "run_dir": str(cfg.run_dir)}
