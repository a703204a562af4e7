"""What a run reports: model FLOPs, MFU, throughput, and where the numbers go.

Owns: the peak rate MFU is measured against, and ``MetricsLogger`` which writes JSONL and
TensorBoard events and drives the progress bar on the main rank. The FLOP count of one token (the
common non-causal attention count that Megatron and torchtitan report, and the causal count,
half the attention term) is the model's own: ``longtrain.models.costs.flops_per_token``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


# Dense bf16 tensor-core peaks by device name (vendor datasheets, dense, no sparsity).
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}

_cpu_peak_cache: dict = {}


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """The rate MFU is measured against, and where it came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in GPU_PEAK_BF16.items():
            if key in name:
                return val, f"{name} dense bf16 datasheet"
        return 989e12, f"{name} (unknown; assumed H100 dense bf16)"
    if "cpu" not in _cpu_peak_cache:
        # No datasheet for an arbitrary CPU: time a float32 matmul (best of 3 short windows, so a
        # busy moment does not understate the peak and push MFU past 100%).
        n = 1024
        # its own generator: drawing from the global one would move the RNG state a resumed run
        # has just restored from its checkpoint
        a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
        torch.mm(a, a)
        best = 0.0
        for _ in range(3):
            t0, k = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.1:
                torch.mm(a, a)
                k += 1
            best = max(best, 2 * n ** 3 * k / (time.perf_counter() - t0))
        _cpu_peak_cache["cpu"] = best
    return _cpu_peak_cache["cpu"], "this CPU's measured fp32 matmul rate"


class MetricsLogger:
    """JSONL + TensorBoard on the main rank; a tqdm bar showing step, loss, tokens/s and MFU."""

    def __init__(self, run_dir: Path, cfg, is_main: bool, total_steps: int, start_step: int):
        self.is_main = is_main
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.logging.jsonl:
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                print("[longtrain] tensorboard is not installed; metrics go to metrics.jsonl only "
                      "(pip install 'longtrain[tensorboard]').")
        if cfg.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

    def log(self, step: int, metrics: dict, print_line: bool = False) -> None:
        if not self.is_main:
            return
        rec = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None and "loss" in metrics:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics.get('tokens_per_s', 0):.0f}",
                                 mfu=f"{100 * metrics.get('mfu', 0):.1f}%", refresh=False)
            self.bar.refresh()
        if print_line:
            line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
            (self.bar.write if self.bar is not None else print)(f"[longtrain] {line}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
