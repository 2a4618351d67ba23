"""Sweep (BLOCK, num_warps) for each Triton kernel on a GPU and print GB/s per config.

    python bench/tune_triton.py [--sizes 1M,64M] [--budget 0.2] [--csv out.csv]

Each kernel's config in ``fusedaccum.ops.triton._GPU_CONFIG`` is replaced in turn; the
op is timed through the public backend function (CUDA events, median, after warm-up) on
inputs from ``fusedaccum.bench``, with the bytes counted there. The best config per
kernel at the largest size is printed last, as a dict to paste into ``_GPU_CONFIG``.
"""

import argparse
import csv
import itertools
import sys

import torch

from fusedaccum import bench
from fusedaccum.ops import triton as tri

CANDIDATES = {
    "accumulate": [(b, w) for b, w in itertools.product((1024, 2048, 4096, 8192), (4, 8, 16))],
    "norm": [(b, w) for b, w in itertools.product((2048, 4096, 8192, 16384), (4, 8, 16))],
    "adamw": [(b, w) for b, w in itertools.product((512, 1024, 2048, 4096), (4, 8))],
    "sgd": [(b, w) for b, w in itertools.product((1024, 2048, 4096), (4, 8))],
}
SPECS = {"accumulate": "accumulate_bf16", "norm": "grad_norm", "adamw": "adamw_step_",
         "sgd": "sgd_step_"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1M,64M")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--kernels", default=",".join(CANDIDATES))
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_triton: needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    tc = bench.TimingConfig(budget_s=args.budget)
    copy = bench.measure_copy_bandwidth(dev, 256 * 2**20, tc)
    print(f"{torch.cuda.get_device_name(dev)}: copy {copy.gbps:.0f} GB/s")
    sizes = bench.parse_sizes(args.sizes)
    rows, best = [], {}
    default = dict(tri._GPU_CONFIG)
    for kernel in args.kernels.split(","):
        spec = bench.OP_SPECS[SPECS[kernel]]
        for n in sizes:
            x = bench.make_op_inputs(spec, n, dev)
            fn = bench.op_callable(spec, tri, x)
            for cfg in CANDIDATES[kernel]:
                tri._GPU_CONFIG[kernel] = cfg
                t = bench.time_calls(lambda i, fn=fn: fn(), dev, tc)
                gbps = spec.bytes_per_element * n / t.median_s / 1e9
                mark = "*" if cfg == default[kernel] else ""
                rows.append([kernel, n, cfg[0], cfg[1], f"{t.median_s * 1e6:.1f}",
                             f"{gbps:.0f}", f"{gbps / copy.gbps:.0%}{mark}"])
                if n == sizes[-1] and gbps > best.get(kernel, (None, 0))[1]:
                    best[kernel] = (cfg, gbps)
            x = fn = None
            torch.cuda.empty_cache()
        tri._GPU_CONFIG[kernel] = default[kernel]
    print(bench.format_table(["kernel", "n", "BLOCK", "warps", "us", "GB/s", "of copy"], rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([["kernel", "n", "block", "warps", "us", "gbps", "frac"],
                                     *rows])
    print("best at", bench.fmt_size(sizes[-1]), {k: (c, f"{g / copy.gbps:.0%}")
                                                 for k, (c, g) in best.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
