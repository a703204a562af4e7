"""One transformer block's forward + backward on a GPU, with and without the stability options.

Times ``models.llama.Block`` alone (bf16 weights under bf16 autocast, as FSDP2 on one rank runs
them) for the plain block and for ``model.norm_placement=peri model.qk_norm=true``, prints the
median of 5 runs and the peak memory of each, the dtype a norm returns under CUDA autocast, and
the profiler's kernel table for the options' block: where the options' cost goes, without a whole
training step.

    python3 bench/block_cost.py                      # llama3.2-1b's block at 65,536 tokens
    python3 bench/block_cost.py --config llama3-8b --seq-len 32768
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # run as a script from anywhere: `import longtrain` finds the checkout

from longtrain.config import load_config  # noqa: E402
from longtrain.models.llama import Block  # noqa: E402
from longtrain.models.rope import Rotary  # noqa: E402

OPTIONS = ["model.norm_placement=peri", "model.qk_norm=true"]


def block_cost(config: str, overrides: list[str], seq_len: int, profile: bool) -> None:
    cfg = load_config(config, overrides).model
    block = Block(cfg).cuda().bfloat16()
    rotary = Rotary(cfg.dim // cfg.n_heads, cfg.rope_theta).cuda()
    cos, sin = rotary(torch.arange(seq_len, device="cuda")[None])
    x = torch.randn(1, seq_len, cfg.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x, cos, sin)
        y.float().square().mean().backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(f"{' '.join(overrides) or 'plain'}: {statistics.median(times) * 1e3:.1f} ms per block fwd+bwd, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
    if profile:
        from torch.profiler import ProfilerActivity, profile as run_profile

        with run_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="llama3.2-1b")
    ap.add_argument("--seq-len", type=int, default=65536)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("block_cost: needs a CUDA device", file=sys.stderr)
        return 2
    x = torch.randn(2, 8, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        print("under CUDA autocast nn.RMSNorm(bf16 input) returns", nn.RMSNorm(8).cuda().bfloat16()(x).dtype)
    block_cost(args.config, [], args.seq_len, profile=False)
    block_cost(args.config, OPTIONS, args.seq_len, profile=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
