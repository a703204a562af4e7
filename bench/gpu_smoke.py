"""First look at a lent GPU: versions, attention kernels through longtrain's CoreAttention
(cuDNN / flash / flex, with and without GQA), and a bf16 Llama step. Prints a table.

    python3 bench/gpu_smoke.py
"""

import time

import torch

from longtrain.config import load_config
from longtrain.models import build_model
from longtrain.models.attention import CoreAttention


def bench(fn, iters=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main():
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    dev = "cuda"
    for S in (16384, 65536):
        for hkv in (32, 8):
            q = torch.randn(1, S, 32, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(1, S, hkv, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(1, S, hkv, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
            flops = 4 * S * S * 32 * 128 / 2 * 3.5  # causal fwd + bwd (2.5x fwd)
            for be in ("sdpa_cudnn", "sdpa_flash", "flex"):
                core = CoreAttention(be)

                def step():
                    out = core(q, k, v)
                    out.sum().backward()

                try:
                    dt = bench(step)
                    print(f"attn S={S} kv={hkv} {be:11s} {dt*1e3:8.2f} ms  {flops/dt/1e12:6.1f} TFLOP/s", flush=True)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"attn S={S} kv={hkv} {be:11s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            del q, k, v
    # document masks through flex
    S = 32768
    q = torch.randn(1, S, 32, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, S, 8, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, S, 8, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    doc = (torch.arange(S, device=dev) // 4096)[None]
    core = CoreAttention("auto")
    dt = bench(lambda: core(q, k, v, doc).sum().backward())
    print(f"attn docs S={S} auto(flex) {dt*1e3:.2f} ms", flush=True)
    cfg = load_config("llama3.2-1b", ["data.seq_len=16384", "model.n_layers=4"])
    m = build_model(cfg.model).cuda()
    x = torch.randint(0, 1000, (1, 16384), device=dev)
    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = m(x, labels=x)
        loss.backward()
    dt = bench(step, 3)
    print(f"llama-1b 4 layers S=16384 step {dt*1e3:.1f} ms peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
