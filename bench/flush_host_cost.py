"""The host time of the triton backend's batch flushes, on a CPU with the kernels stubbed out.

    python bench/flush_host_cost.py [--model gpt2-124m/4] [--rounds 40] [--flush-mib 2]

On the H100 (2026-11-26) a Python flush of a ~28-gradient batch cost 45-50 us of host time
alone but about 200 us inside a gpt2-124m window (bench/results/NVIDIA-H100-80GB-HBM3_
2026-11-26_phases.md). This script shows the same gap on a CPU and what the C++ hook's
table flush (csrc/hooks.cpp; accumulator.py _TABLE_FLUSH) does to it. Triton's
interpreter would take seconds per kernel here, so every Triton kernel launch is replaced
by a no-op: what is timed is the host work around the launches (table, bookkeeping,
Python), not the accumulation.

1. One accumulate_many_ call over 28 pairs, the Python flush's op: warm (the same call
   back to back) and after sweeping 64 MiB of memory before each call, as a backward's
   traffic evicts the caches between two flushes.
2. The k backward passes of a window on the benchmark's harness (fusedaccum/bench.py,
   clipping norm not riding, as on GPUs), the triton backend with the C++ hook flushing
   full batches (table) and with them flushed in Python (python-flush), in shuffled
   rounds. The rest of each backward (autograd, the harness's gradient copies) is the
   same in both. The default list is the benchmark's CPU one (gpt2-124m at a quarter
   width, 2 MiB batches): on the full gpt2-124m list this CPU's backward is ~150 ms of
   memory traffic (the harness's gradient copies) that drifts by more than the flushes
   cost.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # (before triton is imported)

import torch  # noqa: E402

from fusedaccum import bench  # noqa: E402
from fusedaccum.ops import native  # noqa: E402
from fusedaccum.ops import triton as tri  # noqa: E402


@contextlib.contextmanager
def stubbed(flush_bytes: int):
    """Triton's launches replaced by no-ops and the batch flush size set; put back after."""
    stubs = {"_launch_many_kernel": lambda *args: None,
             "_launch_accumulate": lambda *args, **kwargs: None,
             "_launch_adamw": lambda *args, **kwargs: None,
             "_launch_grad_norm": lambda tensors, norm, wrap=None: torch.zeros(())}
    saved = {name: getattr(tri, name) for name in stubs}
    try:
        for name, fn in stubs.items():
            setattr(tri, name, fn)
        with bench.hook_settings(flush_bytes=flush_bytes):
            yield
    finally:
        for name, fn in saved.items():
            setattr(tri, name, fn)


def one_call(rounds: int = 200) -> tuple[float, float]:
    """Median us of accumulate_many_ over 28 pairs: warm, and after a 64 MiB sweep."""
    accs = [torch.zeros(50_000) for _ in range(28)]
    grads = [torch.zeros(50_000, dtype=torch.bfloat16) for _ in range(28)]
    src = torch.ones(64 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    out = []
    for sweep in (False, True):
        times = []
        for _ in range(rounds):
            if sweep:
                dst.copy_(src)
            t0 = time.perf_counter()
            tri.accumulate_many_(accs, grads, 1.0, trusted=True)
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times) * 1e6)
    return out[0], out[1]


def windows(model: str, rounds: int) -> dict[str, tuple[float, float]]:
    """Median ms of a window's k backward passes and flushes per window, per contender."""
    wl = bench.Workload(bench.MODELS[model], torch.device("cpu"), torch.bfloat16)
    contenders = {}
    for name, table in (("table flush (C++ hook)", True), ("python-flush", False)):
        with bench.hook_settings(table_flush=table):
            c = bench.FusedContender(wl, "triton")
        for b in c.opt._all_buckets():
            b.ride_norm = False  # as on GPUs: the Python flush then makes no statistic
        contenders[name] = c
    times = {name: [] for name in contenders}
    flushes = {name: [] for name in contenders}
    rng = random.Random(0)
    with bench.gc_paused():
        for r in range(rounds + 2):
            order = list(contenders)
            rng.shuffle(order)
            for name in order:
                c, spent = contenders[name], 0.0
                before = native.hooks_module().batch_hook_flushes()[0]
                for _ in range(wl.k):
                    t0 = time.perf_counter()
                    bench._backward(c.params, wl.grads)
                    spent += time.perf_counter() - t0
                    c.opt.step()
                    c.opt.zero_grad()
                if r >= 2:  # (two warm-up rounds)
                    times[name].append(spent)
                    flushes[name].append(native.hooks_module().batch_hook_flushes()[0] - before)
    return {name: (statistics.median(times[name]) * 1e3, statistics.mean(flushes[name]))
            for name in contenders}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-124m/4")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=200, help="rounds of the one-call timing")
    ap.add_argument("--flush-mib", type=float, default=2.0,
                    help="batch flush size (default 2: the CPUs'; 32 on GPUs)")
    args = ap.parse_args(argv)
    if native.hooks_module(load=False) is None:
        raise SystemExit("the C++ extension (its batching hook) is not built: "
                         "python setup.py build_ext --inplace")
    with stubbed(int(args.flush_mib * (1 << 20))):
        warm, cold = one_call(args.calls)
        rows = windows(args.model, args.rounds)
    print(f"# triton flush host time, kernels stubbed: {bench.device_name(torch.device('cpu'))}, "
          f"torch {torch.__version__}")
    print(f"accumulate_many_, 28 pairs: {warm:.1f} us warm, {cold:.1f} us after a 64 MiB sweep")
    print(f"{args.model}, k={bench.K_WINDOW}, {args.rounds} rounds, batch flush "
          f"{args.flush_mib:g} MiB:")
    print("| contender | backward x k | full batches flushed by the C++ hook per window |")
    print("|---|---|---|")
    for name, (ms, n) in rows.items():
        print(f"| {name} | {ms:.2f} ms | {n:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
