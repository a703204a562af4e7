"""Gated delta rule on a GPU: flash-linear-attention's kernel against longtrain's chunked reference.

For each case (sequence length, packed documents or not) both kernels of
``models.linear_attention.GatedDeltaCore`` run on the same bf16 inputs (q, k L2-normalised, log
decays from -softplus, betas from a sigmoid, as ``GatedDeltaNet`` makes them). Checked: the
outputs and the gradients of q, k, v, g, beta, each as max|fla - ref| / max|ref| against a bf16
tolerance (``--rtol``, default 2e-2); the reference computes in float32 from the same bf16
inputs, so the difference is fla's bf16 arithmetic. Timed: forward + backward of each, median of
``--reps`` runs after a warm-up, and the speed-up. One JSON record per case on stdout, a table
on stderr; exit 1 if any case is out of tolerance, 2 without CUDA or fla.

    python3 bench/check_gdn_kernel.py                       # 4K, 16K, 64K tokens, with and without documents
    python3 bench/check_gdn_kernel.py --seq 65536 262144 --heads 32 --head-dim 64 --reps 5

The reference's memory grows with chunks x heads x 64 x 64 (float32 decay matrices): at the
longest lengths time it with ``--skip-ref-above`` to keep only fla's timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # run as a script from anywhere: `import longtrain` finds the checkout

from longtrain.models.linear_attention import GatedDeltaCore, fla_available  # noqa: E402


def inputs(B: int, S: int, H: int, D: int, docs: bool, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    q = F.normalize(rnd(B, S, H, D), dim=-1).bfloat16()
    k = F.normalize(rnd(B, S, H, D), dim=-1).bfloat16()
    v = rnd(B, S, H, D).bfloat16()
    gate = -F.softplus(rnd(B, S, H) - 2.0)  # decays mostly near 1, as the layer's init makes them
    beta = torch.sigmoid(rnd(B, S, H)).bfloat16()
    doc_ids = None
    if docs:  # documents of 1/8 .. 1/2 of the row, boundaries not aligned to chunks
        cuts = sorted({int(S * f) + 7 for f in (0.13, 0.4, 0.55, 0.9)})
        doc_ids = torch.zeros(B, S, dtype=torch.long, device=device)
        for c in cuts:
            doc_ids[:, c:] += 1
    return [t.requires_grad_() for t in (q, k, v, gate, beta)], doc_ids


def run(core: GatedDeltaCore, xs, doc_ids, dout):
    for t in xs:
        t.grad = None
    out = core(*xs, doc_ids=doc_ids)
    out.backward(dout)
    return out.detach().float(), [t.grad.detach().float() for t in xs]


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rtol", type=float, default=2e-2)
    ap.add_argument("--skip-ref-above", type=int, default=1 << 18, help="time only fla past this length")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not fla_available():
        print("check_gdn_kernel: needs a CUDA device and flash-linear-attention "
              "(pip install flash-linear-attention)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    fla, ref = GatedDeltaCore("fla"), GatedDeltaCore("reference")
    bad = 0
    print(f"{'seq':>8} {'docs':>5} {'out err':>9} {'worst grad err':>20} {'fla ms':>8} {'ref ms':>8} {'x':>6}",
          file=sys.stderr)
    for S in args.seq:
        for docs in (False, True):
            xs, doc_ids = inputs(args.batch, S, args.heads, args.head_dim, docs, dev)
            dout = torch.randn_like(xs[2])
            rec = {"seq_len": S, "docs": docs, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__}
            o_fla, g_fla = run(fla, xs, doc_ids, dout)
            rec["fla_ms"] = 1e3 * timed(lambda: run(fla, xs, doc_ids, dout), args.reps)
            if S <= args.skip_ref_above:
                o_ref, g_ref = run(ref, xs, doc_ids, dout)
                rec["ref_ms"] = 1e3 * timed(lambda: run(ref, xs, doc_ids, dout), args.reps)
                rec["out_err"] = rel(o_fla, o_ref)
                rec["grad_err"] = {n: rel(a, b) for n, a, b in zip(("q", "k", "v", "g", "beta"), g_fla, g_ref)}
                worst = max(rec["grad_err"], key=rec["grad_err"].get)
                rec["ok"] = rec["out_err"] < args.rtol and rec["grad_err"][worst] < args.rtol
                bad += not rec["ok"]
                print(f"{S:>8} {str(docs):>5} {rec['out_err']:>9.2e} {worst + ' ' + format(rec['grad_err'][worst], '.2e'):>20} "
                      f"{rec['fla_ms']:>8.2f} {rec['ref_ms']:>8.2f} {rec['ref_ms'] / rec['fla_ms']:>6.1f}", file=sys.stderr)
            else:
                print(f"{S:>8} {str(docs):>5} {'-':>9} {'-':>20} {rec['fla_ms']:>8.2f} {'-':>8} {'-':>6}", file=sys.stderr)
            print(json.dumps(rec), flush=True)
            xs = doc_ids = dout = None  # free this case's tensors before the next
            torch.cuda.empty_cache()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
