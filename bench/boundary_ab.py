"""Host time of one boundary step() (median over 300 windows of 4 micro-batches, GC off):
GPT-2-124M's 148 tensors at width 16 in bf16 (bench.MODELS["gpt2-124m-host"]), fp32
masters, max_grad_norm=1.0. Run two checkouts alternately, one process each, to compare:
    PYTHONPATH=<checkout> python bench/boundary_ab.py adamw|sgd cpu|reference|triton
"""

import gc
import sys
import time

import torch

from fusedaccum import FusedAccumulator, bench


def main(kind: str, backend: str, windows: int = 300, warmup: int = 10) -> float:
    torch.manual_seed(0)
    shapes = bench.MODELS["gpt2-124m-host"].shapes()
    params = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in shapes]
    inner = torch.optim.AdamW(params, lr=1e-3) if kind == "adamw" else \
        torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    opt = FusedAccumulator(inner, accumulation_steps=4, max_grad_norm=1.0, backend=backend)
    grads = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    times = []
    gc.disable()
    for w in range(warmup + windows):
        for i in range(4):
            loss = sum((p.float() * g.float()).sum() for p, g in zip(params, grads))
            loss.backward()
            t = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t
            if i == 3 and w >= warmup:
                times.append(dt)
            opt.zero_grad()
    gc.enable()
    times.sort()
    return times[len(times) // 2]


if __name__ == "__main__":
    print(f"{main(sys.argv[1], sys.argv[2]) * 1e6:.1f}")
