"""Device bandwidth of the batch accumulation kernels: what a flush of many gradients (or
of one large one, the C++ hook's table of one pair) costs the GPU, not the host.

    python bench/many_bandwidth.py [--device cuda] [--budget 0.3]

The Triton backend's _accumulate_many_kernel reads its pairs' addresses from a table,
where the compiler sees no alignment; since 2026-11-27 a block that lies wholly inside an
aligned pair runs unmasked with its alignment declared (16-byte vector accesses), and
every other block masked, as all of them did before. This times both paths of the same
kernel on the same shapes: "aligned" (every tensor 16-byte aligned, as the wrapper's
accumulators and the caching allocator's gradients are) and "misaligned" (every tensor
one element off, so every block takes the masked path: the kernel as it was), beside the
extension's accumulate_many_ and Triton's accumulate_ per pair.

Shapes: one pair of 64M elements (a GPT-2 XL weight's gradient is 7.7M-10M: the 1.5B
list's larger gradients go one per flush), and GPT-2 124M's 147 tensors of at most 4M
elements in one batch (what its micro-batch's flushes add up to). bf16 gradients into
fp32 accumulators: 10 bytes per element (read 2 + 4, write 4). Medians of CUDA-event
timings after warm-up (fusedaccum.bench.time_calls), as GB/s and as a fraction of the
copy bandwidth measured in the same run. Under TRITON_INTERPRET=1 on a CPU it runs the
same rows on small shapes (a smoke test: the interpreter's times mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import math

import torch

from fusedaccum import accumulator, bench, ops
from fusedaccum.ops import triton as tri


def _pairs(shapes, device, misaligned: bool):
    """Accumulator views of one flat fp32 buffer and gradient views of one flat bf16
    buffer, each starting 16-byte aligned (64 elements apart) or one element past that."""
    shift = 1 if misaligned else 0
    starts, pos = [], 0
    for n in shapes:
        starts.append(pos + shift)
        pos += -(-(n + shift) // 64) * 64
    acc = torch.zeros(pos, device=device)
    grad = bench.fill_random_(torch.empty(pos, device=device), -1.0, 1.0, seed=3)
    grad = grad.to(torch.bfloat16)
    return ([acc[s:s + n] for s, n in zip(starts, shapes)],
            [grad[s:s + n] for s, n in zip(starts, shapes)])


def _rows(shapes, device, tc: bench.TimingConfig, copy_gbps: float):
    nbytes = 10 * sum(shapes)
    has_triton = tri.unavailable_reason("triton", device) is None
    many = {}  # the batch ops, each timed on the aligned and the misaligned pairs
    if has_triton:
        many["triton batch kernel"] = lambda a, g, i: tri._launch_accumulate_many(a, g, 0.25)
    if device.type == "cuda" and ops.unavailable_reason("cuda", device) is None:
        native = ops.get("cuda", device)
        many["cuda accumulate_many_"] = lambda a, g, i: native.accumulate_many_(
            a, g, 0.25, trusted=True)
    contenders = []
    for how in ("aligned", "misaligned"):
        accs, grads = _pairs(shapes, device, how == "misaligned")
        contenders += [(f"{name}, {how}", functools.partial(fn, accs, grads))
                       for name, fn in many.items()]
        if has_triton and how == "aligned":
            contenders.append(("triton accumulate_ per pair, aligned", functools.partial(
                lambda a, g, i: [tri.accumulate_(x, y, 0.25) for x, y in zip(a, g)],
                accs, grads)))
    rows = []
    for name, fn in contenders:
        t = bench.time_calls(fn, device, tc)
        gbps = nbytes / t.median_s / 1e9
        rows.append((name, t.median_s, gbps, gbps / copy_gbps))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per row")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    small = device.type != "cuda"
    tc = bench.TimingConfig(budget_s=args.budget, warmup_s=0.05 if not small else 0.0,
                            min_samples=3 if small else 5)
    copy = bench.measure_copy_bandwidth(device, (1 << 16) if small else (256 << 20), tc)
    gpt2 = [math.prod(s) for s in bench.MODELS["gpt2-124m"].shapes()]
    batched = [n for n in gpt2 if n <= accumulator._BATCH_MAX_NUMEL_DEFAULT]
    cases = {"one pair of 64M": [1 << 26],
             f"GPT-2 124M's {len(batched)} tensors of <= 4M": batched}
    if small:
        cases = {"one pair of 64K + 5": [(1 << 16) + 5], "three small pairs": [3, 1100, 4097]}
    print(f"### device time of batch accumulation (bf16 grads into fp32, 10 B per element), "
          f"{bench.device_name(device)}; copy bandwidth {copy.gbps:.0f} GB/s ({copy.method})")
    print("| shape | kernel | median per call | GB/s | of copy |")
    print("|---|---|---|---|---|")
    for case, shapes in cases.items():
        for name, t, gbps, frac in _rows(shapes, device, tc, copy.gbps):
            print(f"| {case} | {name} | {bench.fmt_time(t)} | {gbps:.0f} | {frac:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
