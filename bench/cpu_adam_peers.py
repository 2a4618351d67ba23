"""The CPU AdamW step on fp32 params against its peers, in GB/s (issue #4's comparison).

    python bench/cpu_adam_peers.py [--sizes 4M,16M,64M] [--rounds 15] [--out DIR]

Each contender steps one fp32 param of n elements with its gradient, AdamW with the
benchmark's hyper-parameters; bytes counted per element are what the step must move:

* `fusedaccum cpu, zero_acc`   the wrapper's step on fp32 params: read acc, param, m, v;
                               write param, m, v; zero acc = 32 B
* `fusedaccum cpu, keep acc`   the same without zeroing acc = 28 B (like for like)
* `DeepSpeedCPUAdam`           `DeepSpeedCPUAdam(adamw_mode=True).step()`: read grad,
                               param, m, v; write param, m, v = 28 B (when deepspeed imports)
* `torch AdamW(fused=True)`    the same 28 B

The contenders run in rounds, shuffled afresh each round (seeded); every buffer is at
least 4M fp32 elements (16 MiB), and the working set of one call (112 MiB and more) is
several times the last-level cache. Reported: median time, GB/s, and each contender's
GB/s relative to DeepSpeedCPUAdam's (or torch's when deepspeed is missing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import time

import torch

from fusedaccum import bench
from fusedaccum.ops import native

LR, BETAS, EPS, WD = bench.LR, bench.BETAS, bench.EPS, bench.WEIGHT_DECAY


def contenders(n: int, seed: int = 0):
    """[(name, bytes per element, zero-argument step)] for params of n elements."""
    g = torch.Generator().manual_seed(seed)

    def rand(scale):
        return torch.randn(n, generator=g) * scale

    out = []
    for name, zero in (("fusedaccum cpu, zero_acc", True), ("fusedaccum cpu, keep acc", False)):
        p, acc, m, v = rand(0.05), rand(1e-2), rand(1e-3), rand(1e-3).abs()
        gm, fi = torch.tensor(1.0), torch.tensor(0.0)

        def step(p=p, acc=acc, m=m, v=v, gm=gm, fi=fi, zero=zero):
            native.adamw_step_(p, acc, m, v, None, None, grad_mult=gm, found_inf=fi, lr=LR,
                               beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD,
                               step=10, zero_acc=zero)

        out.append((name, 32 if zero else 28, step))

    def param():
        t = torch.nn.Parameter(rand(0.05))
        t.grad = rand(1e-2)
        return t

    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as exc:  # noqa: BLE001 - not installed, or its build failed
        print(f"DeepSpeedCPUAdam not timed: {type(exc).__name__}: {exc}", file=sys.stderr)
    else:
        ds = DeepSpeedCPUAdam([param()], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                              adamw_mode=True)
        out.append(("DeepSpeedCPUAdam", 28, ds.step))
    tf = torch.optim.AdamW([param()], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    out.append(("torch AdamW(fused=True)", 28, tf.step))
    return out


def measure(n: int, rounds: int, seed: int = 0):
    cs = contenders(n, seed)
    times = {name: [] for name, _, _ in cs}
    rng = random.Random(seed)
    for r in range(rounds + 2):  # two warm-up rounds
        order = list(cs)
        rng.shuffle(order)
        for name, _, fn in order:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= 2:
                times[name].append(dt)
    return [(name, nbytes, statistics.median(times[name])) for name, nbytes, _ in cs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4M,16M,64M")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None, help="directory for <device>_<date>_adam_peers.md")
    args = ap.parse_args(argv)
    sizes = bench.parse_sizes(args.sizes)
    if min(sizes) < 4 << 20:
        ap.error("sizes below 4M fit in the cache; this comparison is about streaming")
    dev = torch.device("cpu")
    lines = [
        "# CPU AdamW step on fp32 params: fusedaccum against its peers",
        "",
        f"- device: {bench.device_name(dev)} ({torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} cores), torch {torch.__version__}",
        f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M}",
        f"- command: `python bench/cpu_adam_peers.py {' '.join(argv or sys.argv[1:])}`".rstrip(),
        f"- {args.rounds} rounds per size, contenders shuffled each round; medians",
        "",
        "| size | contender | B/elt | median | GB/s | GB/s vs reference peer |",
        "|---|---|---|---|---|---|",
    ]
    for n in sizes:
        res = measure(n, args.rounds)
        gbps = {name: nb * n / t / 1e9 for name, nb, t in res}
        ref = "DeepSpeedCPUAdam" if "DeepSpeedCPUAdam" in gbps else "torch AdamW(fused=True)"
        for name, nb, t in res:
            lines.append(f"| {bench.fmt_size(n)} | {name} | {nb} | {bench.fmt_time(t)} | "
                         f"{gbps[name]:.1f} | {gbps[name] / gbps[ref]:.2f}x {ref} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{bench.sanitize(bench.device_name(dev))}_"
                                      f"{datetime.date.today()}_adam_peers.md")
        with open(path, "w") as fh:
            fh.write(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
